"""The execution connector (`--live`): order intents from `orders` → Binance orders, never two for one intent.

Per intent: a MARKET entry through POST /fapi/v1/order, then a stop-loss and a take-profit through the Algo
Order API (POST /fapi/v1/algoOrder, CONDITIONAL, STOP_MARKET / TAKE_PROFIT_MARKET, closePosition,
workingType=MARK_PRICE) — since 2025-12-09 Binance rejects conditional types on /fapi/v1/order (-4120).

- Idempotent: every exchange id derives from the intent's id (`client_ids`), and before placing, and after
  any unknown outcome (timeout, 5xx), the order is looked up by that id; a replayed intent finds its order.
- No naked position: if a protective order fails after the entry filled, the position is closed at market
  at once and a critical risk event is published. When one protective order fires, its sibling is cancelled.
- Reconciliation (start-up and every user-stream reconnect): positions, open orders and algo orders from
  REST against local state; an unprotected position is protected (when its intent is known) or closed,
  orphaned orders are cancelled; every difference is a risk event.
- Errors by code: -2019 (margin) → rejected and reported; -1021 → the REST client resyncs and retries once;
  5xx / network → looked up, then bounded retries; 429/418 → waited out by the REST client.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from decimal import Decimal

from confluent_kafka import Consumer

from connectors.binance.publish import Publisher
from connectors.binance.rest import (
    DUPLICATED_CLIENT_ORDER_ID,
    MARGIN_INSUFFICIENT,
    NO_NEED_TO_CHANGE_MARGIN_TYPE,
    ORDER_DOES_NOT_EXIST,
    BinanceError,
    RestClient,
    UnknownOutcome,
)
from connectors.binance.rules import SymbolRules, plain
from connectors.binance.user_stream import risk_record
from schemas.codec import DecodeError, default_codec
from streams import metrics
from streams.broker import consumer_config

log = logging.getLogger(__name__)

GROUP = "perpflow-execution"
PLACE_ATTEMPTS = 3
STOP_TYPES = ("STOP_MARKET", "STOP")
UNKNOWN_ORDER = -2011  # cancel of an order that is already gone


def client_ids(intent_id: str) -> dict[str, str]:
    """Exchange ids of one intent (≤ 36 chars of [A-Za-z0-9_-], as Binance allows): entry, stop-loss,
    take-profit and the emergency close."""
    h = hashlib.sha256(intent_id.encode()).hexdigest()[:24]
    return {"entry": f"pf{h}-e", "sl": f"pf{h}-sl", "tp": f"pf{h}-tp", "close": f"pf{h}-x"}


class Executor:
    def __init__(self, rest: RestClient, publisher: Publisher, symbols: list[str], leverage: int = 2):
        self.rest = rest
        self.publisher = publisher
        self.symbols = symbols
        self.leverage = leverage
        self.rules: dict[str, SymbolRules] = {}
        self._prepared: dict[str, int] = {}  # symbol → the leverage set on the exchange
        self.protection: dict[str, dict] = {}  # symbol → the open intent: its ids and trigger prices

    async def start(self) -> None:
        await self.rest.sync_time()
        info = await self.rest.get("/fapi/v1/exchangeInfo")
        self.rest.use_limits(info)
        self.rules = {s["symbol"]: SymbolRules.from_exchange_info(s) for s in info["symbols"]
                      if s["symbol"] in self.symbols}

    # -- the intent ------------------------------------------------------------------------
    async def execute(self, order: dict) -> str:
        """Carry out one intent; returns the outcome (also counted in metrics)."""
        outcome = await self._execute(order)
        metrics.BINANCE_ORDERS.labels(outcome).inc()
        return outcome

    async def _execute(self, order: dict) -> str:
        symbol, ids = order["symbol"], client_ids(order["intent_id"])
        if order.get("action", "OPEN") == "CLOSE":
            await self.close_position(symbol, ids["close"], "intent")
            return "closed"
        rules = self.rules.get(symbol)
        qty = rules.quantity(order["quantity"]) if rules else Decimal(0)
        problem = ("unknown symbol" if rules is None else "no stop_loss" if order.get("stop_loss") is None
                   else f"quantity {order['quantity']} below the minimum {rules.min_qty}" if qty < rules.min_qty
                   else None)
        if problem:
            self.report_risk("order_rejected", "warning", symbol, order, {"reason": problem})
            return "rejected"
        # the leverage the risk guard sized the position and its liquidation distance with
        await self._prepare(symbol, int(order.get("leverage") or self.leverage))
        try:
            entry = await self._place_order(symbol, {
                "symbol": symbol, "side": order["side"], "type": "MARKET", "quantity": plain(qty),
                "newClientOrderId": ids["entry"], "newOrderRespType": "RESULT"})
        except BinanceError as exc:
            kind = "margin_insufficient" if exc.code == MARGIN_INSUFFICIENT else "entry_failed"
            self.report_risk("order_rejected", "warning", symbol, order,
                             {"reason": kind, "code": exc.code, "msg": exc.msg})
            return "rejected"
        if Decimal(entry.get("executedQty", "0")) == 0:
            return "entry_not_filled"
        exit_side = "SELL" if order["side"] == "BUY" else "BUY"
        metrics.POSITION_UNPROTECTED.labels(symbol).set(1)  # until both protective orders stand
        self.protection[symbol] = {"intent_id": order["intent_id"], "exit_side": exit_side,
                                   "stop_loss": order["stop_loss"], "take_profit": order.get("take_profit"),
                                   "sl": ids["sl"], "tp": ids["tp"], "close": ids["close"]}
        if not await self.protect(symbol):
            return "protection_failed"
        return "filled"

    async def protect(self, symbol: str) -> bool:
        """Place the stop-loss and take-profit of the symbol's intent; on any failure close the position."""
        p = self.protection[symbol]
        rules = self.rules[symbol]
        legs = [("sl", "STOP_MARKET", p["stop_loss"]), ("tp", "TAKE_PROFIT_MARKET", p["take_profit"])]
        for leg, kind, trigger in legs:
            if trigger is None:
                continue
            try:
                await self._place_algo(symbol, {
                    "algoType": "CONDITIONAL", "symbol": symbol, "side": p["exit_side"], "type": kind,
                    "triggerPrice": plain(rules.price(trigger)), "workingType": "MARK_PRICE",
                    "closePosition": "true", "clientAlgoId": p[leg]})
            except (BinanceError, UnknownOutcome) as exc:
                log.error("%s %s order failed (%s): closing the position at market", symbol, leg, exc)
                await self.close_position(symbol, p["close"], f"{leg} failed")
                for other in ("sl", "tp"):
                    await self._cancel_algo(symbol, p[other])
                self.report_risk("protection_failed", "critical", symbol, {"intent_id": p["intent_id"]},
                                 {"leg": leg, "error": str(exc), "action": "closed at market"})
                self.protection.pop(symbol, None)
                metrics.POSITION_UNPROTECTED.labels(symbol).set(0)  # closed
                return False
        metrics.POSITION_UNPROTECTED.labels(symbol).set(0)
        return True

    async def on_user_event(self, msg: dict) -> None:
        """A protective order fired: cancel its sibling."""
        if msg.get("e") != "ALGO_UPDATE" or msg["o"].get("X") not in ("TRIGGERED", "FINISHED"):
            return
        symbol, fired = msg["o"]["s"], msg["o"]["caid"]
        p = self.protection.get(symbol)
        if p is None or fired not in (p["sl"], p["tp"]):
            return
        sibling = p["tp"] if fired == p["sl"] else p["sl"]
        await self._cancel_algo(symbol, sibling)
        self.protection.pop(symbol, None)
        metrics.POSITION_UNPROTECTED.labels(symbol).set(0)  # closed by the one that fired
        log.info("%s: %s fired, sibling %s cancelled", symbol, fired, sibling)

    # -- reconciliation --------------------------------------------------------------------
    async def reconcile(self) -> dict:
        positions = {p["symbol"]: Decimal(p["positionAmt"]) for p in await self.rest.get(
            "/fapi/v2/positionRisk", signed=True)}
        algos = await self.rest.get("/fapi/v1/openAlgoOrders", signed=True)
        orders = await self.rest.get("/fapi/v1/openOrders", signed=True)
        summary = {"protected": [], "closed": [], "cancelled": []}
        for symbol in self.symbols:
            amount = positions.get(symbol, Decimal(0))
            mine = [a for a in algos if a["symbol"] == symbol]
            if amount != 0 and not any(a["orderType"] in STOP_TYPES for a in mine):
                metrics.POSITION_UNPROTECTED.labels(symbol).set(1)
                local = self.protection.get(symbol)
                if local is not None and await self.protect(symbol):
                    summary["protected"].append(symbol)
                    self.report_risk("unprotected_position", "warning", symbol, local,
                                     {"amount": str(amount), "action": "protected"})
                elif local is None:
                    close_id = client_ids(f"reconcile-close:{symbol}:{self.rest.server_now_ms()}")["close"]
                    await self.close_position(symbol, close_id, "unprotected position found by reconciliation")
                    summary["closed"].append(symbol)
                    metrics.POSITION_UNPROTECTED.labels(symbol).set(0)
                    self.report_risk("unprotected_position", "critical", symbol, {"intent_id": close_id},
                                     {"amount": str(amount), "action": "closed at market"})
            elif amount == 0:
                for a in mine:  # protection of a position that no longer exists
                    await self._cancel_algo(symbol, a["clientAlgoId"])
                    summary["cancelled"].append(a["clientAlgoId"])
                    self.report_risk("orphan_order_cancelled", "warning", symbol, {"intent_id": a["clientAlgoId"]},
                                     {"client_algo_id": a["clientAlgoId"], "type": a["orderType"]})
                for o in (o for o in orders if o["symbol"] == symbol):
                    await self._cancel_order(symbol, o["clientOrderId"])
                    summary["cancelled"].append(o["clientOrderId"])
                    self.report_risk("orphan_order_cancelled", "warning", symbol, {"intent_id": o["clientOrderId"]},
                                     {"client_order_id": o["clientOrderId"], "type": o["type"]})
                self.protection.pop(symbol, None)
        log.info("reconciled with the exchange: %s", summary)
        return summary

    # -- exchange calls --------------------------------------------------------------------
    async def _prepare(self, symbol: str, leverage: int) -> None:
        """Isolated margin once per symbol, and the entry's leverage whenever it differs from the one set."""
        if symbol not in self._prepared:
            try:
                await self.rest.signed("POST", "/fapi/v1/marginType", {"symbol": symbol, "marginType": "ISOLATED"})
            except BinanceError as exc:
                if exc.code != NO_NEED_TO_CHANGE_MARGIN_TYPE:
                    raise
        if self._prepared.get(symbol) != leverage:
            await self.rest.signed("POST", "/fapi/v1/leverage", {"symbol": symbol, "leverage": leverage})
            self._prepared[symbol] = leverage

    async def close_position(self, symbol: str, client_id: str, why: str) -> None:
        risk = await self.rest.get("/fapi/v2/positionRisk", {"symbol": symbol}, signed=True)
        amount = sum((Decimal(p["positionAmt"]) for p in risk if p["symbol"] == symbol), Decimal(0))
        if amount == 0:
            return
        log.warning("%s: closing %s at market (%s)", symbol, amount, why)
        await self._place_order(symbol, {
            "symbol": symbol, "side": "SELL" if amount > 0 else "BUY", "type": "MARKET",
            "quantity": plain(abs(amount)), "reduceOnly": "true", "newClientOrderId": client_id,
            "newOrderRespType": "RESULT"})

    async def _place_order(self, symbol: str, params: dict) -> dict:
        return await self._place_once("/fapi/v1/order", params, "newClientOrderId", "origClientOrderId", symbol)

    async def _place_algo(self, symbol: str, params: dict) -> dict:
        return await self._place_once("/fapi/v1/algoOrder", params, "clientAlgoId", "clientAlgoId", symbol)

    async def _place_once(self, path: str, params: dict, id_param: str, query_param: str, symbol: str) -> dict:
        """Place unless an order with this client id exists; after an unknown outcome look before retrying."""
        client_id = params[id_param]
        existing = await self._lookup(path, symbol, query_param, client_id)
        if existing is not None:
            log.info("%s %s exists already: not placed again", path, client_id)
            return existing
        for attempt in range(1, PLACE_ATTEMPTS + 1):
            try:
                return await self.rest.signed("POST", path, params)
            except UnknownOutcome as exc:
                log.warning("%s %s: outcome unknown (%s); looking it up", path, client_id, exc)
            except BinanceError as exc:
                if exc.code != DUPLICATED_CLIENT_ORDER_ID:
                    raise
            found = await self._lookup(path, symbol, query_param, client_id)
            if found is not None:
                return found
            await asyncio.sleep(0.2 * 2 ** attempt)
        raise UnknownOutcome(f"{path} {client_id}: no answer after {PLACE_ATTEMPTS} attempts and not found")

    async def _lookup(self, path: str, symbol: str, query_param: str, client_id: str) -> dict | None:
        try:
            return await self.rest.get(path, {"symbol": symbol, query_param: client_id}, signed=True)
        except BinanceError as exc:
            if exc.code == ORDER_DOES_NOT_EXIST:
                return None
            raise

    async def _cancel_algo(self, symbol: str, client_algo_id: str) -> None:
        try:
            await self.rest.signed("DELETE", "/fapi/v1/algoOrder", {"symbol": symbol, "clientAlgoId": client_algo_id})
        except BinanceError as exc:
            if exc.code not in (ORDER_DOES_NOT_EXIST, UNKNOWN_ORDER):  # already gone: fine
                raise

    async def _cancel_order(self, symbol: str, client_order_id: str) -> None:
        try:
            await self.rest.signed("DELETE", "/fapi/v1/order", {"symbol": symbol,
                                                                "origClientOrderId": client_order_id})
        except BinanceError as exc:
            if exc.code not in (ORDER_DOES_NOT_EXIST, UNKNOWN_ORDER):
                raise

    def report_risk(self, kind: str, severity: str, symbol: str, order: dict, detail: dict) -> None:
        log.warning("risk event %s (%s) %s: %s", kind, severity, symbol, detail)
        intent = order.get("intent_id", "")
        self.publisher.publish("risk.events", risk_record(kind, severity, symbol, self.rest.server_now_ms(),
                                                          {"intent_id": intent, **detail}, intent))


