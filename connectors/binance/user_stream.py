"""The user data stream: a listenKey's WebSocket → `user.events`, and its health → `risk.events`.

The listenKey is created with POST /fapi/v1/listenKey, kept alive with PUT on a schedule (a key lives
60 minutes), and recreated on `listenKeyExpired`, on -1125 (key unknown) or when the connection fails.

Liveness: an idle account's stream carries no events for hours, so the client pings every third of `stale_s`
and a connection with no pong and no frame for `stale_s` is dead (a path can die without a close). Down —
dead, dropped, expired or rolled after `max_connection_s` — publishes a critical `user_stream_down` risk
event and clears `healthy` at once (the order consumer waits on it; the risk guard halts), once per outage.
After reconnecting, the `on_reconnected` hook (the execution connector's reconciliation) runs, then, on every
reconnect but the first, the fills the stream missed are fetched from /fapi/v1/userTrades and published with
the ids the stream's own events carry (the reconcile publishes the account's positions and balance as an
`account_snapshot` risk event); only when all of it succeeded is `user_stream_restored` published and `healthy`
set.

Events are parsed field by field from the documented shapes: ORDER_TRADE_UPDATE and ALGO_UPDATE carry
the order in `o`; ACCOUNT_UPDATE carries balances and positions in `a.B` / `a.P`; MARGIN_CALL has `p`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from decimal import Decimal

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


RECOVERY_MARGIN_MS = 60_000  # fills this long before the newest event seen are fetched again: late or skewed events
TRADES_PAGE = 1000  # userTrades' largest page
TRADES_WINDOW_MS = 7 * 86_400_000  # userTrades answers at most 7 days per request
CLOSE_TIMEOUT_S = 1.0  # a dead connection's close handshake is not waited for: the next one is what matters
SEEN_TRADES_KEPT = 5000
ROLL_REASONS = ("rollover", "listen key expired")  # planned: reconnect at once


def fill_from_rest(trade: dict, order: dict, order_trades: list[dict]) -> dict:
    """One fill from /fapi/v1/userTrades as the ORDER_TRADE_UPDATE (x=TRADE) the stream would have carried: the
    same parser, so the same event id (symbol, order, TRADE, status after this fill, trade time, trade id).
    `order_trades`: all of the order's fills, for the status and the cumulative quantity after this one."""
    upto = [t for t in order_trades if int(t["id"]) <= int(trade["id"])]
    filled = sum((Decimal(t["qty"]) for t in upto), Decimal(0))
    quote = sum((Decimal(t["qty"]) * Decimal(t["price"]) for t in upto), Decimal(0))
    status = "FILLED" if filled >= Decimal(order["origQty"]) else "PARTIALLY_FILLED"
    msg = {"e": "ORDER_TRADE_UPDATE", "E": trade["time"], "T": trade["time"], "o": {
        "s": trade["symbol"], "c": order["clientOrderId"], "S": order["side"], "o": order.get("type", "MARKET"),
        "f": order.get("timeInForce"), "q": order["origQty"], "p": order.get("price"),
        "ap": str(quote / filled) if filled else "0", "sp": order.get("stopPrice"), "x": "TRADE", "X": status,
        "i": trade["orderId"], "l": trade["qty"], "z": str(filled), "L": trade["price"],
        "N": trade.get("commissionAsset"), "n": trade.get("commission"), "T": trade["time"], "t": trade["id"],
        "m": trade.get("maker"), "R": order.get("reduceOnly"), "wt": order.get("workingType"),
        "ps": trade.get("positionSide"), "rp": trade.get("realizedPnl")}}
    return parse_order_trade_update(msg) | {"source": "binance-rest"}


