"""The risk guard's rules on hand-built cases, its account kept from the paper exchange's real user.events."""

from __future__ import annotations

import json

import pytest

from connectors.binance.execution import client_ids
from connectors.binance.user_stream import parse_order_trade_update, risk_record
from connectors.paper.engine import PaperConfig, PaperExchange
from schemas import event_ids
from streams.risk.guard import APPROVED, HALTED, REDUCE_ONLY, REJECTED, RUNNING, Book, Limits, RiskGuard

T0 = 1_700_006_400_000  # 2023-11-15 00:00 UTC
BAR = 300_000


def sig(symbol: str, n: int, decision: str = "LONG", close: float = 50_000.0, **over) -> dict:
    """The signal of bar n (opened at T0 + n bars): sized as the policy would (0.1 BTC at 5x)."""
    open_time = T0 + n * BAR
    s = {"event_id": event_ids.signal(symbol, "5m", open_time), "event_time": open_time + BAR, "symbol": symbol,
         "source": "replay", "interval": "5m", "open_time": open_time, "decision": decision, "close": close,
         "atr_14": 100.0, "funding_rate": 0.0001, "side": None, "entry_price": None, "stop_loss": None,
         "take_profit": None, "quantity": None, "notional": None, "leverage": None, "liq_distance_atr": None}
    if decision != "FLAT":
        long = decision == "LONG"
        s.update(side="BUY" if long else "SELL", entry_price=close, quantity=0.1, notional=0.1 * close, leverage=5,
                 stop_loss=close - 200 if long else close + 200, take_profit=close + 400 if long else close - 400,
                 liq_distance_atr=80.0)
    return s | over


def bar(symbol: str, n: int, o: float, h: float, low: float, c: float) -> dict:
    open_time = T0 + n * BAR
    return {"symbol": symbol, "interval": "5m", "open_time": open_time, "close_time": open_time + BAR - 1,
            "open": o, "high": h, "low": low, "close": c}


class Desk:
    """The guard wired to a paper exchange the way the topics wire them: orders go to the exchange, its
    user.events come back to the guard."""

    def __init__(self, limits: Limits | None = None):
        self.guard = RiskGuard(limits or Limits())
        self.exchange = PaperExchange(PaperConfig())
        self.verdicts: list[dict] = []
        self.orders: list[dict] = []
        self.events: list[dict] = []
        self.control: list[dict] = []

    def signal(self, s: dict) -> dict:
        self.guard.signal(s, 0, s["event_time"])
        self._route()
        return self.verdicts[-1]

    def bar(self, k: dict) -> None:
        for ev in self.exchange.bar(k):
            self.guard.user_event(ev)
        self._route()

    def _route(self) -> None:
        out = self.guard.take_outputs()
        self.verdicts += out.verdicts
        self.events += [e for _, e in out.risk_events]
        self.control += out.control
        for _, order in out.orders:
            self.orders.append(order)
            assert self.exchange.order(order) == []  # intents fill at the next bar


def test_flat_signal_is_approved_without_an_order():
    desk = Desk()
    v = desk.signal(sig("BTCUSDT", 0, "FLAT"))
    assert (v["verdict"], v["action"], v["violations"], v["intent_id"]) == (APPROVED, "NONE", [], None)
    assert v["event_id"] == "verdict:BTCUSDT:5m:" + f"{T0:013d}"
    assert desk.orders == []


def test_approved_entry_becomes_one_open_order_with_both_protections():
    desk = Desk()
    v = desk.signal(sig("BTCUSDT", 0))
    assert (v["verdict"], v["action"]) == (APPROVED, "OPEN")
    # 0.1 BTC × 50,000 at 5x: 1,000 USDT of margin on 10,000 of equity
    assert v["margin_usage"] == pytest.approx(0.10)
    [order] = desk.orders
    assert order["intent_id"] == v["intent_id"] == f"open:BTCUSDT:5m:{T0:013d}"
    assert (order["action"], order["side"], order["quantity"], order["leverage"]) == ("OPEN", "BUY", 0.1, 5)
    assert (order["stop_loss"], order["take_profit"]) == (49_800.0, 50_400.0)
    # the next bar's signal comes before the fill: still one position per symbol
    v2 = desk.signal(sig("BTCUSDT", 1))
    assert v2["verdict"] == REJECTED and v2["violations"] == ["position_open"]
    assert len(desk.orders) == 1