class OrderConsumer:
    """`orders` → Executor, committing each intent's offset after it was carried out (at-least-once; the
    executor's lookups make a replayed intent harmless). Trading waits while `ready` is not set."""

    def __init__(self, bootstrap: str, executor: Executor, ready: asyncio.Event | None = None, prefix: str = "",
                 group: str = GROUP):
        self.consumer = Consumer(consumer_config(bootstrap, group))
        self.topic = prefix + "orders"
        self.executor = executor
        self.ready = ready
        self.codec = default_codec()
        self.handled = 0

    async def run(self) -> None:
        self.consumer.subscribe([self.topic])
        try:
            while True:
                messages = await asyncio.to_thread(self.consumer.consume, 100, 0.5)
                for m in messages:
                    if m.error() is not None:
                        continue
                    if self.ready is not None:
                        await self.ready.wait()  # halted: no order while the account is unobserved
                    try:
                        _, order = self.codec.decode(m.value())
                        await self.executor.execute(order)
                    except DecodeError as exc:
                        self.executor.publisher.dead_letter(self.topic, m.value() or b"", exc.reason, exc.detail)
                    except (BinanceError, UnknownOutcome) as exc:  # reported; the intent is not retried blindly
                        self.executor.report_risk("order_failed", "critical", order["symbol"], order,
                                                  {"error": str(exc)})
                    self.consumer.commit(message=m, asynchronous=False)
                    self.handled += 1
        finally:
            await asyncio.to_thread(self.consumer.close)
