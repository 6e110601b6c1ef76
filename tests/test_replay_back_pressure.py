"""The backtest replay's back-pressure (`connectors/archive_replay.py`) counts what is left to take at every hop of the
chain, not only on md.*: a fast features agent would otherwise let predict, policy and risk fall weeks behind the
market data that the risk agent's paper desk reads itself. (The replay itself runs in tests/test_backtest_run.py.)"""

from __future__ import annotations

import threading
import time

from connectors import archive_replay
from connectors.archive_replay import AHEAD_BARS_PER_SYMBOL, ArchiveReplay

P = "bt.r1."


def _replay() -> ArchiveReplay:
    replay = ArchiveReplay("127.0.0.1:1", "kafka", ["BTCUSDT", "ETHUSDT"], 0, 1, P, "perpflow-bt.r1")
    replay.ends_read = time.monotonic()  # end offsets "just read": the test sets them
    return replay


def test_lags_at_every_hop_from_committed_and_end_offsets():
    replay = _replay()
    replay.chain_ends = {(P + "features", 0): 900, (P + "features", 1): 300, (P + "predictions", 0): 1_000,
                         (P + "signals", 3): 50}
    committed = {(P + "md.klines", 0): 700, (P + "md.klines", 1): 200, (P + "md.markprice", 0): 5,
                 (P + "features", 0): 900, (P + "features", 1): 100, (P + "predictions", 0): 100,
                 ("md.klines", 0): 99_999}  # the live topic: not this run's
    assert replay.lags(committed, klines_sent=1_000) == {"md.klines": 100, "features": 200, "predictions": 900,
                                                          "signals": 50}


def test_the_replay_waits_while_a_later_hop_is_behind(monkeypatch):
    """md.klines taken, but the predict agent has too many features records left: held back until it takes them."""
    replay = _replay()
    limit = AHEAD_BARS_PER_SYMBOL * 2
    committed = {(P + "md.klines", 0): 5_000, (P + "features", 0): 5_000 - limit - 1}
    monkeypatch.setattr(archive_replay, "committed_offsets", lambda admin, group: dict(committed))
    monkeypatch.setattr(archive_replay, "end_offsets", lambda bootstrap, topics: {(P + "features", 0): 5_000})
    replay.ends_read = 0.0

    class Producer:
        def flush(self, timeout):
            return 0

    done = threading.Event()
    waiter = threading.Thread(target=lambda: (replay._hold_back(None, Producer(), 5_000), done.set()))
    waiter.start()
    assert not done.wait(0.5)  # one record too many left on `features`
    committed[(P + "features", 0)] = 5_000 - limit
    assert done.wait(5)
    waiter.join()
    assert replay.waited_seconds >= 0.5
