"""The risk guard: the last word on every signal. Pure and deterministic — no Kafka inside; the risk agent feeds it
`signals`, `user.events`, the connectors' `risk.events` and operator commands from `control`, in arrival order,
and sends what it answers.

What it keeps (the `Book`, saved whole in the agent's changelog-backed table):
- the account from `user.events`: the wallet balance of the newest ACCOUNT_UPDATE, each position's quantity,
  entry and isolated margin; unrealized PnL marked at the newest close its signals carried; peak equity; the
  equity at the start of the UTC day (event time) for the daily loss;
- positions from the moment an entry is approved (`pending`), not from its fill: a signal of the next bar must not
  open a second position because the fill is still on its way;
- the trading state RUNNING / REDUCE_ONLY / HALTED: the strictest of the held state and the automatic halts. The held
  state is set by operators (`control`, the watchdog's HALT included) and by the guard's own loss halts (daily loss,
  drawdown), and only an operator lifts it; an automatic halt (the user data stream down) is lifted by its own
  all-clear and by nothing else, so a user-stream roll never undoes an operator's REDUCE_ONLY;
- the closes it asked for: a position still in the book `close_retry_ms` after its CLOSE gets the CLOSE again, under
  a new intent id, until it is flat;
- the exchange's word after a reconnect (`account_snapshot`): positions and balance are made to match it.

Each signal gets exactly one verdict: APPROVED (a FLAT signal with action NONE, an entry with action OPEN and its
order intent) or REJECTED with every rule it violates. Closing is never refused: a HALT or a liquidation-distance
breach closes positions with reduce-only CLOSE intents whose ids are deterministic, so asking twice is one order.

Times: the rules run in event time (a signal's bar close), so a replay gives the verdicts live gave; only a live
source's staleness is measured against the wall clock.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from connectors.binance.execution import client_ids
from connectors.binance.rules import Bracket, bundled_brackets
from schemas import event_ids

RUNNING, REDUCE_ONLY, HALTED = "RUNNING", "REDUCE_ONLY", "HALTED"
STATES = (RUNNING, REDUCE_ONLY, HALTED)
APPROVED, REJECTED = "APPROVED", "REJECTED"
DAY_MS = 86_400_000
KEEP_VERDICTS = 16  # per symbol: a signal delivered again after a crash gets the verdict it got the first time
LIVE_SOURCES = ("binance",)  # sources whose data must be fresh by the wall clock
TRADING_ENTITY = "trading"  # the `control` entity of the trading state
# automatic halts (connectors' risk.events kinds) and the all-clear that lifts each. (The watchdog's chain_stalled is
# not one: it HALTs on `control`, as an operator would, and only an operator trades again after a stall.)
# automatic halts, each lifted only by its own all-clear: the account unobserved, a close the exchange keeps refusing
AUTO_HALTS = {"user_stream_down": "user_stream_restored", "close_failed": "close_recovered"}
LOSS_HALTS = ("daily_loss", "drawdown")  # the guard's own HALTs: flatten, and stay until an operator acts
ENTRY_FAILURES = ("order_rejected", "intent_expired", "entry_not_filled")  # the execution connector's: never filled
STRICTNESS = {RUNNING: 0, REDUCE_ONLY: 1, HALTED: 2}


@dataclass(frozen=True)
class Limits:
    """The rules' thresholds (settings `risk_*`; defaults from the seeds)."""

    max_margin_usage: float = 0.70
    daily_loss: float = 0.02  # today's loss ≥ 2 % of the day's starting equity → flatten and HALT
    max_drawdown: float = 0.15  # 1 − equity / peak ≥ 15 % → flatten and HALT
    min_liq_distance_atr: float = 2.0  # before entry, and the running monitor
    max_funding_rate: float = 0.01  # |rate| above this, against the side, rejects
    max_symbol_exposure: float = 0.20  # isolated margin on one symbol / equity: what an isolated position can lose
    fat_finger_multiple: float = 10.0  # notional > this × the average approved notional rejects
    fat_finger_min_samples: int = 5
    max_orders_per_minute: int = 10
    cooldown_ms: int = 60_000
    max_bar_lag_ms: int = 600_000  # a signal this far behind the newest bar seen is stale data
    live_stale_ms: int = 30_000  # live sources: wall clock − the signal's bar close
    allow_pyramiding: bool = False
    initial_equity: float = 10_000.0  # until the first ACCOUNT_UPDATE says otherwise
    close_retry_ms: int = 60_000  # a position still there this long after its CLOSE gets the CLOSE again


