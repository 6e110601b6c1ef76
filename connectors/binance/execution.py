"""The execution connector (`--live`): order intents from `orders` → Binance orders, as explicit lifecycles.

Every intent is a state machine, persisted on `execution.intents` (compacted: the newest record per intent is its
state) *before* each exchange call that could leave something behind, so a SIGKILLed connector resumes every open
intent where it stood:

    PENDING ─► ENTRY_SENT ─► FILLED ─► PROTECTING ─► PROTECTED ─► CLOSING ─► CLOSED
                   │  ▲                    │                          ▲
                   ▼  │ (found filled)     └── protection failed ─────┘
              ENTRY_UNKNOWN ─► EXPIRED (never found; a late fill still gets protection)
    PENDING ─► REJECTED (a definite answer, or checks before sending) · EXPIRED (too old to trade)

- One entry per intent, ever: every exchange id derives from the intent id (`client_ids`); an entry is POSTed once.
  Binance documents that a timeout, a 5xx, HTTP 408 or -1007 may still execute and that a duplicate client id is
  refused only among *open* orders (a filled MARKET entry is not open), so an unknown outcome is looked up by client
  id, with backoff, until its fate is known — never re-sent.
- Protection: an entry fill, however late (a lookup, the user stream, reconcile), gets a mark-price stop-loss and
  take-profit (Algo Order API, closePosition). A protective order the exchange cancels, rejects or expires is
  replaced (bounded rounds, new client ids), then the position is closed. The sibling is cancelled once the
  triggered order has *filled* (ALGO_UPDATE FINISHED and the position flat), not on TRIGGERED.
- Closing never gives up: a close that fails is retried with backoff until the position is flat; meanwhile new
  entries are refused and a critical risk event says so. Protection is cancelled once flat.
- Reconcile (start, every user-stream reconnect, periodically): positions, open orders and algo orders against the
  lifecycles; protection must match the position (side, type, closePosition, trigger price), not merely exist; a
  position nobody owns is closed, orders of a flat symbol are cancelled; the account (positions, balance) goes to
  `risk.events` as `account_snapshot` so the risk guard's book follows the exchange.
- Intents older than `max_intent_age_s` (default two 5m bars) are not executed: a risk event says why. Closes never
  expire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

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
from streams.broker import consumer_config, read_messages

log = logging.getLogger(__name__)

GROUP = "perpflow-execution"
LIFECYCLE_TOPIC = "execution.intents"
UNKNOWN_ORDER = -2011  # cancel of an order that is already gone
OPEN_ALGO = ("NEW", "TRIGGERING")  # an algo order still guarding (TRIGGERED: its market order is on its way)
GONE_ALGO = ("CANCELED", "REJECTED", "EXPIRED")


def client_ids(intent_id: str) -> dict[str, str]:
    """Exchange ids of one intent (≤ 36 chars of [A-Za-z0-9_-], as Binance allows): entry, stop-loss,
    take-profit and the emergency close. Replacements and retries append their round number."""
    h = hashlib.sha256(intent_id.encode()).hexdigest()[:24]
    return {"entry": f"pf{h}-e", "sl": f"pf{h}-sl", "tp": f"pf{h}-tp", "close": f"pf{h}-x"}


def numbered(client_id: str, n: int) -> str:
    """The n-th replacement of an exchange id (n = 0: the id itself)."""
    return client_id if n == 0 else f"{client_id}{n}"


class State(StrEnum):
    PENDING = "PENDING"
    ENTRY_SENT = "ENTRY_SENT"
    ENTRY_UNKNOWN = "ENTRY_UNKNOWN"
    FILLED = "FILLED"
    PROTECTING = "PROTECTING"
    PROTECTED = "PROTECTED"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"


TERMINAL = (State.CLOSED, State.REJECTED, State.EXPIRED)
ENTRY_IN_DOUBT = (State.ENTRY_SENT, State.ENTRY_UNKNOWN)
HOLDING = (State.FILLED, State.PROTECTING, State.PROTECTED, State.CLOSING)  # a position may exist
# what `execute` returns (and counts) for the state an intent settles in
OUTCOMES = {State.PROTECTED: "filled", State.CLOSED: "closed", State.REJECTED: "rejected",
            State.EXPIRED: "expired", State.ENTRY_UNKNOWN: "unknown", State.ENTRY_SENT: "unknown",
            State.CLOSING: "closing", State.FILLED: "unprotected", State.PROTECTING: "unprotected"}


@dataclass(frozen=True)
class ExecutionConfig:
    """How patient the executor is; every wait is bounded, every bound is here."""

    max_intent_age_s: float = 600.0  # two 5m bars: an older entry intent is not traded
    unknown_lookup_s: float = 10.0  # looked up inline after an unknown outcome, then by the maintenance loop
    unknown_give_up_s: float = 300.0  # an entry not found this long after its intent: EXPIRED (a late fill: protected)
    protect_rounds: int = 3  # placements of protection (first + replacements) before the position is closed
    place_attempts: int = 3  # tries of one protective order after unknown outcomes
    close_backoff_max_s: float = 30.0
    maintenance_interval_s: float = 2.0  # the loop that drives lifecycles waiting on the exchange
    reconcile_interval_s: float = 60.0


@dataclass
class Lifecycle:
    """One intent's execution, in perpflow's words; `record()` is what goes to `execution.intents`."""

    intent_id: str
    symbol: str
    action: str = "OPEN"
    side: str = "BUY"
    quantity: float = 0.0
    stop_loss: float | None = None
    take_profit: float | None = None
    leverage: int | None = None
    intent_time: int = 0
    state: State = State.PENDING
    seq: int = 0
    filled_qty: str = "0"
    protect_tries: int = 0
    close_tries: int = 0
    reason: str = ""
    next_try: float = 0.0  # monotonic: the maintenance loop's next attempt (not persisted)

    @classmethod
    def from_order(cls, order: dict) -> Lifecycle:
        return cls(order["intent_id"], order["symbol"], order.get("action") or "OPEN", order.get("side") or "BUY",
                   float(order.get("quantity") or 0.0), order.get("stop_loss"), order.get("take_profit"),
                   order.get("leverage"), int(order.get("event_time") or 0))

    @classmethod
    def from_record(cls, r: dict) -> Lifecycle:
        names = {f.name for f in dataclasses.fields(cls)} - {"next_try", "state"}
        return cls(state=State(r["state"]), **{k: v for k, v in r.items() if k in names})

    @property
    def ids(self) -> dict[str, str]:
        return client_ids(self.intent_id)

    @property
    def exit_side(self) -> str:
        return "SELL" if self.side == "BUY" else "BUY"

    def record(self, now_ms: int, previous: State) -> dict:
        return {"event_id": f"execution:{self.intent_id}:{self.seq}", "event_time": now_ms, "symbol": self.symbol,
                "intent_id": self.intent_id, "seq": self.seq, "state": str(self.state),
                "previous_state": str(previous), "action": self.action, "side": self.side,
                "quantity": self.quantity, "stop_loss": self.stop_loss, "take_profit": self.take_profit,
                "leverage": self.leverage, "intent_time": self.intent_time, "filled_qty": self.filled_qty,
                "protect_tries": self.protect_tries, "close_tries": self.close_tries, "reason": self.reason[:500]}


def load_lifecycles(bootstrap: str, prefix: str = "") -> dict[str, Lifecycle]:
    """Every intent's newest state from `execution.intents`, read to its (fetch-measured) end."""
    topic = prefix + LIFECYCLE_TOPIC
    found: dict[str, Lifecycle] = {}
    codec = default_codec()
    for m in read_messages(bootstrap, topic):
        try:
            _, r = codec.decode(m.value())
        except DecodeError as exc:
            log.error("%s offset %d unreadable (%s): skipped", topic, m.offset(), exc.reason)
            continue
        old = found.get(r["intent_id"])
        if old is None or r["seq"] > old.seq:
            found[r["intent_id"]] = Lifecycle.from_record(r)
    return found


