"""The user data stream: a listenKey's WebSocket → `user.events`, and its health → `risk.events`.

The listenKey is created with POST /fapi/v1/listenKey, kept alive with PUT on a schedule (a key lives
60 minutes), and recreated on `listenKeyExpired`, on -1125 (key unknown) or when the connection fails.
While the stream is down the account is blind, so a disconnect publishes a critical `user_stream_down`
risk event (the risk guard halts); after reconnecting, the `on_reconnected` hook (the execution
connector's reconciliation) runs first, and only then `user_stream_restored` is published.

Events are parsed field by field from the documented shapes: ORDER_TRADE_UPDATE and ALGO_UPDATE carry
the order in `o`; ACCOUNT_UPDATE carries balances and positions in `a.B` / `a.P`; MARGIN_CALL has `p`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable

import websockets

from connectors.binance.publish import Publisher
from connectors.binance.rest import LISTEN_KEY_DOES_NOT_EXIST, BinanceError, RestClient, UnknownOutcome
from schemas import event_ids
from streams import metrics

log = logging.getLogger(__name__)

USER_EVENTS = ("ORDER_TRADE_UPDATE", "ALGO_UPDATE", "ACCOUNT_UPDATE", "MARGIN_CALL")


def _f(value) -> float | None:
    return None if value is None or value == "" else float(value)


def _i(value) -> int | None:
    return None if value is None or value == "" else int(value)


_EMPTY = {
    "transaction_time": None, "client_order_id": None, "order_id": None, "side": None, "order_type": None,
    "time_in_force": None, "orig_qty": None, "price": None, "avg_price": None, "stop_price": None,
    "execution_type": None, "order_status": None, "last_filled_qty": None, "filled_qty": None,
    "last_filled_price": None, "commission_asset": None, "commission": None, "trade_time": None, "trade_id": None,
    "realized_profit": None, "reduce_only": None, "working_type": None, "position_side": None, "is_maker": None,
    "reason": None, "actual_order_id": None, "cross_wallet_balance": None, "balances": [], "positions": [],
}


def _record(event_type: str, event_time: int, symbol: str, event_id: str, **fields) -> dict:
    return {"event_id": event_id, "event_time": event_time, "symbol": symbol, "event_type": event_type,
            **_EMPTY, **fields, "source": "binance-ws"}


def parse_order_trade_update(m: dict) -> dict:
    o = m["o"]
    return _record(
        "ORDER_TRADE_UPDATE", int(m["E"]), o["s"],
        event_ids.user_event("ORDER_TRADE_UPDATE", o["s"], o["i"], o["x"], o["X"], o.get("T", m.get("T")),
                             o.get("t", 0)),
        transaction_time=_i(m.get("T")), client_order_id=o["c"], order_id=int(o["i"]), side=o["S"],
        order_type=o["o"], time_in_force=o.get("f"), orig_qty=_f(o["q"]), price=_f(o.get("p")),
        avg_price=_f(o.get("ap")), stop_price=_f(o.get("sp")), execution_type=o["x"], order_status=o["X"],
        last_filled_qty=_f(o.get("l")), filled_qty=_f(o.get("z")), last_filled_price=_f(o.get("L")),
        commission_asset=o.get("N"), commission=_f(o.get("n")), trade_time=_i(o.get("T")), trade_id=_i(o.get("t")),
        realized_profit=_f(o.get("rp")), reduce_only=o.get("R"), working_type=o.get("wt"),
        position_side=o.get("ps"), is_maker=o.get("m"))


def parse_algo_update(m: dict) -> dict:
    o = m["o"]
    # the documented example labels "T" event time and "E" transaction time: keep both, order by the larger
    return _record(
        "ALGO_UPDATE", max(int(m["E"]), int(m["T"])), o["s"],
        event_ids.user_event("ALGO_UPDATE", o["s"], o["aid"], o["X"], m["E"]),
        transaction_time=_i(m.get("T")), client_order_id=o["caid"], order_id=int(o["aid"]), side=o["S"],
        order_type=o["o"], time_in_force=o.get("f"), orig_qty=_f(o.get("q")), price=_f(o.get("p")),
        avg_price=_f(o.get("ap")), stop_price=_f(o.get("tp")), order_status=o["X"], filled_qty=_f(o.get("aq")),
        reduce_only=o.get("R"), working_type=o.get("wt"), position_side=o.get("ps"),
        reason=o.get("rm") or None, actual_order_id=o.get("ai") or None)


def parse_account_update(m: dict) -> dict:
    a = m["a"]
    positions = [{"symbol": p["s"], "position_amount": float(p["pa"]), "entry_price": _f(p.get("ep")),
                  "breakeven_price": _f(p.get("bep")), "accumulated_realized": _f(p.get("cr")),
                  "unrealized_pnl": float(p["up"]), "margin_type": p["mt"], "isolated_wallet": float(p["iw"]),
                  "mark_price": None, "maintenance_margin": None, "position_side": p["ps"]}
                 for p in a.get("P", [])]
    balances = [{"asset": b["a"], "wallet_balance": float(b["wb"]), "cross_wallet_balance": float(b["cw"]),
                 "balance_change": float(b["bc"])} for b in a.get("B", [])]
    symbol = positions[0]["symbol"] if positions else ""  # in the id too: isolated positions update one by one
    return _record("ACCOUNT_UPDATE", int(m["E"]), symbol,
                   event_ids.user_event("ACCOUNT_UPDATE", m["E"], m.get("T", 0), a["m"], symbol),
                   transaction_time=_i(m.get("T")), reason=a["m"], balances=balances, positions=positions)


def parse_margin_call(m: dict) -> dict:
    positions = [{"symbol": p["s"], "position_amount": float(p["pa"]), "entry_price": None,
                  "breakeven_price": None, "accumulated_realized": None, "unrealized_pnl": float(p["up"]),
                  "margin_type": p["mt"], "isolated_wallet": float(p["iw"]), "mark_price": _f(p.get("mp")),
                  "maintenance_margin": _f(p.get("mm")), "position_side": p["ps"]} for p in m.get("p", [])]
    symbol = positions[0]["symbol"] if positions else ""
    return _record("MARGIN_CALL", int(m["E"]), symbol, event_ids.user_event("MARGIN_CALL", m["E"], symbol),
                   cross_wallet_balance=_f(m.get("cw")), positions=positions)


PARSERS = {"ORDER_TRADE_UPDATE": parse_order_trade_update, "ALGO_UPDATE": parse_algo_update,
           "ACCOUNT_UPDATE": parse_account_update, "MARGIN_CALL": parse_margin_call}


def risk_record(kind: str, severity: str, symbol: str, event_time: int, detail: dict, *id_parts) -> dict:
    return {"event_id": event_ids.risk_event(kind, symbol, event_time, *id_parts), "event_time": event_time,
            "symbol": symbol, "kind": kind, "severity": severity, "detail": json.dumps(detail, sort_keys=True),
            "source": "binance"}


class UserStream:
    def __init__(self, rest: RestClient, ws_base: str, publisher: Publisher, keepalive_s: float = 30 * 60,
                 stale_s: float = 0.0, max_connection_s: float = 23.5 * 3600,
                 on_event: Callable[[dict], Awaitable[None]] | None = None,
                 on_reconnected: Callable[[], Awaitable[None]] | None = None, publish: bool = True,
                 name: str = "binance-user"):
        self.rest = rest
        self.ws_base = ws_base.rstrip("/")
        self.publisher = publisher
        self.keepalive_s = keepalive_s
        self.stale_s = stale_s  # 0 = no silence limit: an idle account sends nothing, keepalive pings do
        self.max_connection_s = max_connection_s
        self.on_event = on_event  # the execution connector reacts to fills (sibling cancels)
        self.on_reconnected = on_reconnected
        self.publish = publish  # False: a private watch of the account (the execution connector run on its own)
        self.name = name  # the `connector` label of its metrics
        self.connections = 0
        self.listen_key: str | None = None
        self.healthy = asyncio.Event()

    async def run(self) -> None:
        attempt = 0
        while True:
            reason = await self._session()
            self.healthy.clear()
            metrics.CONNECTOR_RECONNECTS.labels(self.name).inc()
            now = self.rest.server_now_ms()
            self._publish("risk.events", risk_record("user_stream_down", "critical", "", now, {"reason": reason}),
                          key="")
            attempt = 0 if reason in ("rollover", "listen key expired") else attempt + 1
            delay = min(0.25 * 2 ** attempt, 30.0) * random.uniform(0.5, 1.0) if attempt else 0.0
            log.warning("user data stream: %s; reconnecting in %.1f s (trading halts until reconciled)", reason,
                        delay)
            await asyncio.sleep(delay)

    async def _session(self) -> str:
        try:
            self.listen_key = (await self.rest.keyed("POST", "/fapi/v1/listenKey"))["listenKey"]
            async with websockets.connect(f"{self.ws_base}/ws/{self.listen_key}", ping_interval=None,
                                          open_timeout=10) as ws:
                self.connections += 1
                metrics.CONNECTOR_CONNECTED.labels(self.name).set(1)
                if self.on_reconnected is not None:
                    await self.on_reconnected()  # reconcile before declaring the stream healthy
                self._publish("risk.events", risk_record(
                    "user_stream_restored", "info", "", self.rest.server_now_ms(),
                    {"connection": self.connections}, self.connections), key="")
                self.healthy.set()
                keepalive = asyncio.create_task(self._keepalive())
                try:
                    return await self._read(ws, keepalive)
                finally:
                    keepalive.cancel()
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            return f"disconnected ({type(exc).__name__})"
        except (BinanceError, UnknownOutcome) as exc:  # listenKey or reconciliation requests
            return f"REST failed ({exc})"
        finally:
            metrics.CONNECTOR_CONNECTED.labels(self.name).set(0)

    def _publish(self, topic: str, record: dict, key: str | None = None) -> None:
        if self.publish:
            self.publisher.publish(topic, record, key)

    def _dead_letter(self, payload: bytes, reason: str, error: str) -> None:
        if self.publish:
            self.publisher.dead_letter("binance:user", payload, reason, error)
        else:
            log.warning("user data stream: %s message ignored (%s)", reason, error[:200])

    async def _read(self, ws, keepalive: asyncio.Task) -> str:
        """Read until the connection ends, the key expires or the keepalive loses the key."""
        opened = time.monotonic()
        while True:
            left = self.max_connection_s - (time.monotonic() - opened)
            if left <= 0:
                return "rollover"
            recv = asyncio.ensure_future(ws.recv())
            done, _ = await asyncio.wait({recv, keepalive}, timeout=min(self.stale_s or left, left),
                                         return_when=asyncio.FIRST_COMPLETED)
            if recv not in done:
                recv.cancel()
                await asyncio.gather(recv, return_exceptions=True)
                if keepalive in done:
                    return "listen key lost"
                if self.stale_s:
                    return "stale"
                continue
            if await self._on_message(recv.result()):
                return "listen key expired"

    async def _keepalive(self) -> None:
        """PUT on schedule; a key Binance no longer knows ends the session (the next one creates a new key)."""
        while True:
            await asyncio.sleep(self.keepalive_s)
            try:
                await self.rest.keyed("PUT", "/fapi/v1/listenKey")
            except BinanceError as exc:
                if exc.code == LISTEN_KEY_DOES_NOT_EXIST:
                    log.warning("listenKey unknown to Binance (-1125): recreating it")
                    return
                log.warning("listenKey keepalive failed: %s", exc)

    async def _on_message(self, raw: str | bytes) -> bool:
        """Publish one event; True when the listenKey expired."""
        payload = raw.encode() if isinstance(raw, str) else raw
        try:
            msg = json.loads(payload)
            event = msg["e"]
        except (ValueError, KeyError, TypeError) as exc:
            self._dead_letter(payload, "malformed", f"{type(exc).__name__}: {exc}")
            return False
        metrics.BINANCE_MESSAGES.labels(self.name, event).inc()
        if event == "listenKeyExpired":
            return True
        parser = PARSERS.get(event)
        if parser is None:
            self._dead_letter(payload, "unknown_event", str(event))
            return False
        try:
            record = parser(msg)
        except (ValueError, KeyError, TypeError) as exc:
            self._dead_letter(payload, "invalid_field", f"{type(exc).__name__}: {exc}")
            return False
        latency = max(self.rest.server_now_ms() - record["event_time"], 0) / 1000
        metrics.BINANCE_LATENCY.labels(self.name).observe(latency)
        self._publish("user.events", record)
        if self.on_event is not None:
            await self.on_event(msg)
        return False