def test_an_entry_whose_bar_the_paper_exchange_has_passed_is_rejected():
    """Its fill would come bars later, at a price the signal never saw (the paper desk applied the bars without it)."""
    desk = Desk()
    desk.guard.signal(sig("BTCUSDT", 0), 0, T0 + BAR, bar_passed_ms=6 * BAR)
    desk._route()
    v = desk.verdicts[-1]
    assert (v["verdict"], v["violations"], v["action"]) == (REJECTED, ["bar_passed"], "NONE")
    assert json.loads(v["detail"]) == {"bar_passed": {"exchange_ahead_ms": 6 * BAR}}
    assert desk.orders == []
    assert desk.signal(sig("BTCUSDT", 1))["verdict"] == APPROVED  # the next signal, on time, trades


def test_a_rejection_names_every_violated_rule():
    desk = Desk()
    # 2 BTC at 50,000 and 2x = 50,000 of margin on 10,000 of equity; liquidation 1.5 ATR away; a long paying 2 %
    v = desk.signal(sig("BTCUSDT", 0, quantity=2.0, notional=100_000.0, leverage=2, liq_distance_atr=1.5,
                        funding_rate=0.02))
    assert v["verdict"] == REJECTED
    assert v["violations"] == ["extreme_funding", "liq_distance", "margin_usage", "symbol_exposure"]
    detail = json.loads(v["detail"])
    assert detail["margin_usage"]["usage"] == pytest.approx(5.0)
    assert desk.orders == []
    # a short is not hurt by a positive rate: it receives it
    v = desk.signal(sig("ETHUSDT", 0, "SHORT", close=2_000.0, quantity=1.0, notional=2_000.0, funding_rate=0.02))
    assert v["verdict"] == APPROVED


def test_daily_loss_flattens_and_halts_within_one_bar():
    desk = Desk()
    desk.signal(sig("BTCUSDT", 0))
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))  # entry fills at the open + 15 bps: 50,075
    pos = desk.guard.book.positions["BTCUSDT"]
    assert (pos.status, pos.entry, pos.quantity) == ("open", pytest.approx(50_075.0), 0.1)
    # wallet 10,000 − fee 0.1 × 50,075 × 0.0004 = 9,997.997; marked at 47,000: −307.5 unrealized
    # → equity 9,690.497, 3.095 % under the day's start (10,000): past the 2 % limit
    v = desk.signal(sig("BTCUSDT", 1, "FLAT", close=47_000.0))
    assert desk.guard.equity() == pytest.approx(9_690.497)
    assert v["daily_pnl_ratio"] == pytest.approx(-0.0309503)
    assert desk.guard.book.state == HALTED and desk.guard.book.state_reason == "daily_loss"
    close = desk.orders[-1]
    assert (close["action"], close["side"], close["reason"]) == ("CLOSE", "SELL", "daily_loss")
    assert close["intent_id"] == event_ids.close_intent(pos.intent_id, "daily_loss")
    assert desk.control == [{"state": HALTED, "reason": "daily_loss", "flatten": True}]
    assert any(e["kind"] == "trading_state" and json.loads(e["detail"])["to"] == HALTED for e in desk.events)
    desk.bar(bar("BTCUSDT", 2, 47_000, 47_100, 46_900, 47_000))  # the close fills at the next open
    assert desk.guard.book.positions == {}
    assert desk.exchange.state.positions == {}
    v = desk.signal(sig("ETHUSDT", 3, "SHORT", close=2_000.0, quantity=1.0, notional=2_000.0))
    assert v["verdict"] == REJECTED and "halted" in v["violations"]


def test_drawdown_from_peak_halts():
    desk = Desk(Limits(daily_loss=1.0, max_symbol_exposure=1.0))  # only the drawdown rule can fire
    desk.signal(sig("BTCUSDT", 0, quantity=1.0, notional=50_000.0, leverage=8))
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))
    # 1 BTC from 50,075: at 48,000 equity = 10,000 − 20.03 − 2,075 = 7,904.97 → 20.95 % under the 10,000 peak
    desk.signal(sig("BTCUSDT", 1, "FLAT", close=48_000.0))
    assert desk.guard.drawdown() == pytest.approx(1 - 7_904.97 / 10_000)
    assert desk.guard.book.state == HALTED and desk.guard.book.state_reason == "drawdown"
    assert desk.orders[-1]["action"] == "CLOSE"