class Executor:
    def __init__(self, rest: RestClient, publisher: Publisher, symbols: list[str], leverage: int = 2,
                 config: ExecutionConfig | None = None, bootstrap: str | None = None):
        self.rest = rest
        self.publisher = publisher
        self.symbols = symbols
        self.leverage = leverage
        self.config = config or ExecutionConfig()
        self.bootstrap = bootstrap
        self.rules: dict[str, SymbolRules] = {}
        self._prepared: dict[str, int] = {}  # symbol → the leverage set on the exchange
        self.lifecycles: dict[str, Lifecycle] = {}
        self._by_prefix: dict[str, Lifecycle] = {}  # "pf<hash>" → its lifecycle (exchange events name ids)
        self._cancelling: set[str] = set()  # our own cancels: their CANCELED events need no replacement
        self._lock = asyncio.Lock()  # one actor on the account at a time: intents, events, reconcile, maintenance

    async def start(self) -> None:
        await self.rest.sync_time()
        info = await self.rest.get("/fapi/v1/exchangeInfo")
        self.rest.use_limits(info)
        self.rules = {s["symbol"]: SymbolRules.from_exchange_info(s) for s in info["symbols"]
                      if s["symbol"] in self.symbols}
        if self.bootstrap is not None:
            loaded = await asyncio.to_thread(load_lifecycles, self.bootstrap, self.publisher.prefix)
            for lc in loaded.values():
                self._remember(lc)
            waiting = [lc for lc in loaded.values() if lc.state not in TERMINAL]
            if waiting:
                log.warning("resuming %d open intents: %s", len(waiting),
                            ", ".join(f"{lc.intent_id} {lc.state}" for lc in waiting))

    def _remember(self, lc: Lifecycle) -> None:
        self.lifecycles[lc.intent_id] = lc
        self._by_prefix[lc.ids["entry"][:-2]] = lc

    @property
    def closing_failed(self) -> list[Lifecycle]:
        return [lc for lc in self.lifecycles.values() if lc.state == State.CLOSING and lc.close_tries > 0]

    # -- the lifecycle -----------------------------------------------------------------------------------------------
    def _to(self, lc: Lifecycle, state: State, reason: str = "") -> None:
        """Make and persist a transition; it is on the broker before the caller's next exchange call."""
        previous = lc.state
        lc.state, lc.reason, lc.seq = state, reason or lc.reason, lc.seq + 1
        self.publisher.publish(LIFECYCLE_TOPIC, lc.record(self.rest.server_now_ms(), previous), key=lc.intent_id)
        undelivered = self.publisher.flush(10)
        if undelivered:
            log.error("%s: the %s transition is not on the broker yet (%d undelivered)", lc.intent_id, state,
                      undelivered)
        metrics.EXECUTION_TRANSITIONS.labels(str(state)).inc()
        unprotected = state in (State.FILLED, State.PROTECTING) or (state == State.CLOSING and lc.action == "OPEN")
        metrics.POSITION_UNPROTECTED.labels(lc.symbol).set(1 if unprotected else 0)
        log.info("%s %s: %s → %s %s", lc.symbol, lc.intent_id, previous, state, reason)

    async def execute(self, order: dict) -> str:
        """Carry out one intent (a replayed one resumes its lifecycle); returns the outcome, also counted."""
        async with self._lock:
            lc = self.lifecycles.get(order["intent_id"])
            if lc is None:
                lc = Lifecycle.from_order(order)
                self._remember(lc)
            if lc.state == State.PENDING:
                self._admit(lc)
            await self._drive(lc)
        outcome = OUTCOMES.get(lc.state, str(lc.state).lower())
        metrics.BINANCE_ORDERS.labels(outcome).inc()
        return outcome

    def _admit(self, lc: Lifecycle) -> None:
        """Checks before anything is sent: an intent that fails one is REJECTED or EXPIRED, with a risk event."""
        if lc.action == "CLOSE":
            self._to(lc, State.CLOSING, "close intent")
            return
        rules = self.rules.get(lc.symbol)
        qty = rules.quantity(lc.quantity) if rules else Decimal(0)
        age_s = (self.rest.server_now_ms() - lc.intent_time) / 1000
        if lc.intent_time and age_s > self.config.max_intent_age_s:
            self._to(lc, State.EXPIRED, f"intent {age_s:.0f} s old (limit {self.config.max_intent_age_s:.0f} s)")
            self.report_risk("intent_expired", "warning", lc, {"reason": lc.reason, "age_s": round(age_s, 1)})
            return
        problem = ("unknown symbol" if rules is None else "no stop_loss" if lc.stop_loss is None
                   else f"quantity {lc.quantity} below the minimum {rules.min_qty}" if qty < rules.min_qty
                   else f"closing {', '.join(c.symbol for c in self.closing_failed)} is failing: no new entries"
                   if self.closing_failed else None)
        if problem:
            self._to(lc, State.REJECTED, problem)
            self.report_risk("order_rejected", "warning", lc, {"reason": problem})

    async def _drive(self, lc: Lifecycle) -> None:
        """Step the lifecycle until it rests (PROTECTED or terminal) or waits on the exchange (the maintenance loop
        takes it from there)."""
        for _ in range(12):  # each step changes the state or returns; the bound only guards against a loop
            before = (lc.state, lc.seq)
            if lc.state == State.PENDING:
                await self._send_entry(lc)
            elif lc.state in ENTRY_IN_DOUBT:
                await self._resolve_entry(lc)
            elif lc.state in (State.FILLED, State.PROTECTING):
                await self._protect(lc)
            elif lc.state == State.CLOSING:
                await self._close(lc)
            waiting = lc.next_try > time.monotonic()  # backing off: the maintenance loop tries again then
            if lc.state in TERMINAL or lc.state == State.PROTECTED or (lc.state, lc.seq) == before or waiting:
                return

    async def _send_entry(self, lc: Lifecycle) -> None:
        ids, rules = lc.ids, self.rules[lc.symbol]
        try:  # the leverage the risk guard sized the position and its liquidation distance with
            await self._prepare(lc.symbol, int(lc.leverage or self.leverage))
        except (BinanceError, UnknownOutcome) as exc:
            self._to(lc, State.REJECTED, f"margin type / leverage not set: {exc}")
            self.report_risk("order_rejected", "warning", lc, {"reason": "prepare_failed", "error": str(exc)})
            return
        existing = await self._lookup_order(lc.symbol, ids["entry"])
        if existing is not None:  # sent before this lifecycle was persisted (a crash in between)
            self._to(lc, State.ENTRY_SENT, "entry found on the exchange")
            self._entry_answer(lc, existing)
            return
        self._to(lc, State.ENTRY_SENT, "entry sent")
        try:
            answer = await self.rest.signed("POST", "/fapi/v1/order", {
                "symbol": lc.symbol, "side": lc.side, "type": "MARKET", "quantity": plain(rules.quantity(lc.quantity)),
                "newClientOrderId": ids["entry"], "newOrderRespType": "RESULT"})
        except UnknownOutcome as exc:
            self._to(lc, State.ENTRY_UNKNOWN, f"entry outcome unknown: {exc}")
            return
        except BinanceError as exc:
            if exc.code == DUPLICATED_CLIENT_ORDER_ID:  # ours is open on the exchange: look it up
                self._to(lc, State.ENTRY_UNKNOWN, "entry client id already open")
                return
            kind = "margin_insufficient" if exc.code == MARGIN_INSUFFICIENT else "entry_failed"
            self._to(lc, State.REJECTED, f"{kind}: {exc.msg}")
            self.report_risk("order_rejected", "warning", lc, {"reason": kind, "code": exc.code, "msg": exc.msg})
            return
        self._entry_answer(lc, answer)

    def _entry_answer(self, lc: Lifecycle, order: dict) -> None:
        """What the exchange says of the entry: filled (even partly) → FILLED; done with nothing → REJECTED."""
        filled = Decimal(order.get("executedQty") or "0")
        if filled > 0:
            lc.filled_qty = str(filled)
            self._to(lc, State.FILLED, f"entry {order.get('status', 'FILLED')} {filled}")
        elif order.get("status") in ("CANCELED", "EXPIRED", "REJECTED", "EXPIRED_IN_MATCH"):
            self._to(lc, State.REJECTED, f"entry {order['status']} unfilled")
            self.report_risk("entry_not_filled", "warning", lc, {"reason": f"entry {order['status']}"})
        elif lc.state != State.ENTRY_UNKNOWN:
            self._to(lc, State.ENTRY_UNKNOWN, f"entry {order.get('status')} not filled yet")

    async def _resolve_entry(self, lc: Lifecycle) -> None:
        """Look an entry in doubt up by its client id, with backoff, for `unknown_lookup_s`; never send it again."""
        deadline, delay = time.monotonic() + self.config.unknown_lookup_s, 0.25
        while True:
            try:
                found = await self._lookup_order(lc.symbol, lc.ids["entry"])
            except (BinanceError, UnknownOutcome) as exc:
                log.warning("%s: entry lookup failed (%s); trying again", lc.intent_id, exc)
                found = None
            if found is not None:
                self._entry_answer(lc, found)
                if lc.state not in ENTRY_IN_DOUBT:
                    return
            if time.monotonic() + delay > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        age_s = (self.rest.server_now_ms() - lc.intent_time) / 1000
        if age_s > self.config.unknown_give_up_s:
            self._to(lc, State.EXPIRED, f"entry outcome unknown and not found for {age_s:.0f} s; never re-sent")
            self.report_risk("intent_expired", "warning", lc, {"reason": lc.reason})
        elif lc.state == State.ENTRY_SENT:
            self._to(lc, State.ENTRY_UNKNOWN, "entry not found yet")

    async def _protect(self, lc: Lifecycle) -> None:
        """Make the intent's stop-loss and take-profit stand, matching the position; close if they cannot."""
        if lc.state != State.PROTECTING:
            self._to(lc, State.PROTECTING, "placing protection")
        try:
            amount = await self._position(lc.symbol)
            if amount == 0:  # closed meanwhile (a stop, a close, a liquidation): nothing to protect
                await self._cancel_protection(lc)
                self._to(lc, State.CLOSED, "position flat")
                return
            if (amount > 0) != (lc.side == "BUY"):
                self.report_risk("unprotected_position", "critical", lc, {
                    "amount": str(amount), "action": "closed at market", "reason": "position against the intent"})
                self._to(lc, State.CLOSING, f"position {amount} is against the intent's side")
                return
            mine = await self._standing_protection(lc)
            for leg, kind, trigger in self._legs(lc):
                if mine.get(leg) is None:
                    await self._place_leg(lc, leg, kind, trigger)
        except BinanceError as exc:  # a definite refusal (-2021 would trigger, -2022 reduce-only, …)
            lc.protect_tries += 1
            await self._protection_failed(lc, str(exc))
            return
        except UnknownOutcome as exc:
            lc.next_try = time.monotonic() + 1.0
            log.warning("%s: protection outcome unknown (%s); the maintenance loop goes on", lc.intent_id, exc)
            return
        self._to(lc, State.PROTECTED, "stop-loss and take-profit standing")

    def _legs(self, lc: Lifecycle) -> list[tuple[str, str, float]]:
        legs = [("sl", "STOP_MARKET", lc.stop_loss), ("tp", "TAKE_PROFIT_MARKET", lc.take_profit)]
        return [(leg, kind, trigger) for leg, kind, trigger in legs if trigger is not None]

    async def _standing_protection(self, lc: Lifecycle) -> dict[str, dict]:
        """The intent's protective orders that match the position (others of ours are cancelled)."""
        rules = self.rules[lc.symbol]
        algos = await self.rest.get("/fapi/v1/openAlgoOrders", {"symbol": lc.symbol}, signed=True)
        standing: dict[str, dict] = {}
        for leg, kind, trigger in self._legs(lc):
            for a in (a for a in algos if a["clientAlgoId"].startswith(lc.ids[leg])):
                matches = (a["orderType"] == kind and a["side"] == lc.exit_side and bool(a["closePosition"])
                           and Decimal(a["triggerPrice"]) == rules.price(trigger) and leg not in standing)
                if matches:
                    standing[leg] = a
                else:
                    log.warning("%s: %s %s does not match the position: cancelled", lc.intent_id, leg,
                                a["clientAlgoId"])
                    await self._cancel_algo(lc.symbol, a["clientAlgoId"])
        return standing

    async def _place_leg(self, lc: Lifecycle, leg: str, kind: str, trigger: float) -> None:
        """Place one protective order; after an unknown outcome look it up before placing it again."""
        client_id = numbered(lc.ids[leg], lc.protect_tries)
        params = {"algoType": "CONDITIONAL", "symbol": lc.symbol, "side": lc.exit_side, "type": kind,
                  "triggerPrice": plain(self.rules[lc.symbol].price(trigger)), "workingType": "MARK_PRICE",
                  "closePosition": "true", "clientAlgoId": client_id}
        for attempt in range(1, self.config.place_attempts + 1):
            found = await self._lookup_algo(lc.symbol, client_id)
            if found is not None and found.get("algoStatus") in OPEN_ALGO:
                return
            if found is not None:  # this round's id is spent (cancelled, rejected, expired): the next round's
                lc.protect_tries += 1
                client_id = params["clientAlgoId"] = numbered(lc.ids[leg], lc.protect_tries)
            try:
                await self.rest.signed("POST", "/fapi/v1/algoOrder", params)
                return
            except UnknownOutcome as exc:
                log.warning("%s %s: outcome unknown (%s); looking it up", lc.intent_id, client_id, exc)
            except BinanceError as exc:
                if exc.code != DUPLICATED_CLIENT_ORDER_ID:
                    raise
            await asyncio.sleep(0.2 * 2 ** attempt)
        if await self._lookup_algo(lc.symbol, client_id) is None:
            raise UnknownOutcome(f"{client_id}: no answer after {self.config.place_attempts} attempts")

    async def _protection_failed(self, lc: Lifecycle, error: str) -> None:
        if lc.protect_tries < self.config.protect_rounds and "-2021" not in error:
            log.warning("%s: protection refused (%s); placing it again (round %d)", lc.intent_id, error,
                        lc.protect_tries)
            self._to(lc, State.PROTECTING, f"protection refused: {error}")
            return
        self.report_risk("protection_failed", "critical", lc, {"error": error, "action": "closed at market"})
        self._to(lc, State.CLOSING, f"protection failed: {error}")

    async def _close(self, lc: Lifecycle) -> None:
        """Close the symbol's position at market until it is flat, then cancel its protection."""
        attempts = 0
        while True:
            try:
                amount = await self._position(lc.symbol)
                if amount == 0:
                    await self._flat(lc)
                    return
                client_id = numbered(lc.ids["close"], lc.close_tries)
                log.warning("%s: closing %s at market (%s)", lc.symbol, amount, lc.reason)
                await self.rest.signed("POST", "/fapi/v1/order", {
                    "symbol": lc.symbol, "side": "SELL" if amount > 0 else "BUY", "type": "MARKET",
                    "quantity": plain(abs(amount)), "reduceOnly": "true", "newClientOrderId": client_id,
                    "newOrderRespType": "RESULT"})
                lc.close_tries += 1  # the next close, if one is needed, has an id of its own
                continue
            except (BinanceError, UnknownOutcome) as exc:  # reduce-only: a close that did execute cannot flip
                lc.close_tries += 1
                attempts += 1
                self.report_risk("close_failed", "critical", lc, {
                    "error": str(exc), "tries": lc.close_tries, "action": "retrying until flat; no new entries"})
                self._to(lc, State.CLOSING, f"close failed: {exc}")
                backoff = min(0.2 * 2 ** lc.close_tries, self.config.close_backoff_max_s)
                if attempts >= 3:
                    lc.next_try = time.monotonic() + backoff
                    return
                await asyncio.sleep(backoff)

    async def _flat(self, lc: Lifecycle) -> None:
        """The symbol is flat: every lifecycle holding it is closed and its protection cancelled."""
        for other in [o for o in self.lifecycles.values() if o.symbol == lc.symbol and o.state in HOLDING]:
            if other is not lc:
                await self._cancel_protection(other)
                self._to(other, State.CLOSED, f"flat ({lc.intent_id})")
        await self._cancel_protection(lc)
        failed = lc.close_tries > 0 and lc.reason.startswith("close failed")
        self._to(lc, State.CLOSED, "position flat")
        if failed and not self.closing_failed:  # the risk guard's close_failed halt may lift
            self.report_risk("close_recovered", "info", lc, {"tries": lc.close_tries})

    async def _cancel_protection(self, lc: Lifecycle) -> None:
        if lc.action != "OPEN":
            return
        algos = await self.rest.get("/fapi/v1/openAlgoOrders", {"symbol": lc.symbol}, signed=True)
        prefix = lc.ids["entry"][:-2]
        for a in algos:
            if a["clientAlgoId"].startswith(prefix):
                await self._cancel_algo(lc.symbol, a["clientAlgoId"])

    # -- the user data stream ----------------------------------------------------------------------------------------
    async def on_user_event(self, msg: dict) -> None:
        """The exchange's word on our orders: a late entry fill gets protection, a protective order that is gone is
        replaced, a stop or take-profit that filled closes the lifecycle and cancels its sibling."""
        kind = msg.get("e")
        if kind not in ("ALGO_UPDATE", "ORDER_TRADE_UPDATE"):
            return
        o = msg.get("o") or {}
        client_id = o.get("caid") if kind == "ALGO_UPDATE" else o.get("c")
        lc = self._by_prefix.get((client_id or "").split("-")[0])
        if lc is None:
            return
        async with self._lock:
            if kind == "ORDER_TRADE_UPDATE":
                await self._on_order_update(lc, client_id, o)
            else:
                await self._on_algo_update(lc, client_id, o)

    async def _on_order_update(self, lc: Lifecycle, client_id: str, o: dict) -> None:
        if client_id != lc.ids["entry"]:
            return
        filled = Decimal(o.get("z") or "0")
        if filled > 0 and lc.state in (*ENTRY_IN_DOUBT, State.EXPIRED):
            lc.filled_qty = str(filled)
            self._to(lc, State.FILLED, f"entry fill seen on the user stream ({o.get('X')})")
            await self._drive(lc)
        elif o.get("X") in ("CANCELED", "EXPIRED", "REJECTED") and filled == 0 and lc.state in ENTRY_IN_DOUBT:
            self._to(lc, State.REJECTED, f"entry {o.get('X')} unfilled")
            self.report_risk("entry_not_filled", "warning", lc, {"reason": f"entry {o.get('X')}"})

    async def _on_algo_update(self, lc: Lifecycle, client_id: str, o: dict) -> None:
        status = o.get("X")
        if client_id in self._cancelling and status == "CANCELED":
            self._cancelling.discard(client_id)
            return
        if lc.state not in (State.PROTECTING, State.PROTECTED):
            return
        if status in GONE_ALGO:
            lc.protect_tries += 1
            log.warning("%s: protective order %s %s by the exchange", lc.intent_id, client_id, status)
            self.report_risk("protection_lost", "warning", lc, {"client_algo_id": client_id, "status": status,
                                                                 "action": "replacing"})
            if lc.protect_tries >= self.config.protect_rounds + 1:
                await self._protection_failed(lc, f"{client_id} {status}, {lc.protect_tries} rounds")
            else:
                self._to(lc, State.PROTECTING, f"{client_id} {status}")
            await self._drive(lc)
        elif status == "FINISHED":  # the triggered order filled: flat → the sibling goes
            if await self._position(lc.symbol) == 0:
                self._to(lc, State.CLOSING, f"{client_id} filled")
                await self._drive(lc)
            else:  # not flat (partly filled?): make protection match what is left
                self._to(lc, State.PROTECTING, f"{client_id} filled, position left")
                await self._drive(lc)

    # -- maintenance and reconciliation ------------------------------------------------------------------------------
    async def maintain(self) -> None:
        """For ever: drive lifecycles that wait on the exchange, and reconcile every `reconcile_interval_s`."""
        next_reconcile = time.monotonic() + self.config.reconcile_interval_s
        while True:
            await asyncio.sleep(self.config.maintenance_interval_s)
            try:
                for lc in [lc for lc in self.lifecycles.values() if lc.state not in TERMINAL
                           and lc.state != State.PROTECTED and lc.next_try <= time.monotonic()]:
                    async with self._lock:
                        if lc.state not in TERMINAL:
                            await self._drive(lc)
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + self.config.reconcile_interval_s
                    await self.reconcile()
            except (BinanceError, UnknownOutcome) as exc:
                log.warning("maintenance: %s; next round in %.0f s", exc, self.config.maintenance_interval_s)

    async def reconcile(self) -> dict:
        async with self._lock:
            return await self._reconcile()

    async def _reconcile(self) -> dict:
        risk = await self.rest.get("/fapi/v2/positionRisk", signed=True)
        positions = {p["symbol"]: Decimal(p["positionAmt"]) for p in risk}
        algos = await self.rest.get("/fapi/v1/openAlgoOrders", signed=True)
        orders = await self.rest.get("/fapi/v1/openOrders", signed=True)
        summary: dict[str, list[str]] = {"protected": [], "closed": [], "cancelled": []}
        for symbol in self.symbols:
            amount = positions.get(symbol, Decimal(0))
            owner = self._owner(symbol)
            if amount != 0:
                if owner is None:
                    lc = Lifecycle(f"reconcile-close:{symbol}:{self.rest.server_now_ms()}", symbol, action="CLOSE")
                    self._remember(lc)
                    self.report_risk("unprotected_position", "critical", lc,
                                     {"amount": str(amount), "action": "closed at market"})
                    self._to(lc, State.CLOSING, "a position no intent owns")
                    await self._drive(lc)
                    summary["closed"].append(symbol)
                    continue
                if owner.state in ENTRY_IN_DOUBT or owner.state == State.EXPIRED:
                    await self._resolve_entry(owner)  # the position says the entry filled: find it
                if owner.state == State.PROTECTED:  # protection must match the position, not merely exist
                    standing = await self._standing_protection(owner)
                    if all(leg in standing for leg, _, _ in self._legs(owner)):
                        continue
                    self._to(owner, State.PROTECTING, "reconciliation: protection missing or not matching")
                if owner.state in (State.FILLED, State.PROTECTING):
                    await self._drive(owner)
                    summary["protected"].append(symbol)
                    self.report_risk("unprotected_position", "warning", owner,
                                     {"amount": str(amount), "action": "protected", "state": str(owner.state)})
                elif owner.state == State.CLOSING:
                    await self._drive(owner)
            else:
                for a in (a for a in algos if a["symbol"] == symbol):  # protection of a position that is gone
                    await self._cancel_algo(symbol, a["clientAlgoId"])
                    summary["cancelled"].append(a["clientAlgoId"])
                    self.report_risk("orphan_order_cancelled", "warning", Lifecycle(a["clientAlgoId"], symbol),
                                     {"client_algo_id": a["clientAlgoId"], "type": a["orderType"]})
                for o in (o for o in orders if o["symbol"] == symbol):
                    await self._cancel_order(symbol, o["clientOrderId"])
                    summary["cancelled"].append(o["clientOrderId"])
                    self.report_risk("orphan_order_cancelled", "warning", Lifecycle(o["clientOrderId"], symbol),
                                     {"client_order_id": o["clientOrderId"], "type": o["type"]})
                for lc in [lc for lc in self.lifecycles.values() if lc.symbol == symbol and lc.state in HOLDING]:
                    self._to(lc, State.CLOSED, "flat at reconciliation")
        await self._publish_account(positions)
        log.info("reconciled with the exchange: %s", summary)
        return summary

    def _owner(self, symbol: str) -> Lifecycle | None:
        """The intent a position of `symbol` belongs to: the newest one that holds or may hold it."""
        candidates = [lc for lc in self.lifecycles.values() if lc.symbol == symbol and lc.action == "OPEN"
                      and (lc.state in HOLDING or lc.state in ENTRY_IN_DOUBT
                           or (lc.state == State.EXPIRED and "unknown" in lc.reason))]
        return max(candidates, key=lambda lc: lc.intent_time, default=None)

    async def _publish_account(self, positions: dict[str, Decimal]) -> None:
        """The exchange's account for the risk guard's book: the exchange wins."""
        try:
            balances = await self.rest.get("/fapi/v2/balance", signed=True)
        except (BinanceError, UnknownOutcome) as exc:
            log.warning("account balance not read (%s): no account snapshot this time", exc)
            return
        usdt = next((b for b in balances if b.get("asset") == "USDT"), None)
        detail = {"positions": {s: str(a) for s, a in sorted(positions.items()) if a != 0},
                  "balance": str(usdt["balance"]) if usdt else None}
        now = self.rest.server_now_ms()
        self.publisher.publish("risk.events", risk_record("account_snapshot", "info", "", now, detail, now))

    # -- exchange calls ----------------------------------------------------------------------------------------------
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

    async def _position(self, symbol: str) -> Decimal:
        risk = await self.rest.get("/fapi/v2/positionRisk", {"symbol": symbol}, signed=True)
        return sum((Decimal(p["positionAmt"]) for p in risk if p["symbol"] == symbol), Decimal(0))

    async def _lookup_order(self, symbol: str, client_id: str) -> dict | None:
        return await self._lookup("/fapi/v1/order", {"symbol": symbol, "origClientOrderId": client_id})

    async def _lookup_algo(self, symbol: str, client_id: str) -> dict | None:
        return await self._lookup("/fapi/v1/algoOrder", {"symbol": symbol, "clientAlgoId": client_id})

    async def _lookup(self, path: str, params: dict) -> dict | None:
        try:
            return await self.rest.get(path, params, signed=True)
        except BinanceError as exc:
            if exc.code == ORDER_DOES_NOT_EXIST:
                return None
            raise

    async def _cancel_algo(self, symbol: str, client_algo_id: str) -> None:
        """Cancel until the exchange says it is gone (an unknown outcome is looked up)."""
        self._cancelling.add(client_algo_id)
        for attempt in range(1, 4):
            try:
                await self.rest.signed("DELETE", "/fapi/v1/algoOrder", {"symbol": symbol,
                                                                        "clientAlgoId": client_algo_id})
                return
            except BinanceError as exc:
                if exc.code in (ORDER_DOES_NOT_EXIST, UNKNOWN_ORDER):  # already gone: fine
                    return
                raise
            except UnknownOutcome as exc:
                found = await self._lookup_algo(symbol, client_algo_id)
                if found is None or found.get("algoStatus") not in OPEN_ALGO:
                    return
                log.warning("cancel of %s: %s; still open, again", client_algo_id, exc)
                await asyncio.sleep(0.2 * 2 ** attempt)
        raise UnknownOutcome(f"cancel of {client_algo_id}: still open after 3 attempts")

    async def _cancel_order(self, symbol: str, client_order_id: str) -> None:
        try:
            await self.rest.signed("DELETE", "/fapi/v1/order", {"symbol": symbol,
                                                                "origClientOrderId": client_order_id})
        except BinanceError as exc:
            if exc.code not in (ORDER_DOES_NOT_EXIST, UNKNOWN_ORDER):
                raise

    def report_risk(self, kind: str, severity: str, lc: Lifecycle, detail: dict) -> None:
        log.warning("risk event %s (%s) %s: %s", kind, severity, lc.symbol, detail)
        self.publisher.publish("risk.events", risk_record(kind, severity, lc.symbol, self.rest.server_now_ms(),
                                                          {"intent_id": lc.intent_id, **detail}, lc.intent_id,
                                                          lc.seq))


class OrderConsumer:
    """`orders` → Executor, committing each intent's offset after its lifecycle was persisted and driven as far as
    the exchange allowed (at-least-once; a replayed intent resumes its lifecycle). Trading waits while `ready` is not
    set."""

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
                    except DecodeError as exc:
                        self.executor.publisher.dead_letter(self.topic, m.value() or b"", exc.reason, exc.detail)
                    else:
                        try:
                            await self.executor.execute(order)
                        except (BinanceError, UnknownOutcome) as exc:  # its lifecycle waits; maintenance goes on
                            lc = self.executor.lifecycles.get(order["intent_id"]) or Lifecycle.from_order(order)
                            self.executor.report_risk("order_failed", "critical", lc, {"error": str(exc)})
                    self.consumer.commit(message=m, asynchronous=False)
                    self.handled += 1
        finally:
            await asyncio.to_thread(self.consumer.close)
