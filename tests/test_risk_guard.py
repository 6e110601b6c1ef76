"""The risk guard's rules on hand-built cases, its account kept from the paper exchange's real user.events."""

from __future__ import annotations

import json

import pytest

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
    desk.signal(sig("BTCUSDT", 3, "FLAT", close=lp + 100.0))  # asked once, not on every bar
    assert [o["action"] for o in desk.orders] == ["OPEN", "CLOSE"]


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