def test_kill_while_the_entry_is_on_its_way_closes_it_once_filled():
    desk = Desk()
    desk.signal(sig("BTCUSDT", 0))
    kill = {"entity": "trading", "kind": "trading_state", "actor": "operator", "event_time": 1,
            "value": json.dumps({"state": HALTED, "flatten": True, "reason": "kill"})}
    assert desk.guard.control(kill)
    assert desk.guard.control(kill) is False  # the same command read again changes nothing
    desk._route()
    assert [o["action"] for o in desk.orders] == ["OPEN"]  # nothing to close yet
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))  # fills → the close goes out at once
    assert [o["action"] for o in desk.orders] == ["OPEN", "CLOSE"]
    desk.bar(bar("BTCUSDT", 2, 50_000, 50_100, 49_900, 50_000))
    assert desk.exchange.state.positions == {} and desk.guard.book.positions == {}
    # REDUCE_ONLY: no entries, positions kept
    stop = kill | {"event_time": 2, "value": json.dumps({"state": REDUCE_ONLY})}
    assert desk.guard.control(stop)
    v = desk.signal(sig("BTCUSDT", 3))
    assert v["violations"] == ["reduce_only"]
    start = kill | {"event_time": 3, "value": json.dumps({"state": RUNNING})}
    assert desk.guard.control(start)
    assert desk.signal(sig("BTCUSDT", 4))["verdict"] == APPROVED


def test_liquidation_distance_monitor_force_closes():
    desk = Desk(Limits(daily_loss=1.0, max_drawdown=1.0, max_symbol_exposure=1.0))
    desk.signal(sig("BTCUSDT", 0, leverage=8))
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))
    lp = desk.guard.liq_price("BTCUSDT")
    # isolated margin 5,007.5 / 8 = 625.9375; MMR 0.4 % and cum 0 in the first bracket:
    # LP = (625.9375 − 0.1 × 50,075) / (0.1 × 0.004 − 0.1) = 43,996.61...
    assert lp == pytest.approx((625.9375 - 5_007.5) / (0.0004 - 0.1))
    desk.signal(sig("BTCUSDT", 1, "FLAT", close=lp + 250.0))  # 2.5 ATR away: kept
    assert len(desk.orders) == 1
    desk.signal(sig("BTCUSDT", 2, "FLAT", close=lp + 150.0))  # 1.5 ATR: closed
    assert desk.orders[-1]["action"] == "CLOSE" and desk.orders[-1]["reason"] == "liq_distance"
    assert desk.events[-1]["kind"] == "liq_distance"
    desk.signal(sig("BTCUSDT", 3, "FLAT", close=lp + 100.0))  # the monitor asks once, not on every bar ...
    assert [e["kind"] for e in desk.events].count("liq_distance") == 1
    # ... but a close still unfilled a bar later (no bar reached the exchange here) is sent again
    assert [o["intent_id"] for o in desk.orders[1:]] == [
        event_ids.close_intent(desk.orders[0]["intent_id"], "liq_distance", n) for n in (1, 2)]
    assert desk.events[-1]["kind"] == "close_retry"


def test_order_rate_cools_down():
    desk = Desk(Limits(max_orders_per_minute=3, max_margin_usage=10, max_symbol_exposure=10))
    symbols = [f"S{i}USDT" for i in range(5)]
    verdicts = [desk.signal(sig(s, 0, close=100.0, quantity=1.0, notional=100.0)) for s in symbols]
    assert [v["verdict"] for v in verdicts] == [APPROVED] * 3 + [REJECTED] * 2
    assert verdicts[3]["violations"] == ["order_rate"]


def test_user_stream_down_halts_live_entries_until_restored():
    desk = Desk()
    down = {"kind": "user_stream_down", "event_time": T0, "source": "binance", "symbol": ""}
    desk.guard.connector_event(down)
    assert desk.guard.book.state == HALTED
    live = sig("BTCUSDT", 0, source="binance")
    desk.guard.signal(live, 0, live["event_time"] + 1_000)
    v = desk.guard.take_outputs().verdicts[-1]
    assert {"halted", "user_stream_down"} <= set(v["violations"])
    desk.guard.connector_event(down | {"kind": "user_stream_restored"})
    assert desk.guard.book.state == RUNNING
    stale = sig("BTCUSDT", 1, source="binance")
    desk.guard.signal(stale, 0, stale["event_time"] + 60_000)  # a live bar a minute old
    assert desk.guard.take_outputs().verdicts[-1]["violations"] == ["stale_data"]