class UserStream:
    def __init__(self, rest: RestClient, ws_base: str, publisher: Publisher, keepalive_s: float = 30 * 60,
                 stale_s: float = 60.0, max_connection_s: float = 23.5 * 3600,
                 on_event: Callable[[dict], Awaitable[None]] | None = None,
                 on_reconnected: Callable[[], Awaitable[None]] | None = None, publish: bool = True,
                 name: str = "binance-user", symbols: Iterable[str] = ()):
        self.rest = rest
        self.ws_base = ws_base.rstrip("/")
        self.publisher = publisher
        self.keepalive_s = keepalive_s
        self.stale_s = stale_s  # no pong nor frame this long = dead; 0 = no pings, no limit
        self.max_connection_s = max_connection_s
        self.on_event = on_event  # the execution connector reacts to fills (sibling cancels)
        self.on_reconnected = on_reconnected
        self.publish = publish  # False: a private watch of the account (the execution connector run on its own)
        self.name = name  # the `connector` label of its metrics
        self.symbols = set(symbols)  # whose missed fills are fetched after a reconnect (with any symbol seen trading)
        self.connections = 0
        self.recovered_fills = 0
        self.listen_key: str | None = None
        self.healthy = asyncio.Event()
        self._down_since: int | None = None  # server ms of the outage's user_stream_down; None while up
        self._was_healthy = False
        self._alive = 0.0  # monotonic time of the newest frame or pong on the current connection
        self._watermark = 0  # server ms up to which the stream (or a recovery) has delivered everything
        self._seen_trades: dict[tuple[str, int], int] = {}  # (symbol, trade id) published → trade time

    async def run(self) -> None:
        attempt = 0
        while True:
            self._was_healthy = False
            reason = await self._session()
            self._down(reason)
            metrics.CONNECTOR_RECONNECTS.labels(self.name).inc()
            if reason in ROLL_REASONS:
                attempt = 0
            else:  # a session that had been healthy starts the backoff again from its shortest wait
                attempt = 1 if self._was_healthy else attempt + 1
            delay = min(0.25 * 2 ** attempt, 30.0) * random.uniform(0.5, 1.0) if attempt else 0.0
            log.warning("user data stream: %s; reconnecting in %.1f s (no new entries until reconciled)", reason,
                        delay)
            await asyncio.sleep(delay)

    async def _session(self) -> str:
        try:
            self.listen_key = (await self.rest.keyed("POST", "/fapi/v1/listenKey"))["listenKey"]
            async with websockets.connect(f"{self.ws_base}/ws/{self.listen_key}", ping_interval=None,
                                          close_timeout=CLOSE_TIMEOUT_S, open_timeout=10) as ws:
                connected_at = self.rest.server_now_ms()  # from here on the stream delivers (frames wait in ws)
                self.connections += 1
                metrics.CONNECTOR_CONNECTED.labels(self.name).set(1)
                if self.on_reconnected is not None:
                    await self.on_reconnected()  # reconcile before declaring the stream healthy
                fills = await self._recover() if self.publish and self._watermark else 0
                self._watermark = max(self._watermark, connected_at)
                self._restored(fills)
                keepalive = asyncio.create_task(self._keepalive())
                try:
                    reason = await self._read(ws, keepalive)
                    self._down(reason)  # before the close handshake: nothing may trade on a dead stream meanwhile
                    return reason
                finally:
                    keepalive.cancel()
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            return f"disconnected ({type(exc).__name__})"
        except (BinanceError, UnknownOutcome) as exc:  # listenKey, reconciliation or recovery requests
            return f"REST failed ({exc})"
        finally:
            metrics.CONNECTOR_CONNECTED.labels(self.name).set(0)

    def _down(self, reason: str) -> None:
        """No new entries from now on; the critical event once per outage, however many attempts it takes."""
        self.healthy.clear()
        if self._down_since is not None:
            return
        self._down_since = self.rest.server_now_ms()
        self._publish("risk.events", risk_record("user_stream_down", "critical", "", self._down_since,
                                                 {"reason": reason, "connection": self.connections},
                                                 self.connections), key="")

    def _restored(self, recovered_fills: int) -> None:
        now = self.rest.server_now_ms()
        detail = {"connection": self.connections, "recovered_fills": recovered_fills}
        if self._down_since is not None:
            detail["down_ms"] = now - self._down_since
        self._publish("risk.events", risk_record("user_stream_restored", "info", "", now, detail, self.connections),
                      key="")
        self._down_since = None
        self._was_healthy = True
        self.healthy.set()

    def _publish(self, topic: str, record: dict, key: str | None = None) -> None:
        if self.publish:
            self.publisher.publish(topic, record, key)

    def _dead_letter(self, payload: bytes, reason: str, error: str) -> None:
        if self.publish:
            self.publisher.dead_letter("binance:user", payload, reason, error)
        else:
            log.warning("user data stream: %s message ignored (%s)", reason, error[:200])

    async def _read(self, ws, keepalive: asyncio.Task) -> str:
        """Read until the connection ends or goes silent, the key expires, the keepalive loses the key, or the
        connection is due to be rolled."""
        opened = self._alive = time.monotonic()
        pinger = asyncio.create_task(self._ping(ws)) if self.stale_s else None
        recv: asyncio.Future | None = None
        try:
            while True:
                now = time.monotonic()
                timeout = self.max_connection_s - (now - opened)
                if timeout <= 0:
                    return "rollover"
                if self.stale_s:
                    silent_for = now - self._alive
                    if silent_for >= self.stale_s:
                        return f"silent for {silent_for:.1f} s (no pong)"
                    timeout = min(timeout, self.stale_s - silent_for)
                recv = asyncio.ensure_future(ws.recv())
                done, _ = await asyncio.wait({recv, keepalive}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()  # safe in websockets' asyncio API: no frame is lost
                    await asyncio.gather(recv, return_exceptions=True)
                    if keepalive in done:
                        return "listen key lost"
                    continue
                self._alive = time.monotonic()
                if await self._on_message(recv.result()):
                    return "listen key expired"
        finally:
            if pinger is not None:
                pinger.cancel()
            if recv is not None and not recv.done():  # cancelled (shutdown): no orphan recv left to fail unseen
                recv.cancel()
                await asyncio.gather(recv, return_exceptions=True)

    async def _ping(self, ws) -> None:
        """A ping every third of the silence bound; each pong proves the path alive."""
        while True:
            await asyncio.sleep(self.stale_s / 3)
            try:
                pong = await ws.ping()
            except websockets.ConnectionClosed:
                return
            pong.add_done_callback(self._on_pong)

    def _on_pong(self, pong: asyncio.Future) -> None:
        if not pong.cancelled() and pong.exception() is None:
            self._alive = time.monotonic()

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

    # -- what an outage missed -----------------------------------------------------------------------------------
    async def _recover(self) -> int:
        """The fills since the newest event seen (less a margin) that the stream did not deliver → user.events; how
        many. Raises on a failed request: the stream is not restored then. (The account itself — positions and
        balance — reaches the risk guard as the execution connector's `account_snapshot` after its reconcile.)"""
        now = self.rest.server_now_ms()
        since = max(self._watermark - RECOVERY_MARGIN_MS, now - TRADES_WINDOW_MS + 60_000)
        if self._watermark - RECOVERY_MARGIN_MS < since:
            log.warning("user data stream was down over 7 days: fills before %d are not fetched", since)
        symbols = self.symbols | {s for s, _ in self._seen_trades}
        fills = 0
        for symbol in sorted(symbols):
            missed = [t for t in await self._trades(symbol, {"startTime": since})
                      if (symbol, int(t["id"])) not in self._seen_trades]
            for order_id in sorted({int(t["orderId"]) for t in missed}):
                order = await self.rest.get("/fapi/v1/order", {"symbol": symbol, "orderId": order_id}, signed=True)
                order_trades = await self._trades(symbol, {"orderId": order_id})
                for trade in (t for t in missed if int(t["orderId"]) == order_id):
                    self._publish("user.events", fill_from_rest(trade, order, order_trades))
                    self._remember_trade(symbol, int(trade["id"]), int(trade["time"]))
                    fills += 1
        self.recovered_fills += fills
        if fills:
            log.warning("user data stream: %d fill(s) missed while it was down were fetched over REST", fills)
        return fills

    async def _trades(self, symbol: str, window: dict) -> list[dict]:
        """userTrades oldest first, paged by id (fromId cannot go with a time window)."""
        params = {"symbol": symbol, **window, "limit": TRADES_PAGE}
        out: list[dict] = []
        while True:
            page = await self.rest.get("/fapi/v1/userTrades", params, signed=True)
            out.extend(page)
            if len(page) < TRADES_PAGE:
                return out
            params = {"symbol": symbol, "fromId": int(page[-1]["id"]) + 1, "limit": TRADES_PAGE}
            if "orderId" in window:
                params["orderId"] = window["orderId"]

    def _remember_trade(self, symbol: str, trade_id: int, trade_time: int) -> None:
        self._seen_trades[(symbol, trade_id)] = trade_time
        if len(self._seen_trades) > SEEN_TRADES_KEPT:  # older than any recovery will look back
            cutoff = self._watermark - 2 * RECOVERY_MARGIN_MS
            self._seen_trades = {k: t for k, t in self._seen_trades.items() if t >= cutoff}

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
        self._watermark = max(self._watermark, record["event_time"])
        fill = (record["symbol"], record["trade_id"]) if record["execution_type"] == "TRADE" else None
        if fill is None or fill not in self._seen_trades:  # a fill a recovery published already goes out once
            self._publish("user.events", record)
        if fill is not None:
            self._remember_trade(*fill, record["trade_time"] or record["event_time"])
        if self.on_event is not None:
            await self.on_event(msg)
        return False
