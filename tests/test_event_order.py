"""The risk agent's event-time order across symbols (streams.risk.event_order): a signal may be decided once every
symbol has passed its time, decided from the bars and signals received, whatever order they arrived in."""

from __future__ import annotations

import json

from streams.risk.event_order import EVERYTHING, EventTimeOrder

BAR = 300_000


def never_idle(symbol: str) -> bool:
    return False


def test_the_cursor_is_the_time_every_symbol_has_passed():
    order = EventTimeOrder()
    for t in range(4):
        order.bar("BTCUSDT", t * BAR)
        order.bar("ETHUSDT", t * BAR)
    order.signal("BTCUSDT", 2 * BAR)  # BTC's chain is ahead: its bars up to 2 are answered
    order.signal("ETHUSDT", 0)
    # ETH's bar 1 is still on its way down the chain: only time 0 is passed by both
    assert order.cursor(never_idle) == 1 * BAR - 1
    order.signal("ETHUSDT", 1 * BAR)
    assert order.cursor(never_idle) == 2 * BAR - 1
    order.signal("ETHUSDT", 3 * BAR)
    order.signal("BTCUSDT", 3 * BAR)
    assert order.cursor(never_idle) == 3 * BAR  # nothing pending: each passed its newest bar


def test_arrival_order_does_not_change_the_cursor():
    events = [("bar", "BTCUSDT", 0), ("bar", "ETHUSDT", 0), ("signal", "ETHUSDT", 0), ("bar", "BTCUSDT", BAR),
              ("signal", "BTCUSDT", 0), ("bar", "ETHUSDT", BAR), ("signal", "BTCUSDT", BAR)]
    cursors = set()
    for shift in range(len(events)):  # the symbols interleaved differently, each symbol's own order kept
        btc = [e for e in events if e[1] == "BTCUSDT"]
        eth = [e for e in events if e[1] == "ETHUSDT"]
        mixed = btc[:shift] + eth + btc[shift:]
        order = EventTimeOrder()
        for kind, symbol, t in mixed:
            getattr(order, kind)(symbol, t)
        cursors.add(order.cursor(never_idle))
    assert cursors == {BAR - 1}  # ETH's bar 1 has no signal yet


def test_repeated_and_late_bars_and_signals_change_nothing():
    order = EventTimeOrder()
    order.bar("BTCUSDT", BAR)
    order.bar("BTCUSDT", BAR)
    order.signal("BTCUSDT", BAR)
    order.bar("BTCUSDT", 0)  # late: older than an answered bar
    order.signal("BTCUSDT", 0)  # delivered again
    assert order.cursor(never_idle) == BAR
    assert order.clocks["BTCUSDT"].pending == []


def test_an_idle_symbol_holds_nobody_back_unless_it_owes_a_signal():
    order = EventTimeOrder()
    order.bar("BTCUSDT", 5 * BAR)
    order.signal("BTCUSDT", 5 * BAR)
    order.bar("ETHUSDT", BAR)
    order.signal("ETHUSDT", BAR)  # ETH's feed ended at bar 1
    assert order.cursor(never_idle) == BAR
    assert order.cursor(lambda s: s == "ETHUSDT") == 5 * BAR
    assert order.cursor(lambda s: True) == EVERYTHING
    order.bar("ETHUSDT", 2 * BAR)  # a bar whose signal is still to come: not idle, whatever its feed says
    assert order.cursor(lambda s: s == "ETHUSDT") == 2 * BAR - 1


def test_the_state_survives_a_restart():
    order = EventTimeOrder()
    order.bar("BTCUSDT", 0)
    order.bar("BTCUSDT", BAR)
    order.signal("BTCUSDT", 0)
    again = EventTimeOrder(json.loads(json.dumps(order.to_state())))
    assert again.to_state() == order.to_state() and again.cursor(never_idle) == BAR - 1


def test_a_symbol_another_worker_owns_holds_nobody_back_here():
    """A book taken over at a rebalance knows symbols whose partitions another worker has now: their pending
    bars are answered there, not here."""
    order = EventTimeOrder()
    order.bar("BTCUSDT", 3 * BAR)
    order.signal("BTCUSDT", 3 * BAR)
    order.bar("ETHUSDT", BAR)  # pending: its signal goes to the worker that owns ETHUSDT now
    assert order.cursor(never_idle) == BAR - 1
    assert order.cursor(never_idle, owned=lambda s: s != "ETHUSDT") == 3 * BAR


def test_signals_the_group_handled_elsewhere_answer_a_taken_over_books_pending_bars():
    """After a hand-over the committed offsets on `signals` say how far the group got: those signals will not come
    again, so the bars they answered are no longer pending (else the cursor stays behind them for good)."""
    order = EventTimeOrder()
    for t in range(3):
        order.bar("BTCUSDT", t * BAR)
    order.signal("BTCUSDT", 0)
    assert order.cursor(never_idle) == BAR - 1  # bars 1 and 2 owe signals...
    order.signal("BTCUSDT", 2 * BAR)  # ... which the other worker handled (the newest signal read back)
    assert order.cursor(never_idle) == 2 * BAR and order.clocks["BTCUSDT"].pending == []