@dataclass
class Position:
    intent_id: str
    side: int  # +1 long, −1 short
    quantity: float
    entry: float
    leverage: int
    margin: float  # isolated margin
    status: str = "pending"  # pending (approved, not filled) → open
    closing: str = ""  # the reason a CLOSE was asked for ("" = none)
    partition: int = 0
    close_attempts: int = 0  # CLOSE intents sent for it
    close_time: int = 0  # the guard's clock when the newest was sent
    updated: int = 0  # event time of the newest exchange news of it (a fill, an ACCOUNT_UPDATE, a snapshot)


@dataclass
class Mark:
    close: float
    atr: float | None
    event_time: int
    partition: int


@dataclass
class Book:
    state: str = RUNNING  # in effect: the strictest of `held_state` and the automatic halts
    state_reason: str = ""
    held_state: str = RUNNING  # an operator's, or the guard's own loss HALT: lifted only by an operator
    held_reason: str = ""
    held_flatten: bool = False  # the held HALT flattens: a position found later is closed too
    auto_halts: list[str] = field(default_factory=list)  # active automatic halts (AUTO_HALTS), each lifted by its own
    clock: int = 0  # the newest time seen: event time, the wall clock when trading an account (close retries)
    control_time: int = 0  # event_time of the last `control` record applied
    balance: float | None = None
    balance_time: int = 0
    peak_equity: float = 0.0
    day: int = -1
    day_start_equity: float = 0.0
    newest_bar: int = 0
    positions: dict[str, Position] = field(default_factory=dict)
    marks: dict[str, Mark] = field(default_factory=dict)
    order_times: list[int] = field(default_factory=list)  # event times of the orders of the last minute
    cooldown_until: int = 0
    notional_sum: float = 0.0
    notional_count: int = 0
    user_stream_up: bool = True
    recent: dict[str, list[dict]] = field(default_factory=dict)  # symbol → its newest verdicts (redeliveries)
    flat_since: dict[str, int] = field(default_factory=dict)  # symbol → event time the exchange said it went flat

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def loads(cls, text: str | dict) -> Book:
        raw = json.loads(text) if isinstance(text, str) else dict(text)
        raw["positions"] = {s: Position(**p) for s, p in raw["positions"].items()}
        raw["marks"] = {s: Mark(**m) for s, m in raw["marks"].items()}
        if "held_state" not in raw:  # a snapshot from before the held state: its one state, split
            automatic = raw.get("state") == HALTED and raw.get("state_reason") in AUTO_HALTS
            raw["auto_halts"] = [raw["state_reason"]] if automatic else []
            raw["held_state"] = RUNNING if automatic else raw.get("state", RUNNING)
            raw["held_reason"] = "" if automatic else raw.get("state_reason", "")
            raw["held_flatten"] = raw["held_state"] == HALTED and raw["held_reason"] in LOSS_HALTS
        return cls(**raw)


@dataclass
class Outputs:
    verdicts: list[dict] = field(default_factory=list)
    orders: list[tuple[int, dict]] = field(default_factory=list)  # (partition, order)
    risk_events: list[tuple[int, dict]] = field(default_factory=list)
    control: list[dict] = field(default_factory=list)  # trading-state records for `control`


