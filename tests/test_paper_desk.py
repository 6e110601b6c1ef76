"""The paper desk, the risk agent's in-process paper exchange (`streams/risk/paper_desk.py`): bars are held until
the signal of their bar, then applied with the funding settlements due by their close, in event time; an order
fills at the next bar applied; another interval's bars are ignored; its state (engine and held bars) survives a
restart without a second position. (The fills through the broker and a worker: tests/test_risk_stream.py; the
engine's rules: tests/test_paper_engine.py.)"""

from __future__ import annotations

from connectors.binance.execution import client_ids
from connectors.paper.engine import PaperConfig
from schemas import records
from streams.risk.paper_desk import MAX_HELD, PaperDesk

T0 = 1_704_067_200_000 - 300_000  # bar 1 opens 2024-01-01 00:00 UTC, a funding settlement time
CONFIG = PaperConfig(taker_fee=0.0004, slippage_bps=10, leverage=5, initial_balance=10_000)


def bar(i: int, o: float, h: float, low: float, c: float, interval: str = "5m") -> dict:
    t = T0 + i * 300_000
    return records.kline("BTCUSDT", interval, t, t + 299_999, o, h, low, c, 1.0, None, None, None, None, "test")


def intent(intent_id: str) -> dict:
    return {"event_id": f"order:{intent_id}", "event_time": T0 + 299_999, "symbol": "BTCUSDT", "intent_id": intent_id,
            "action": "OPEN", "side": "BUY", "quantity": 10.0, "stop_loss": 98.0, "take_profit": 104.0,
            "source": "test"}


def test_order_fill_funding_take_profit_and_restart_in_event_time():
    desk = PaperDesk(CONFIG)
    assert desk.kline(bar(0, 100, 100, 100, 100)) == [] and desk.ready_for("BTCUSDT", T0)
    events = desk.release("BTCUSDT", T0)  # the bar of the signal, before its verdict
    desk.order(intent("i1"))  # the verdict's order
    desk.order(intent("i1"))  # duplicated intent
    assert desk.kline(bar(1, 100, 101, 99.5, 100.5)) == []  # held until the signal of bar 1
    assert desk.kline(bar(1, 100, 130, 60, 100.5, interval="1m")) == []  # another interval: ignored
    assert not desk.ready_for("BTCUSDT", T0 + 2 * 300_000)
    events += desk.release("BTCUSDT", T0 + 300_000)
    assert len(events) == 5

    # restart: the saved state holds the position and the held bar; a new duplicate, funding and the take-profit
    desk.funding(records.funding("BTCUSDT", T0 + 2 * 300_000, 0.0001, 100.0, "test"))
    desk.kline(bar(2, 100, 104.5, 99, 104))
    second = PaperDesk(CONFIG, desk.dumps())
    assert second.exchange.state.positions["BTCUSDT"].amount == 10
    assert second.ready_for("BTCUSDT", T0 + 2 * 300_000)
    second.order(intent("i1"))
    events += second.release("BTCUSDT", T0 + 2 * 300_000)
    assert second.release("BTCUSDT", T0 + 2 * 300_000) == []  # applied once
    assert second.exchange.state.positions == {}  # closed at the take-profit

    ids = client_ids("i1")
    got = [(e["event_type"], e["client_order_id"], e["execution_type"] or e["order_status"] or e["reason"])
           for e in events]
    assert got == [
        ("ORDER_TRADE_UPDATE", ids["entry"], "NEW"), ("ORDER_TRADE_UPDATE", ids["entry"], "TRADE"),
        ("ACCOUNT_UPDATE", None, "ORDER"), ("ALGO_UPDATE", ids["sl"], "NEW"), ("ALGO_UPDATE", ids["tp"], "NEW"),
        ("ACCOUNT_UPDATE", None, "FUNDING_FEE"),
        ("ALGO_UPDATE", ids["tp"], "TRIGGERED"), ("ORDER_TRADE_UPDATE", ids["tp"], "NEW"),
        ("ORDER_TRADE_UPDATE", ids["tp"], "TRADE"), ("ACCOUNT_UPDATE", None, "ORDER"),
        ("ALGO_UPDATE", ids["tp"], "FINISHED"), ("ALGO_UPDATE", ids["sl"], "CANCELED")]
    assert events[1]["last_filled_price"] == 100 * 1.001 and events[1]["trade_time"] == T0 + 300_000
    assert round(events[5]["balances"][0]["balance_change"], 9) == -0.1  # a long pays 10 × 100 × 0.0001
    assert events[8]["last_filled_price"] == 104 * 0.999
    assert len({e["event_id"] for e in events}) == len(events)
    assert {e["source"] for e in events} == {"paper"}