def test_the_book_survives_a_restart():
    desk = Desk()
    desk.signal(sig("BTCUSDT", 0))
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))
    desk.guard.control({"entity": "trading", "kind": "trading_state", "actor": "operator", "event_time": 5,
                        "value": json.dumps({"state": REDUCE_ONLY})})
    restored = RiskGuard(Limits(), Book.loads(desk.guard.book.dumps()))
    assert restored.book == desk.guard.book
    # the risk agent's snapshot holds the book as JSON inside JSON (older ones as a string): both load the same
    assert Book.loads(json.loads(desk.guard.book.dumps())) == desk.guard.book
    assert restored.equity() == pytest.approx(desk.guard.equity())
    restored.signal(sig("ETHUSDT", 2, close=2_000.0, quantity=1.0, notional=2_000.0), 0, 0)
    assert restored.take_outputs().verdicts[-1]["violations"] == ["reduce_only"]


def test_a_signal_delivered_again_gets_its_first_verdict():
    desk = Desk()
    first = desk.signal(sig("BTCUSDT", 0))
    again = desk.signal(sig("BTCUSDT", 0))  # at-least-once: the same record after a crash
    assert again == first and again["verdict"] == APPROVED
    assert len(desk.orders) == 1


# -- trading state that holds -------------------------------------------------------------------------------------
def command(state: str, event_time: int, flatten: bool = False, reason: str = "") -> dict:
    return {"entity": "trading", "kind": "trading_state", "actor": "operator", "event_time": event_time,
            "value": json.dumps({"state": state, "flatten": flatten, "reason": reason or state.lower()})}


def health(kind: str, t: int = T0) -> dict:
    """The user connector's records on risk.events (`connectors.binance.user_stream`)."""
    return risk_record(kind, "critical" if kind.endswith("down") else "info", "", t, {"reason": "roll"})


def test_reduce_only_survives_a_user_stream_roll():
    desk = Desk()
    assert desk.guard.control(command(REDUCE_ONLY, 1, reason="going to bed"))
    # the scheduled 23.5 h roll: down, then restored once reconciled
    desk.guard.connector_event(health("user_stream_down"))
    assert (desk.guard.book.state, desk.guard.book.state_reason) == (HALTED, "user_stream_down")
    desk.guard.connector_event(health("user_stream_restored", T0 + 2_000))
    assert (desk.guard.book.state, desk.guard.book.state_reason) == (REDUCE_ONLY, "going to bed")
    desk._route()
    # what `control` shows follows: HALTED while down, the operator's REDUCE_ONLY after, never RUNNING
    assert [c["state"] for c in desk.control] == [HALTED, REDUCE_ONLY]
    assert desk.signal(sig("BTCUSDT", 0))["violations"] == ["reduce_only"]
    assert desk.guard.control(command(RUNNING, 2))  # only an operator lifts it
    assert desk.signal(sig("BTCUSDT", 1))["verdict"] == APPROVED


def test_an_operator_halt_and_a_loss_halt_survive_the_stream_coming_back():
    desk = Desk()
    assert desk.guard.control(command(HALTED, 1, reason="maintenance"))
    desk.guard.connector_event(health("user_stream_down"))
    desk.guard.connector_event(health("user_stream_restored", T0 + 1))
    assert (desk.guard.book.state, desk.guard.book.state_reason) == (HALTED, "maintenance")
    # an operator's RUNNING while the stream is down does not trade blind: the automatic halt stays until restored
    desk.guard.connector_event(health("user_stream_down", T0 + 2))
    assert desk.guard.control(command(RUNNING, 2))
    assert (desk.guard.book.state, desk.guard.book.state_reason) == (HALTED, "user_stream_down")
    desk.guard.connector_event(health("user_stream_restored", T0 + 3))
    assert desk.guard.book.state == RUNNING
    # the guard's own daily-loss HALT: a reconnect does not lift it either
    desk.signal(sig("BTCUSDT", 0))
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))
    desk.signal(sig("BTCUSDT", 1, "FLAT", close=47_000.0))
    assert (desk.guard.book.state, desk.guard.book.state_reason) == (HALTED, "daily_loss")
    desk.guard.connector_event(health("user_stream_down", T0 + 4))
    desk.guard.connector_event(health("user_stream_restored", T0 + 5))
    assert (desk.guard.book.state, desk.guard.book.state_reason) == (HALTED, "daily_loss")