class RiskGuard:
    def __init__(self, limits: Limits | None = None, book: Book | None = None,
                 brackets: dict[str, list[Bracket]] | None = None):
        self.limits = limits or Limits()
        self.book = book or Book()
        self.brackets = brackets if brackets is not None else bundled_brackets()
        self.out = Outputs()

    def take_outputs(self) -> Outputs:
        out, self.out = self.out, Outputs()
        return out

    # -- account figures ---------------------------------------------------------------------------------------------
    def equity(self) -> float:
        b = self.book
        balance = self.limits.initial_equity if b.balance is None else b.balance
        return balance + sum(self._unrealized(s, p) for s, p in b.positions.items())

    def _unrealized(self, symbol: str, pos: Position) -> float:
        mark = self.book.marks.get(symbol)
        if pos.status != "open" or mark is None:
            return 0.0
        return pos.side * pos.quantity * (mark.close - pos.entry)

    def margin_used(self) -> float:
        return sum(p.margin for p in self.book.positions.values())

    def drawdown(self) -> float:
        peak = self.book.peak_equity
        return 1.0 - self.equity() / peak if peak > 0 else 0.0

    def daily_pnl(self) -> float:
        start = self.book.day_start_equity
        return self.equity() / start - 1.0 if start > 0 else 0.0

    def liq_price(self, symbol: str) -> float | None:
        pos = self.book.positions.get(symbol)
        tiers = self.brackets.get(symbol)
        if pos is None or pos.status != "open" or not tiers or pos.quantity <= 0:
            return None
        bracket = Bracket.for_notional(tiers, pos.quantity * pos.entry)
        q = pos.quantity
        return (pos.margin + bracket.cum - pos.side * q * pos.entry) / (q * bracket.mmr - pos.side * q)

    def liq_distance_atr(self, symbol: str) -> float | None:
        lp, mark = self.liq_price(symbol), self.book.marks.get(symbol)
        if lp is None or mark is None or not mark.atr:
            return None
        return abs(mark.close - lp) / mark.atr

    # -- inputs ------------------------------------------------------------------------------------------------------
    def signal(self, sig: dict, partition: int, now_ms: int, bar_passed_ms: int = 0) -> None:
        """One signal: mark its symbol, run the monitors, then give it its verdict. `bar_passed_ms`: how far past the
        signal's bar the (paper) exchange has already gone — an entry would fill that much later, at a price the
        signal never saw, so it is rejected (`bar_passed`)."""
        b, t, symbol = self.book, sig["event_time"], sig["symbol"]
        again = next((v for v in b.recent.get(symbol, []) if v["signal_id"] == sig["event_id"]), None)
        if again is not None:  # at-least-once: its effects are in the book already
            self.out.verdicts.append(dict(again))
            return
        if sig.get("close") is not None:
            b.marks[symbol] = Mark(sig["close"], sig.get("atr_14"), t, partition)
            held = b.positions.get(symbol)
            if held is not None and held.status == "open" and not held.entry:  # reconciled without a price
                held.entry = sig["close"]
                held.margin = held.margin or held.quantity * held.entry / max(held.leverage, 1)
        elif symbol in b.marks:
            b.marks[symbol].partition = partition
        b.newest_bar = max(b.newest_bar, t)
        b.clock = max(b.clock, t)
        # its own signal only: the paper desk fills a close at the symbol's next bar, applied before this signal
        # but not before another symbol's (a restarted worker may get those first) — that is no failed close
        self._retry_closes(symbol)
        self._roll_day(t)
        self._account_limits(t)
        self._liq_monitor(symbol, t)
        self._verdict(sig, partition, now_ms, bar_passed_ms)

    def user_event(self, ev: dict) -> None:
        kind = ev["event_type"]
        if kind == "ORDER_TRADE_UPDATE":
            self._order_update(ev)
        elif kind == "ACCOUNT_UPDATE":
            self._account_update(ev)

    def tick(self, now_ms: int) -> bool:
        """The agent's clock, when trading an account (the wall clock, on every batch and timer tick: a CLOSE is timed
        by it from the start): closes due are sent again. Whether it made anything to send."""
        self.book.clock = max(self.book.clock, now_ms)
        before = len(self.out.orders)
        self._retry_closes()
        return len(self.out.orders) > before

    def close_due(self, now_ms: int) -> bool:
        """Whether `tick(now_ms)` would send a close again (the clock moves on either way)."""
        self.book.clock = max(self.book.clock, now_ms)
        return any(self._retry_due(p) for p in self.book.positions.values())

    def connector_event(self, ev: dict) -> None:
        """A connector's risk event: the user data stream's health (down → HALT until it is back and reconciled),
        entries the exchange never filled, and the account as the exchange has it."""
        kind, t, b = ev["kind"], ev["event_time"], self.book
        if kind in AUTO_HALTS and kind not in b.auto_halts:
            b.auto_halts = sorted([*b.auto_halts, kind])
            b.user_stream_up = "user_stream_down" not in b.auto_halts
            self._update_state(t, kind)
        elif kind in AUTO_HALTS.values():
            cleared = [k for k, lift in AUTO_HALTS.items() if lift == kind and k in b.auto_halts]
            if cleared:
                b.auto_halts = [k for k in b.auto_halts if k not in cleared]
                b.user_stream_up = "user_stream_down" not in b.auto_halts
                self._update_state(t, kind)
        elif kind in ENTRY_FAILURES:
            self._entry_failed(ev)
        elif kind == "account_snapshot":
            self._reconcile(ev)

    def control(self, rec: dict) -> bool:
        """An operator's command on `control` (entity `trading`): newer than the last one applied → applied."""
        if rec["entity"] != TRADING_ENTITY or rec["event_time"] <= self.book.control_time:
            return False
        value = json.loads(rec["value"])
        state = value.get("state")
        if state not in STATES:
            return False
        self.book.control_time = rec["event_time"]
        if rec.get("actor") == "risk":  # the guard's own record, read back: already in effect
            return False
        self._hold(state, value.get("reason") or f"operator {rec.get('actor', '')}".strip(),
                   self._event_now(), flatten=bool(value.get("flatten")), publish=False)
        return True

    # -- verdicts ----------------------------------------------------------------------------------------------------
    def _verdict(self, sig: dict, partition: int, now_ms: int, bar_passed_ms: int) -> None:
        b, symbol, t = self.book, sig["symbol"], sig["event_time"]
        verdict = {"event_id": event_ids.verdict(symbol, sig["interval"], sig["open_time"]), "event_time": t,
                   "symbol": symbol, "source": sig["source"], "interval": sig["interval"],
                   "open_time": sig["open_time"], "signal_id": sig["event_id"], "decision": sig["decision"],
                   "verdict": APPROVED, "action": "NONE", "violations": [], "intent_id": None,
                   "trading_state": b.state, "equity": self.equity(), "margin_usage": 0.0,
                   "daily_pnl_ratio": self.daily_pnl(), "drawdown_ratio": self.drawdown(), "detail": ""}
        if sig["decision"] == "FLAT" or sig.get("side") is None:
            verdict["margin_usage"] = self._usage(0.0)
            self._decided(verdict)
            return
        margin = (sig["notional"] or 0.0) / max(sig["leverage"] or 1, 1)
        verdict["margin_usage"] = self._usage(margin)
        detail = self._violations(sig, margin, now_ms, bar_passed_ms)
        if detail:
            verdict.update(verdict=REJECTED, violations=sorted(detail), detail=json.dumps(detail, sort_keys=True))
        else:
            intent = event_ids.open_intent(symbol, sig["interval"], sig["open_time"])
            side = 1 if sig["side"] == "BUY" else -1
            b.positions[symbol] = Position(intent, side, sig["quantity"], sig["entry_price"], sig["leverage"], margin,
                                           partition=partition)
            b.notional_sum += sig["notional"]
            b.notional_count += 1
            self._order(partition, {"event_id": event_ids.order(intent), "event_time": t, "symbol": symbol,
                                    "intent_id": intent, "action": "OPEN", "side": sig["side"],
                                    "quantity": sig["quantity"], "stop_loss": sig["stop_loss"],
                                    "take_profit": sig["take_profit"], "leverage": sig["leverage"],
                                    "signal_id": sig["event_id"], "reason": "entry", "source": sig["source"]})
            verdict.update(action="OPEN", intent_id=intent)
        self._decided(verdict)

    def _decided(self, verdict: dict) -> None:
        recent = self.book.recent.setdefault(verdict["symbol"], [])
        recent.append(verdict)
        del recent[:-KEEP_VERDICTS]
        self.out.verdicts.append(verdict)

    def _usage(self, new_margin: float) -> float:
        equity = self.equity()
        return (self.margin_used() + new_margin) / equity if equity > 0 else float("inf")

    def _violations(self, sig: dict, margin: float, now_ms: int, bar_passed_ms: int) -> dict[str, Any]:
        """Every rule the entry breaks, with the figures that break it."""
        b, lim, symbol, t = self.book, self.limits, sig["symbol"], sig["event_time"]
        v: dict[str, Any] = {}
        if b.state == HALTED:
            v["halted"] = b.state_reason
        elif b.state == REDUCE_ONLY:
            v["reduce_only"] = b.state_reason
        if bar_passed_ms > 0:
            v["bar_passed"] = {"exchange_ahead_ms": bar_passed_ms}
        if sig["source"] in LIVE_SOURCES:  # replayed data is old by definition: staleness is a live question
            if now_ms - t > lim.live_stale_ms:
                v["stale_data"] = {"age_ms": now_ms - t}
            elif b.newest_bar - t > lim.max_bar_lag_ms:
                v["stale_data"] = {"behind_newest_bar_ms": b.newest_bar - t}
            if not b.user_stream_up:
                v["user_stream_down"] = True
        equity = self.equity()
        usage = self._usage(margin)
        if usage > lim.max_margin_usage:
            v["margin_usage"] = {"usage": round(usage, 6), "limit": lim.max_margin_usage}
        if -self.daily_pnl() >= lim.daily_loss:
            v["daily_loss"] = {"daily_pnl": round(self.daily_pnl(), 6), "limit": lim.daily_loss}
        if self.drawdown() >= lim.max_drawdown:
            v["drawdown"] = {"drawdown": round(self.drawdown(), 6), "limit": lim.max_drawdown}
        liq = sig.get("liq_distance_atr")
        if liq is None or liq < lim.min_liq_distance_atr:
            v["liq_distance"] = {"atr": liq, "limit": lim.min_liq_distance_atr}
        rate, side = sig.get("funding_rate") or 0.0, 1 if sig["side"] == "BUY" else -1
        if abs(rate) > lim.max_funding_rate and side * rate > 0:  # longs pay a positive rate, shorts a negative one
            v["extreme_funding"] = {"rate": rate, "limit": lim.max_funding_rate}
        held = b.positions.get(symbol)
        if held is not None and not lim.allow_pyramiding:
            v["position_open"] = held.intent_id
        exposure = (margin + (held.margin if held is not None else 0.0)) / equity if equity > 0 else float("inf")
        if exposure > lim.max_symbol_exposure:
            v["symbol_exposure"] = {"exposure": round(exposure, 6), "limit": lim.max_symbol_exposure}
        if b.notional_count >= lim.fat_finger_min_samples:
            average = b.notional_sum / b.notional_count
            if sig["notional"] > lim.fat_finger_multiple * average:
                v["fat_finger"] = {"notional": sig["notional"], "average": round(average, 2)}
        recent = [x for x in b.order_times if x > t - 60_000]
        if t < b.cooldown_until or len(recent) >= lim.max_orders_per_minute:
            if t >= b.cooldown_until:
                b.cooldown_until = t + lim.cooldown_ms
            v["order_rate"] = {"orders_last_minute": len(recent), "cooldown_until": b.cooldown_until}
        if not sig.get("quantity") or not sig.get("entry_price") or sig.get("stop_loss") is None \
                or sig.get("take_profit") is None:
            v["incomplete_order"] = True  # never an entry without both protective orders
        return v

    # -- monitors ----------------------------------------------------------------------------------------------------
    def _roll_day(self, t: int) -> None:
        b = self.book
        day = t // DAY_MS
        if day != b.day:
            b.day, b.day_start_equity = day, self.equity()
        b.peak_equity = max(b.peak_equity, self.equity())

    def _account_limits(self, t: int) -> None:
        if self.book.held_state == HALTED:  # (an automatic halt does not flatten: a loss still must)
            return
        if -self.daily_pnl() >= self.limits.daily_loss:
            self._hold(HALTED, "daily_loss", t, flatten=True,
                       detail={"daily_pnl": self.daily_pnl(), "limit": self.limits.daily_loss})
        elif self.drawdown() >= self.limits.max_drawdown:
            self._hold(HALTED, "drawdown", t, flatten=True,
                       detail={"drawdown": self.drawdown(), "limit": self.limits.max_drawdown})

    def _liq_monitor(self, symbol: str, t: int) -> None:
        distance = self.liq_distance_atr(symbol)
        pos = self.book.positions.get(symbol)
        if distance is not None and pos is not None and distance < self.limits.min_liq_distance_atr \
                and not pos.closing:
            self._risk_event("liq_distance", "critical", symbol, t, pos.partition,
                             {"distance_atr": distance, "limit": self.limits.min_liq_distance_atr,
                              "liq_price": self.liq_price(symbol), "close": self.book.marks[symbol].close})
            self._close(symbol, "liq_distance")

    # -- state changes -----------------------------------------------------------------------------------------------
    def _hold(self, state: str, reason: str, t: int, flatten: bool, detail: dict | None = None,
              publish: bool = True) -> None:
        """The held state: an operator's command, or the guard's own loss HALT (kept until an operator acts)."""
        b = self.book
        b.held_state, b.held_reason, b.held_flatten = state, reason, flatten and state == HALTED
        self._update_state(t, reason, flatten, detail, publish, always=True)
        if flatten:
            for symbol in list(b.positions):
                self._close(symbol, reason)

    def _update_state(self, t: int, cause: str, flatten: bool = False, detail: dict | None = None,
                      publish: bool = True, always: bool = False) -> None:
        """The state in effect: the strictest of the held state and the automatic halts. A change (or an operator's
        command, `always`) is a risk event; the guard's own changes go on `control` too: operators and a restarted
        worker see them."""
        b = self.book
        state, reason = b.held_state, b.held_reason
        if b.auto_halts and STRICTNESS[HALTED] > STRICTNESS[state]:
            state, reason = HALTED, b.auto_halts[0]
        previous = b.state
        if not always and (state, reason) == (previous, b.state_reason):
            return
        b.state, b.state_reason = state, reason
        self._risk_event("trading_state", "critical" if state == HALTED else "info", "", t, 0,
                         {"from": previous, "to": state, "reason": reason, "cause": cause, "flatten": flatten,
                          "held": b.held_state, "automatic": list(b.auto_halts), **(detail or {})})
        if publish:
            self.out.control.append({"state": state, "reason": reason, "flatten": flatten})

    def _close(self, symbol: str, reason: str) -> None:
        """Ask for a reduce-only close of the symbol's position; a pending entry is closed once it fills."""
        pos = self.book.positions[symbol]
        if pos.closing:
            return
        pos.closing = reason
        if pos.status == "open":
            self._send_close(symbol, pos)

    def _send_close(self, symbol: str, pos: Position) -> None:
        """The position's next CLOSE: the first under the id a replay gives again, each retry under its own."""
        mark, b = self.book.marks.get(symbol), self.book
        pos.close_attempts += 1
        pos.close_time = b.clock
        intent = event_ids.close_intent(pos.intent_id, pos.closing, pos.close_attempts)
        t = mark.event_time if mark else b.newest_bar
        if pos.close_attempts > 1:  # made now, not at the bar that first asked for it
            t = max(t, b.clock)
        self._order(pos.partition, {
            "event_id": event_ids.order(intent), "event_time": t,
            "symbol": symbol, "intent_id": intent, "action": "CLOSE", "side": "SELL" if pos.side > 0 else "BUY",
            "quantity": pos.quantity, "stop_loss": None, "take_profit": None, "leverage": None,
            "signal_id": "", "reason": pos.closing, "source": "risk"})

    def _retry_closes(self, only: str | None = None) -> None:
        """Closing never gives up: a position still in the book a retry interval after its CLOSE is asked again
        (`only`: that symbol's)."""
        b = self.book
        for symbol, pos in b.positions.items():
            if (only is None or symbol == only) and self._retry_due(pos):
                self._risk_event("close_retry", "warning", symbol, b.clock, pos.partition,
                                 {"reason": pos.closing, "attempt": pos.close_attempts + 1,
                                  "intent_id": pos.intent_id, "quantity": pos.quantity,
                                  "since_ms": b.clock - pos.close_time})
                self._send_close(symbol, pos)

    def _retry_due(self, pos: Position) -> bool:
        return bool(pos.closing) and pos.status == "open" and pos.close_attempts > 0 \
            and self.book.clock - pos.close_time >= self.limits.close_retry_ms

    def _order(self, partition: int, order: dict) -> None:
        b = self.book
        b.order_times = [x for x in b.order_times if x > order["event_time"] - 60_000] + [order["event_time"]]
        self.out.orders.append((partition, order))

    def _risk_event(self, kind: str, severity: str, symbol: str, t: int, partition: int, detail: dict) -> None:
        self.out.risk_events.append((partition, {
            "event_id": event_ids.risk_event(kind, symbol, t, detail.get("to", detail.get("reason", ""))),
            "event_time": t, "symbol": symbol, "kind": kind, "severity": severity,
            "detail": json.dumps(detail, sort_keys=True, default=str), "source": "risk"}))

    def _event_now(self) -> int:
        return max([self.book.newest_bar] + [m.event_time for m in self.book.marks.values()])

    # -- user.events -------------------------------------------------------------------------------------------------
    def _leg(self, client_id: str | None) -> tuple[str, Position] | tuple[None, None]:
        """Which of our positions a client order id belongs to, and as which leg."""
        if not client_id:
            return None, None
        for pos in self.book.positions.values():
            for leg, cid in client_ids(pos.intent_id).items():
                if cid == client_id:
                    return leg, pos
        return None, None

    def _order_update(self, ev: dict) -> None:
        symbol = ev["symbol"]
        pos = self.book.positions.get(symbol)
        if pos is None:
            return
        leg, mine = self._leg(ev.get("client_order_id"))
        status = ev.get("order_status")
        if leg == "entry" and mine is pos:
            if status == "FILLED":
                pos.status, pos.entry = "open", ev.get("avg_price") or pos.entry
                pos.quantity = ev.get("filled_qty") or pos.quantity
                pos.updated = ev["event_time"]
                if pos.closing:  # a HALT or kill came while the entry was on its way
                    self._send_close(symbol, pos)
            elif status in ("EXPIRED", "CANCELED", "REJECTED") and pos.status == "pending":
                if ev.get("filled_qty"):  # ended after a part filled: that part is the position
                    pos.status, pos.quantity, pos.updated = "open", ev["filled_qty"], ev["event_time"]
                    pos.entry = ev.get("avg_price") or pos.entry
                    if pos.closing:
                        self._send_close(symbol, pos)
                else:
                    self._clear_pending(symbol, ev["event_time"], f"entry {status}")
        elif status == "FILLED" and ev.get("reduce_only") and pos.status == "open":
            del self.book.positions[symbol]  # stop-loss, take-profit, our close, or a liquidation
            self.book.flat_since[symbol] = ev["event_time"]

    def _account_update(self, ev: dict) -> None:
        b = self.book
        for bal in ev.get("balances") or []:
            if bal["asset"] == "USDT" and ev["event_time"] >= b.balance_time:
                if b.balance is None:  # the configured starting equity was a guess: measure from the wallet before
                    b.peak_equity = b.day_start_equity = bal["wallet_balance"] - bal["balance_change"]
                b.balance, b.balance_time = bal["wallet_balance"], ev["event_time"]
        for p in ev.get("positions") or []:
            pos = b.positions.get(p["symbol"])
            if pos is None or pos.status != "open":
                continue
            if p["position_amount"] == 0:
                del b.positions[p["symbol"]]
                b.flat_since[p["symbol"]] = ev["event_time"]
            else:
                pos.quantity, pos.margin = abs(p["position_amount"]), p["isolated_wallet"] or pos.margin
                pos.entry = p.get("entry_price") or pos.entry
                pos.updated = ev["event_time"]
        b.peak_equity = max(b.peak_equity, self.equity())
        if b.day < 0:
            b.day = ev["event_time"] // DAY_MS

    # -- the execution connector's risk.events -----------------------------------------------------------------------
    def _clear_pending(self, symbol: str, t: int, why: str) -> None:
        """An approved entry that will never fill: it no longer holds its symbol, its margin or a close."""
        pos = self.book.positions.pop(symbol)
        self._risk_event("entry_cleared", "info", symbol, t, pos.partition, {"intent_id": pos.intent_id, "reason": why})

    def _entry_failed(self, ev: dict) -> None:
        intent = _detail(ev).get("intent_id")
        for symbol, pos in list(self.book.positions.items()):
            if intent and pos.intent_id == intent and pos.status == "pending":
                self._clear_pending(symbol, ev["event_time"], ev["kind"])

    def _reconcile(self, ev: dict) -> None:
        """The account as the exchange has it, after a reconnect: the exchange wins; each difference a warning.
        Pending entries (approved, not yet filled) are left to their own events, and so is a position whose user
        event is newer than the snapshot (the two come on different topics: a fill may overtake the snapshot)."""
        b, t, detail = self.book, ev["event_time"], _detail(ev)
        exchange = {s: amount for s, amount in _amounts(detail.get("positions")).items() if amount}
        for symbol, pos in list(b.positions.items()):
            if pos.status == "open" and symbol not in exchange and pos.updated <= t:
                del b.positions[symbol]
                b.flat_since[symbol] = t
                self._reconciled(symbol, t, pos.partition, "not_on_exchange", pos.side * pos.quantity, 0.0)
        for symbol, amount in sorted(exchange.items()):
            pos, side = b.positions.get(symbol), 1 if amount > 0 else -1
            if pos is None and b.flat_since.get(symbol, 0) > t:
                continue  # the book saw it go flat after the snapshot was taken
            if pos is None:
                mark = b.marks.get(symbol)
                entry = mark.close if mark else 0.0  # priced at the newest mark (or the next) until the exchange says
                # the leverage is unknown: margin counted as the whole notional, the strict side
                pos = b.positions[symbol] = Position(f"reconciled:{symbol}", side, abs(amount), entry, 1,
                                                     abs(amount) * entry, "open",
                                                     partition=mark.partition if mark else 0, updated=t)
                self._reconciled(symbol, t, pos.partition, "not_in_book", 0.0, amount)
                if b.held_state == HALTED and b.held_flatten:  # a flatten is in force: this one too
                    self._close(symbol, b.held_reason)
            elif pos.status == "open" and pos.updated <= t \
                    and not math.isclose(pos.side * pos.quantity, amount, rel_tol=1e-9):
                before, flipped = pos.side * pos.quantity, side != pos.side
                pos.updated = t
                pos.margin = pos.margin * abs(amount) / pos.quantity if pos.quantity else pos.margin
                pos.side, pos.quantity = side, abs(amount)
                if flipped and symbol in b.marks:  # not the position the book priced
                    pos.entry = b.marks[symbol].close
                self._reconciled(symbol, t, pos.partition, "side" if flipped else "quantity", before, amount)
        balance = _number(detail.get("balance"))
        if balance is not None and t >= b.balance_time:  # (an ACCOUNT_UPDATE newer than the snapshot stands)
            if b.balance is None or not math.isclose(b.balance, balance, rel_tol=1e-12):
                self._reconciled("", t, 0, "balance", b.balance, balance)
                if b.balance is None:  # the configured starting equity was a guess
                    b.peak_equity = b.day_start_equity = balance
                b.balance, b.balance_time = balance, max(b.balance_time, t)
        b.peak_equity = max(b.peak_equity, self.equity())

    def _reconciled(self, symbol: str, t: int, partition: int, what: str, before: float | None, after: float) -> None:
        self._risk_event("book_reconciled", "warning", symbol, t, partition,
                         {"reason": what, "book": before, "exchange": after})


def _number(text: object) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _amounts(positions: object) -> dict[str, float]:
    """A snapshot's signed position amounts (strings); an amount that is not a number is left out."""
    if not isinstance(positions, dict):
        return {}
    return {s: a for s, a in ((s, _number(text)) for s, text in positions.items()) if a is not None}


def _detail(ev: dict) -> dict:
    try:
        detail = json.loads(ev.get("detail") or "{}")
    except ValueError:
        return {}
    return detail if isinstance(detail, dict) else {}