def test_bars_held_past_max_held_are_applied_and_their_late_signals_are_told_so():
    """A chain lagging the market data by more than MAX_HELD bars: the oldest bars go to the engine without their
    signals; `passed` says how far the engine is past a signal's bar (0 when the bar was applied for it)."""
    desk = PaperDesk(CONFIG)
    for i in range(MAX_HELD + 10):
        desk.kline(bar(i, 100, 101, 99, 100))
    assert desk.exchange.state.last_bar["BTCUSDT"] == T0 + 9 * 300_000  # the 10 oldest applied
    assert desk.passed("BTCUSDT", T0) == 9 * 300_000
    desk.release("BTCUSDT", T0 + 20 * 300_000)
    assert desk.passed("BTCUSDT", T0 + 20 * 300_000) == 0
    assert desk.passed("BTCUSDT", T0 + 19 * 300_000) == 300_000


def test_saved_state_is_the_held_bars_in_order_and_loads_back_the_same():
    """The desk's JSON is assembled from each held bar's own JSON (made once on arrival): it must say what encoding
    the whole state at once would, and load back to the same desk."""
    import json

    desk = PaperDesk(CONFIG)
    desk.kline(bar(0, 100, 100, 100, 100))
    desk.release("BTCUSDT", T0)
    desk.order(intent("i1"))
    for i in (3, 1, 2):  # out of order: held by open time
        desk.kline(bar(i, 100 + i, 101 + i, 99 + i, 100.5 + i))
    desk.funding(records.funding("BTCUSDT", T0 + 2 * 300_000, 0.0001, 100.0, "test"))
    state = json.loads(desk.dumps())
    assert state == {"exchange": desk.exchange.dumps(), "held": {"BTCUSDT": {
        "bars": [bar(i, 100 + i, 101 + i, 99 + i, 100.5 + i) for i in (1, 2, 3)],
        "funding": [records.funding("BTCUSDT", T0 + 2 * 300_000, 0.0001, 100.0, "test")]}}}
    again = PaperDesk(CONFIG, desk.dumps())
    assert again.dumps() == desk.dumps()
    assert PaperDesk(CONFIG, state).dumps() == desk.dumps()  # as the risk agent's snapshot holds it: parsed
    assert [e["event_type"] for e in again.release("BTCUSDT", T0 + 300_000)][:2] == ["ORDER_TRADE_UPDATE"] * 2
    assert json.loads(again.dumps())["held"]["BTCUSDT"]["bars"] == [bar(i, 100 + i, 101 + i, 99 + i, 100.5 + i)
                                                                    for i in (2, 3)]


def test_input_delivered_again_after_a_restart_is_applied_once():
    """At-least-once: a worker killed after saving its state but before committing its offsets reads the same bars
    and funding again with the newer state. A settlement taken twice would move the balance (and every verdict after
    it) away from an uninterrupted run's."""
    desk = PaperDesk(CONFIG)
    desk.kline(bar(0, 100, 100, 100, 100))
    desk.release("BTCUSDT", T0)
    desk.order(intent("again-1"))
    settlement = records.funding("BTCUSDT", T0 + 2 * 300_000, 0.0001, 100.0, "test")
    desk.funding(settlement)
    desk.kline(bar(1, 100, 101, 99.5, 100.5))
    desk.kline(bar(2, 100, 101, 99.5, 100.5))
    desk.release("BTCUSDT", T0 + 2 * 300_000)
    settled = desk.exchange.state.balance
    restarted = PaperDesk(CONFIG, desk.dumps())
    for again in (bar(1, 100, 101, 99.5, 100.5), bar(2, 100, 101, 99.5, 100.5)):
        assert restarted.kline(again) == []
    restarted.funding(settlement)
    restarted.kline(bar(3, 100, 101, 99.5, 100.5))
    restarted.kline(bar(3, 100, 101, 99.5, 100.5))  # and one held twice
    assert [b["open_time"] for b in restarted.held["BTCUSDT"].bars] == [T0 + 3 * 300_000]
    events = restarted.release("BTCUSDT", T0 + 3 * 300_000)
    assert [e["reason"] for e in events if e["event_type"] == "ACCOUNT_UPDATE"] == []
    assert restarted.exchange.state.balance == settled
    # the engine alone: the same settlement twice is taken once
    assert restarted.exchange.funding(settlement) == []