def test_a_close_the_exchange_keeps_refusing_halts_entries_until_it_is_flat():
    """The execution connector retries a failing close until flat (close_failed each time, close_recovered at the
    end): no new entry meanwhile, whatever an operator says; after it, the operator's latest state."""
    desk = Desk()
    assert desk.guard.control(command(REDUCE_ONLY, 1, reason="careful"))
    for t in (T0, T0 + 1_000):
        desk.guard.connector_event(risk_record("close_failed", "critical", "BTCUSDT", t, {"tries": 1}))
    assert (desk.guard.book.state, desk.guard.book.state_reason) == (HALTED, "close_failed")
    assert desk.guard.control(command(RUNNING, 2))  # an operator cannot trade over a close that is failing
    assert desk.guard.book.state == HALTED
    desk.guard.connector_event(risk_record("close_recovered", "info", "BTCUSDT", T0 + 2_000, {"tries": 3}))
    assert desk.guard.book.state == RUNNING


def test_an_old_snapshot_loads_with_its_state_split():
    old = json.loads(Book().dumps())
    for key in ("held_state", "held_reason", "held_flatten", "auto_halts", "clock"):
        del old[key]
    stream_down = Book.loads(old | {"state": HALTED, "state_reason": "user_stream_down", "user_stream_up": False})
    assert (stream_down.held_state, stream_down.auto_halts) == (RUNNING, ["user_stream_down"])
    guard = RiskGuard(Limits(), stream_down)
    guard.connector_event(health("user_stream_restored"))
    assert guard.book.state == RUNNING and guard.book.user_stream_up
    reduce_only = Book.loads(old | {"state": REDUCE_ONLY, "state_reason": "operator"})
    assert (reduce_only.held_state, reduce_only.held_reason, reduce_only.auto_halts) == (REDUCE_ONLY, "operator", [])
    position = {"intent_id": "open:X", "side": 1, "quantity": 1.0, "entry": 1.0, "leverage": 2, "margin": 0.5,
                "status": "open", "closing": "", "partition": 0}
    assert Book.loads(old | {"positions": {"XUSDT": position}}).positions["XUSDT"].close_attempts == 0


def order_update(client_id: str, status: str, t: int, symbol: str = "BTCUSDT", filled: str = "0") -> dict:
    """A Binance ORDER_TRADE_UPDATE of a MARKET entry, parsed as the user connector parses it."""
    return parse_order_trade_update({"e": "ORDER_TRADE_UPDATE", "E": t, "T": t, "o": {
        "s": symbol, "c": client_id, "S": "BUY", "o": "MARKET", "f": "GTC", "q": "0.1", "p": "0", "ap": "0",
        "sp": "0", "x": status if status != "REJECTED" else "REJECTED", "X": status, "i": 42, "l": "0",
        "z": filled, "L": "0", "T": t, "t": 0, "R": False, "wt": "CONTRACT_PRICE", "ps": "BOTH", "rp": "0"}})


@pytest.mark.parametrize("how", ["user_event_EXPIRED", "user_event_REJECTED", "order_rejected", "intent_expired",
                                 "entry_not_filled"])
def test_an_entry_the_exchange_never_fills_frees_its_symbol(how: str):
    desk = Desk()
    intent = desk.signal(sig("BTCUSDT", 0))["intent_id"]
    assert desk.signal(sig("BTCUSDT", 1))["violations"] == ["position_open"]
    t = T0 + 2 * BAR
    if how.startswith("user_event_"):
        desk.guard.user_event(order_update(client_ids(intent)["entry"], how.rsplit("_", 1)[1], t))
    else:  # the execution connector's risk event, as `Executor.report_risk` publishes it
        other = risk_record(how, "warning", "BTCUSDT", t, {"intent_id": "open:BTCUSDT:5m:0000000000000"}, "x")
        desk.guard.connector_event(other)  # another intent's: changes nothing
        assert desk.guard.book.positions["BTCUSDT"].status == "pending"
        desk.guard.connector_event(risk_record(how, "warning", "BTCUSDT", t, {"intent_id": intent}, intent))
    assert desk.guard.book.positions == {}
    assert desk.signal(sig("BTCUSDT", 2))["verdict"] == APPROVED
    assert [e["kind"] for e in desk.events] == ["entry_cleared"]


