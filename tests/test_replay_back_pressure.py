"""Replay back-pressure (`connectors/back_pressure.py`): what is left to take is counted at every hop of the chain,
not only on md.*, since a fast features agent would otherwise let predict, policy and risk fall weeks behind the
market data that the risk agent's paper desk reads itself; and a replay never pauses between events of one time.
(The replays themselves run in tests/test_backtest_run.py and every `perpflow up --source replay` test.)"""

from __future__ import annotations

import threading

from connectors import back_pressure
from connectors.back_pressure import AHEAD_BARS_PER_SYMBOL, CHECK_EVERY, ChainBackPressure

P = "bt.r1."


class _Producer:
    def flush(self, timeout):
        return 0


def test_lags_at_every_hop_from_committed_and_end_offsets(monkeypatch):
    ends = {(P + "md.klines", 0): 800, (P + "md.klines", 1): 300, (P + "features", 0): 900, (P + "features", 1): 300,
            (P + "predictions", 0): 1_000, (P + "signals", 3): 50, ("md.klines", 0): 99_999}
    monkeypatch.setattr(back_pressure, "end_offsets", lambda bootstrap, topics: {
        k: v for k, v in ends.items() if k[0] in topics})
    committed = {(P + "md.klines", 0): 700, (P + "md.klines", 1): 300, (P + "md.markprice", 0): 5,
                 (P + "features", 0): 900, (P + "features", 1): 100, (P + "predictions", 0): 100,
                 ("md.klines", 0): 5}  # the live topic: not this run's
    lags = ChainBackPressure("127.0.0.1:1", P, "perpflow-bt.r1", 2).lags(committed)
    # predictions: published with the signals by the predict agent and read by no agent, so never a hop to wait for
    # (counted, its 900 left would hold a replay for good)
    assert lags == {"md.klines": 100, "features": 200, "signals": 50}


def test_the_replay_waits_while_a_later_hop_is_behind(monkeypatch):
    """md.klines taken, but the predict agent has too many features records left: held back until it takes them."""
    pressure = ChainBackPressure("127.0.0.1:1", P, "perpflow-bt.r1", 2)
    pressure.admin = object()  # not used: committed offsets come from the stub below
    limit = AHEAD_BARS_PER_SYMBOL * 2
    committed = {(P + "md.klines", 0): 5_000, (P + "features", 0): 5_000 - limit - 1}
    monkeypatch.setattr(back_pressure, "committed_offsets", lambda admin, group: dict(committed))
    monkeypatch.setattr(back_pressure, "end_offsets", lambda bootstrap, topics: {
        (P + "md.klines", 0): 5_000, (P + "features", 0): 5_000})
    done, stop = threading.Event(), threading.Event()
    waiter = threading.Thread(target=lambda: (pressure.hold_back(_Producer(), stop), done.set()))
    waiter.start()
    assert not done.wait(1.0)  # one record too many left on `features`
    committed[(P + "features", 0)] = 5_000 - limit
    assert done.wait(5)
    waiter.join()
    assert pressure.waited_seconds >= 1.0


def test_a_replay_pauses_only_between_two_event_times(monkeypatch):
    pressure = ChainBackPressure("127.0.0.1:1", P, "perpflow-bt.r1", 2)
    held_at: list[int] = []
    monkeypatch.setattr(pressure, "hold_back", lambda producer, stop: held_at.append(current))
    times = [t // 3 for t in range(3 * CHECK_EVERY)]  # three events per time: a bar of three symbols
    for i, current in enumerate(times):
        before = len(held_at)
        pressure.pace(current, _Producer(), threading.Event())
        if len(held_at) > before:  # a pause: before the first event of its time, after CHECK_EVERY events
            assert times[i - 1] != current and i >= CHECK_EVERY - 1
    assert len(held_at) == 2
