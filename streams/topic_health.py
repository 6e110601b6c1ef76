"""Topic health: end offsets, message rates over the last minute, consumer-group lag.

One sampler serves every view: `perpflow up` runs it in the background (Prometheus gauges and
the control API's /topics), and `perpflow topics` runs it locally against an external broker.
End offsets come from fetch high-watermarks (`streams.broker.end_offsets`), never ListOffsets alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from schemas.catalog import TOPICS
from streams import metrics
from streams.broker import client_config, committed_offsets, end_offsets

WINDOW_S = 60.0


@dataclass
class TopicRow:
    topic: str
    partitions: int
    end_offset: int
    msgs_per_s: float | None  # None until two samples span some time


@dataclass
class GroupRow:
    group: str
    topic: str
    partition: int
    committed: int
    end_offset: int

    @property
    def lag(self) -> int:
        return max(self.end_offset - self.committed, 0)


@dataclass
class Snapshot:
    taken_at: float
    window_s: float
    topics: list[TopicRow]
    groups: list[GroupRow]

    def to_json(self) -> dict:
        return {"taken_at": self.taken_at, "window_s": self.window_s,
                "topics": [asdict(t) for t in self.topics],
                "groups": [asdict(g) | {"lag": g.lag} for g in self.groups]}

    @classmethod
    def from_json(cls, doc: dict) -> Snapshot:
        return cls(doc["taken_at"], doc["window_s"], [TopicRow(**t) for t in doc["topics"]],
                   [GroupRow(**{k: v for k, v in g.items() if k != "lag"}) for g in doc["groups"]])


class TopicHealth:
    def __init__(self, bootstrap: str, topics: list[str] | None = None):
        self.bootstrap = bootstrap
        self.topics = topics or [t.name for t in TOPICS]
        self.admin = AdminClient(client_config(bootstrap))
        self.history: deque[tuple[float, dict[tuple[str, int], int]]] = deque()
        self.latest: Snapshot | None = None
        self._lock = threading.Lock()

    def sample(self) -> Snapshot:
        now = time.time()
        offsets = end_offsets(self.bootstrap, self.topics)
        with self._lock:
            self.history.append((now, offsets))
            while len(self.history) > 2 and now - self.history[1][0] >= WINDOW_S:
                self.history.popleft()
            first_t, first = self.history[0]
        span = now - first_t
        rows = []
        for name in self.topics:
            parts = {p: o for (t, p), o in offsets.items() if t == name}
            if not parts:
                continue
            total = sum(parts.values())
            before = sum(o for (t, _), o in first.items() if t == name)
            rate = (total - before) / span if span > 0.5 else None
            rows.append(TopicRow(name, len(parts), total, rate))
            for p, o in parts.items():
                metrics.TOPIC_END_OFFSET.labels(name, str(p)).set(o)
            if rate is not None:
                metrics.TOPIC_RATE.labels(name).set(rate)
        groups = self._group_rows(offsets)
        lag_by = {}
        for g in groups:
            lag_by[(g.group, g.topic)] = lag_by.get((g.group, g.topic), 0) + g.lag
        for (group, topic), lag in lag_by.items():
            metrics.GROUP_LAG.labels(group, topic).set(lag)
        snap = Snapshot(now, span, rows, groups)
        self.latest = snap
        return snap

    def _group_rows(self, offsets: dict[tuple[str, int], int]) -> list[GroupRow]:
        try:
            listed = self.admin.list_consumer_groups(request_timeout=5).result()
        except KafkaException:
            return []
        names = sorted(g.group_id for g in listed.valid if not g.group_id.startswith("perpflow-probe-"))
        rows = []
        for name in names:
            try:
                committed = committed_offsets(self.admin, name)
            except KafkaException:
                continue
            for (topic, partition), offset in committed.items():
                if (topic, partition) in offsets:
                    rows.append(GroupRow(name, topic, partition, offset, offsets[(topic, partition)]))
        return rows

    def run(self, stop: threading.Event, every: float = 5.0) -> None:
        while not stop.is_set():
            try:
                self.sample()
            except Exception:  # a broker hiccup must not kill the sampler; next round retries
                pass
            stop.wait(every)