def test_a_failure_report_for_a_filled_entry_leaves_its_position():
    desk = Desk()
    intent = desk.signal(sig("BTCUSDT", 0))["intent_id"]
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))
    desk.guard.connector_event(risk_record("entry_not_filled", "warning", "BTCUSDT", T0, {"intent_id": intent}))
    assert desk.guard.book.positions["BTCUSDT"].status == "open"


def test_an_entry_that_expires_part_filled_is_that_part():
    desk = Desk()
    intent = desk.signal(sig("BTCUSDT", 0))["intent_id"]
    desk.guard.user_event(order_update(client_ids(intent)["entry"], "EXPIRED", T0 + BAR, filled="0.04"))
    pos = desk.guard.book.positions["BTCUSDT"]
    assert (pos.status, pos.quantity) == ("open", 0.04)


class FlakyCloses(Desk):
    """The paper desk, except that the exchange side fails the first `failures` CLOSE intents: each comes back as a
    reduce-only order that EXPIRED (what Binance answers when a reduce-only MARKET order cannot execute)."""

    def __init__(self, failures: int, limits: Limits | None = None):
        super().__init__(limits)
        self.failures = failures
        self.failed: list[str] = []

    def _route(self) -> None:
        out = self.guard.take_outputs()
        self.verdicts += out.verdicts
        self.events += [e for _, e in out.risk_events]
        self.control += out.control
        for _, order in out.orders:
            self.orders.append(order)
            if order["action"] == "CLOSE" and len(self.failed) < self.failures:
                self.failed.append(order["intent_id"])
                self.guard.user_event(order_update(client_ids(order["intent_id"])["close"], "EXPIRED",
                                                   order["event_time"]) | {"reduce_only": True, "side": "SELL"})
            else:
                assert self.exchange.order(order) == []

    def tick(self, now: int) -> None:
        self.guard.tick(now)
        self._route()


def test_a_flatten_whose_close_fails_twice_is_flat_after_the_third_try():
    desk = FlakyCloses(failures=2)
    entry = desk.signal(sig("BTCUSDT", 0))["intent_id"]
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))
    assert desk.guard.control(command(HALTED, 1, flatten=True, reason="kill"))
    desk._route()
    killed_at = desk.guard.book.clock  # the newest time the guard has seen: the last signal's bar close
    assert [o["intent_id"] for o in desk.orders if o["action"] == "CLOSE"] == [event_ids.close_intent(entry, "kill")]
    assert desk.guard.book.positions["BTCUSDT"].closing == "kill"  # the EXPIRED close did not flatten the book
    desk.tick(killed_at + 59_999)  # not yet
    assert len(desk.orders) == 2
    desk.tick(killed_at + 60_000)  # second try: fails too
    desk.tick(killed_at + 90_000)
    desk.tick(killed_at + 120_000)  # third try: reaches the exchange
    closes = [o for o in desk.orders if o["action"] == "CLOSE"]
    assert [o["intent_id"] for o in closes] == [event_ids.close_intent(entry, "kill", n) for n in (1, 2, 3)]
    assert len({o["event_id"] for o in closes}) == 3 and desk.failed == [c["intent_id"] for c in closes[:2]]
    assert closes[2]["event_time"] == killed_at + 120_000 and closes[2]["quantity"] == 0.1
    retries = [json.loads(e["detail"]) for e in desk.events if e["kind"] == "close_retry"]
    assert [(r["attempt"], r["reason"]) for r in retries] == [(2, "kill"), (3, "kill")]
    assert all(e["severity"] == "warning" for e in desk.events if e["kind"] == "close_retry")
    desk.bar(bar("BTCUSDT", 50, 50_000, 50_100, 49_900, 50_000))  # fills at the next bar's open
    assert desk.guard.book.positions == {} and desk.exchange.state.positions == {}
    desk.tick(killed_at + 600_000)  # flat: nothing more to retry
    assert len(desk.orders) == 4


