"""Back-pressure for a replay that runs as fast as the decision chain takes it (a backtest's archive replay, and
`perpflow up --source replay` at full speed with its worker): the replay waits while any agent of the chain has
more than AHEAD_BARS_PER_SYMBOL bars per symbol still to take at its hop — md.klines (features, and the risk
agent's paper desk), `features` (predict, which runs the policy too), `signals` (risk) — by the agents' consumer
group's committed offsets against the topics' end offsets.

Why every hop: bounding only md.* let the later agents fall weeks behind the market data on a long run (the
features agent is the fastest), and the risk agent's paper desk, which reads md.klines itself, then had to apply bars
before their signals came (rejected as bar_passed): a backtest a live account, never that far behind, would not have
matched. Why at all: without it a replay publishes everything first, the broker and the producer queue hold the
whole history, and the features agent takes months of marks ahead of their klines and holds them (and saves them
with its state on every batch)."""

from __future__ import annotations

import threading
import time

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from streams.broker import client_config, committed_offsets, end_offsets
from streams.settings import CHAIN_HOPS

# bars per symbol an agent may have still to take, at each hop: well under the paper desk's MAX_HELD (two weeks)
# even summed over the hops, and seconds of work for the chain
AHEAD_BARS_PER_SYMBOL = 400
HOPS = CHAIN_HOPS
CHECK_EVERY = 500  # replayed events between two looks at the agents' progress
ENDS_EVERY_S = 0.5  # the end offsets cost a probe consumer: read at most this often


class ChainBackPressure:
    def __init__(self, bootstrap: str, prefix: str, group: str, symbols: int):
        self.bootstrap, self.prefix, self.group = bootstrap, prefix, group
        self.limit = AHEAD_BARS_PER_SYMBOL * max(symbols, 1)
        self.admin: AdminClient | None = None
        self.ends: dict[tuple[str, int], int] = {}
        self.ends_read = 0.0
        self.waited_seconds = 0.0  # time the replay spent held back
        self.since_check = 0
        self.last_time: int | None = None

    def pace(self, event_time: int, producer: Producer, stop: threading.Event) -> None:
        """Before each event is published. Every CHECK_EVERY events, at the first event of a new event time, hold
        back while the chain is behind: the events of one time go out together, so a symbol's bar waiting for
        BTCUSDT's bar of the same time (1000PEPEUSDT sorts before it) is never held up by a pause between them."""
        self.since_check += 1
        if self.since_check >= CHECK_EVERY and event_time != self.last_time:
            self.since_check = 0
            self.hold_back(producer, stop)
        self.last_time = event_time

    def lags(self, committed: dict[tuple[str, int], int]) -> dict[str, int]:
        """Records each hop's agent has still to take (end offsets read at most every ENDS_EVERY_S)."""
        if time.monotonic() - self.ends_read >= ENDS_EVERY_S:
            self.ends = end_offsets(self.bootstrap, [self.prefix + hop for hop in HOPS])
            self.ends_read = time.monotonic()
        lags = {}
        for hop in HOPS:
            name = self.prefix + hop
            lags[hop] = (sum(o for (t, _), o in self.ends.items() if t == name)
                         - sum(o for (t, _), o in committed.items() if t == name))
        return lags

    def hold_back(self, producer: Producer, stop: threading.Event) -> None:
        """Wait while a hop has more than the limit left to take (or until `stop`)."""
        if self.admin is None:
            self.admin = AdminClient(client_config(self.bootstrap))
        t0 = time.monotonic()
        while not stop.is_set():
            producer.flush(10)  # what was sent is in the broker: the agents' lag is measurable against it
            if max(self.lags(committed_offsets(self.admin, self.group)).values()) <= self.limit:
                break
            stop.wait(0.1)
        self.waited_seconds += time.monotonic() - t0