def test_a_daily_loss_flatten_is_retried_on_the_next_signals():
    """Paper (event time): the next bar's signal is the guard's chance to retry."""
    desk = FlakyCloses(failures=1)
    desk.signal(sig("BTCUSDT", 0, stop_loss=45_000.0))  # a stop the bars below never reach
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))
    desk.signal(sig("BTCUSDT", 1, "FLAT", close=47_000.0))
    assert desk.guard.book.state_reason == "daily_loss" and len(desk.failed) == 1
    desk.bar(bar("BTCUSDT", 2, 47_000, 47_100, 46_900, 47_000))  # nothing to fill: the close failed
    assert "BTCUSDT" in desk.exchange.state.positions
    desk.signal(sig("BTCUSDT", 2, "FLAT", close=47_000.0))
    assert [e["kind"] for e in desk.events].count("close_retry") == 1
    desk.bar(bar("BTCUSDT", 3, 47_000, 47_100, 46_900, 47_000))
    assert desk.guard.book.positions == {} and desk.exchange.state.positions == {}


def snapshot(positions: dict[str, str], balance: str, t: int = T0 + 10 * BAR) -> dict:
    """The execution connector's `account_snapshot` after a reconnect."""
    return risk_record("account_snapshot", "info", "", t, {"positions": positions, "balance": balance}) \
        | {"source": "binance-execution"}


def test_an_account_snapshot_makes_the_book_match_the_exchange():
    desk = Desk(Limits(max_margin_usage=10, max_symbol_exposure=10))
    desk.signal(sig("BTCUSDT", 0))
    desk.signal(sig("ETHUSDT", 0, "SHORT", close=2_000.0, quantity=1.0, notional=2_000.0))
    desk.signal(sig("SOLUSDT", 0, close=100.0, quantity=10.0, notional=1_000.0))
    desk.signal(sig("XRPUSDT", 0, close=0.5, quantity=100.0, notional=50.0))  # marks XRP
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))
    desk.bar(bar("ETHUSDT", 1, 2_000, 2_010, 1_990, 2_000))
    desk.bar(bar("XRPUSDT", 1, 0.5, 0.51, 0.49, 0.5))
    desk.guard.user_event(order_update(client_ids(desk.guard.book.positions["XRPUSDT"].intent_id)["entry"],
                                       "FILLED", T0 + BAR, "XRPUSDT", "100") | {"avg_price": 0.5})
    del desk.guard.book.positions["XRPUSDT"]  # a fill the book missed while the stream was down
    book = desk.guard.book
    assert {s: p.status for s, p in book.positions.items()} == {"BTCUSDT": "open", "ETHUSDT": "open",
                                                                  "SOLUSDT": "pending"}
    btc_margin = book.positions["BTCUSDT"].margin
    desk.events.clear()
    # the exchange: BTC half of it, ETH flat (its stop filled unseen), XRP long, SOL nothing yet; another balance
    desk.guard.connector_event(snapshot({"BTCUSDT": "0.05", "XRPUSDT": "100"}, "9995.25"))
    desk._route()
    assert (book.positions["BTCUSDT"].quantity, book.positions["BTCUSDT"].side) == (0.05, 1)
    assert book.positions["BTCUSDT"].margin == pytest.approx(btc_margin / 2)
    assert "ETHUSDT" not in book.positions
    xrp = book.positions["XRPUSDT"]
    assert (xrp.intent_id, xrp.status, xrp.side, xrp.quantity, xrp.entry) == ("reconciled:XRPUSDT", "open", 1,
                                                                               100.0, 0.5)
    assert book.positions["SOLUSDT"].status == "pending"  # approved, not filled: left to its own events
    assert book.balance == 9_995.25
    found = {(e["symbol"], json.loads(e["detail"])["reason"]): json.loads(e["detail"]) for e in desk.events}
    assert set(found) == {("ETHUSDT", "not_on_exchange"), ("BTCUSDT", "quantity"), ("XRPUSDT", "not_in_book"),
                          ("", "balance")}
    assert (found[("BTCUSDT", "quantity")]["book"], found[("BTCUSDT", "quantity")]["exchange"]) == (0.1, 0.05)
    assert (found[("ETHUSDT", "not_on_exchange")]["book"], found[("", "balance")]["exchange"]) == (-1.0, 9_995.25)
    assert all(e["kind"] == "book_reconciled" and e["severity"] == "warning" for e in desk.events)
    # the added position counts: one position per symbol
    assert desk.signal(sig("XRPUSDT", 2, close=0.5, quantity=100.0, notional=50.0))["violations"] == ["position_open"]
    # the same snapshot again: nothing differs, nothing reported
    desk.events.clear()
    desk.guard.connector_event(snapshot({"BTCUSDT": "0.05", "XRPUSDT": "100"}, "9995.25", T0 + 11 * BAR))
    desk._route()
    assert desk.events == []
    # a side the book has wrong
    desk.guard.connector_event(snapshot({"BTCUSDT": "-0.05", "XRPUSDT": "100"}, "9995.25", T0 + 12 * BAR))
    desk._route()
    assert book.positions["BTCUSDT"].side == -1
    assert [json.loads(e["detail"])["reason"] for e in desk.events] == ["side"]


def test_a_position_found_while_a_kill_is_in_force_is_closed():
    desk = Desk()
    desk.signal(sig("BTCUSDT", 0, "FLAT"))
    assert desk.guard.control(command(HALTED, 1, flatten=True, reason="kill"))
    desk.guard.connector_event(snapshot({"BTCUSDT": "-0.2"}, "10000"))
    desk._route()
    [close] = desk.orders
    assert (close["action"], close["side"], close["quantity"], close["reason"]) == ("CLOSE", "BUY", 0.2, "kill")
    desk.bar(bar("BTCUSDT", 1, 50_000, 50_100, 49_900, 50_000))  # the paper exchange has nothing: EXPIRED
    assert "BTCUSDT" in desk.guard.book.positions  # until the exchange says it is flat
    desk.guard.connector_event(snapshot({}, "10000", T0 + 20 * BAR))
    assert desk.guard.book.positions == {}


def test_the_watchdogs_halt_is_held_until_an_operator_starts_trading():
    """The watchdog HALTs on `control` (actor watchdog) and reports `chain_stalled` on risk.events: the chain taking
    its input again lifts nothing; an operator's start does."""
    guard = RiskGuard()
    halt = command(HALTED, 1, reason="chain_stalled") | {"actor": "watchdog"}
    assert guard.control(halt)
    guard.connector_event(risk_record("chain_stalled", "critical", "", T0, {"agent": "risk"}) | {"source": "watchdog"})
    guard.connector_event(health("user_stream_down", T0 + 1))
    guard.connector_event(health("user_stream_restored", T0 + 2))
    assert (guard.book.state, guard.book.state_reason) == (HALTED, "chain_stalled")
    assert guard.control(command(RUNNING, 2))
    assert guard.book.state == RUNNING


def test_a_snapshot_older_than_the_books_news_changes_nothing():
    """The snapshot (risk.events) and the fills (user.events) come on different topics: a fill may overtake it."""
    desk = Desk()
    intent = desk.signal(sig("BTCUSDT", 0))["intent_id"]
    taken = T0 + 2 * BAR  # the exchange's clock when the snapshot was taken: before the entry filled
    desk.guard.user_event(order_update(client_ids(intent)["entry"], "FILLED", taken + 500, filled="0.1")
                          | {"avg_price": 50_000.0})
    desk.guard.connector_event(snapshot({}, "10000", taken))
    assert desk.guard.book.positions["BTCUSDT"].status == "open"
    # the position closes (its stop) after another snapshot that still had it was taken
    stop = order_update("stop", "FILLED", taken + 2_000, filled="0.1") | {"reduce_only": True}
    desk.guard.user_event(stop)
    desk.guard.connector_event(snapshot({"BTCUSDT": "0.1"}, "10000", taken + 1_000))
    assert desk.guard.book.positions == {}
    desk._route()
    assert [e["symbol"] for e in desk.events if e["kind"] == "book_reconciled"] == [""]  # the balance: book had none
    # a snapshot newer than both is the exchange's word
    desk.guard.connector_event(snapshot({"BTCUSDT": "0.1"}, "10000", taken + 3_000))
    assert desk.guard.book.positions["BTCUSDT"].intent_id == "reconciled:BTCUSDT"
