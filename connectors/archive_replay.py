"""Replay of archived market data for a backtest: ClickHouse's md_* tables (default) or Kafka's md.* topics →
a run's prefixed md.* topics, in event-time order across symbols, as fast as the run's agents take it.

What is replayed for a window [start, end): the 5m klines with open_time in it (the chain's interval) and every
mark price, funding settlement and open-interest record with event time in it — the same events a replay of the
history files over the window publishes (`connectors.replay`: a bar's close and its close-as-mark are < end).
The archive holds every field of each record (the sink stores them all; nested ones as JSON, which md.* records do
not have), so a row read back is the record that was published, byte for byte once encoded: no builder to drift.
Order: (event_time, klines → marks → funding → open interest, symbol, event_id) — the file replay's order, so a
backtest's features agent sees what `perpflow up --source replay` showed it.

Back-pressure at every hop of the chain (`connectors.back_pressure`), so neither the broker nor a producer queue
holds a whole backtest and the chain stays as close to the market data as live; ClickHouse is read a day at a time
for the same reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from connectors.back_pressure import ChainBackPressure
from connectors.clickhouse_store import Store
from connectors.history_files import LoadReport
from connectors.replay import ReplayResult
from schemas.catalog import topic
from schemas.codec import DecodeError, default_codec
from schemas.tables import columns, select_fields
from streams.broker import consumer_config, end_offsets, producer_config
from streams.console import ProgressLine
from streams.delivery import DeliveryReports
from streams.errors import PerpflowError

log = logging.getLogger(__name__)

INTERVAL = "5m"
# catalog topic → its rank among events of the same time (the file replay's order, open interest last)
MARKET_TOPICS = {"md.klines": 0, "md.markprice": 1, "md.funding": 2, "md.openinterest": 3}
CHUNK_MS = 86_400_000
PROGRESS_EVERY = 500


def _order_key(item: tuple[str, dict]) -> tuple:
    name, rec = item
    return rec["event_time"], MARKET_TOPICS[name], rec["symbol"], rec["event_id"]


class ArchiveReplay:
    """`run()` → ReplayResult, like `connectors.replay.ReplaySource`; `source` = "clickhouse" or "kafka"."""

    def __init__(self, bootstrap: str, source: str, symbols: list[str], start_ms: int, end_ms: int, prefix: str,
                 group: str, store: Store | None = None, source_prefix: str = ""):
        if source not in ("clickhouse", "kafka"):
            raise ValueError(f"unknown backtest source {source!r}: clickhouse or kafka")
        if source == "clickhouse" and store is None:
            raise ValueError("a ClickHouse replay needs the store")
        self.bootstrap, self.source, self.store = bootstrap, source, store
        self.symbols, self.start_ms, self.end_ms = sorted(symbols), start_ms, end_ms
        self.prefix, self.group = prefix, group  # the run's topics, and the consumer group that paces the replay
        self.source_prefix = source_prefix  # --source kafka: the topics read (the live ones by default)
        self.codec = default_codec()
        self.stop_event = threading.Event()
        self.back_pressure = ChainBackPressure(bootstrap, prefix, group, len(symbols))

    # -- reading ------------------------------------------------------------------------------------------------
    def _where(self, name: str, lo: int, hi: int) -> str:
        names = ", ".join(f"'{s}'" for s in self.symbols)
        if name == "md.klines":  # by bar: open_time in the window, as the file replay
            window = (f"`interval` = '{INTERVAL}' AND toUnixTimestamp64Milli(open_time) >= {lo} "
                      f"AND toUnixTimestamp64Milli(open_time) < {hi}")
        else:
            window = f"toUnixTimestamp64Milli(event_time) >= {lo} AND toUnixTimestamp64Milli(event_time) < {hi}"
        return f"symbol IN ({names}) AND {window}"

    def count(self) -> int:
        """Events the replay will publish (ClickHouse only: Kafka's are known once read)."""
        if self.source != "clickhouse":
            return 0
        return sum(self.store.query_rows(f"SELECT count() FROM `{topic(n).table}` FINAL WHERE "
                                         f"{self._where(n, self.start_ms, self.end_ms)}")[0][0] for n in MARKET_TOPICS)

    def _chunks_clickhouse(self):
        for lo in range(self.start_ms, self.end_ms, CHUNK_MS):
            hi = min(lo + CHUNK_MS, self.end_ms)
            items: list[tuple[str, dict]] = []
            for name in MARKET_TOPICS:
                t = topic(name)
                cols = columns(t)
                select = select_fields(t)
                where = self._where(name, lo, hi)
                rows = self.store.query_rows(f"SELECT {select} FROM `{t.table}` FINAL WHERE {where}")
                field_names = [c.name for c in cols]
                items += [(name, dict(zip(field_names, r, strict=True))) for r in rows]
            items.sort(key=_order_key)
            yield items

    def _chunks_kafka(self):
        """The source topics read from the beginning to their end now, the window's records kept (Kafka has no
        index by event time across topics: the window is sorted in memory, once)."""
        sources = {self.source_prefix + n: n for n in MARKET_TOPICS}
        ends = {k: v for k, v in end_offsets(self.bootstrap, list(sources)).items() if v > 0}
        consumer = Consumer(consumer_config(self.bootstrap, f"{self.group}-source", **{"enable.partition.eof": False}))
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for (t, p) in ends])
        wanted = set(self.symbols)
        items: list[tuple[str, dict]] = []
        remaining = dict(ends)
        try:
            while remaining and not self.stop_event.is_set():
                for msg in consumer.consume(5_000, timeout=0.5):
                    if msg.error():
                        continue
                    key = (msg.topic(), msg.partition())
                    if msg.offset() + 1 >= remaining.get(key, 0):
                        remaining.pop(key, None)
                    try:
                        _, rec = self.codec.decode(msg.value())
                    except DecodeError:
                        continue  # the live sink dead-letters it already
                    name = sources[msg.topic()]
                    if rec["symbol"] not in wanted:
                        continue
                    t = rec["open_time"] if name == "md.klines" else rec["event_time"]
                    if name == "md.klines" and rec["interval"] != INTERVAL:
                        continue
                    if self.start_ms <= t < self.end_ms:
                        items.append((name, rec))
        finally:
            consumer.close()
        # at-least-once upstream: the same event twice is published once (the archive's FINAL does the same)
        unique = {(name, rec["event_id"]): (name, rec) for name, rec in items}
        yield sorted(unique.values(), key=_order_key)

    # -- publishing ---------------------------------------------------------------------------------------------
    def run(self) -> ReplayResult:
        started = time.monotonic()
        reports = DeliveryReports("backtest replay")
        producer = Producer(producer_config(self.bootstrap, **reports.config()))
        schemas = {n: topic(n).schema for n in MARKET_TOPICS}
        published: Counter[str] = Counter()
        nbytes: Counter[str] = Counter()
        progress = ProgressLine(f"backtest replay ({self.source})", total=self.count(), unit="events")
        chunks = self._chunks_clickhouse() if self.source == "clickhouse" else self._chunks_kafka()
        sent = 0
        for items in chunks:
            for name, rec in items:
                if self.stop_event.is_set():
                    break
                self.back_pressure.pace(rec["event_time"], producer, self.stop_event)
                if sent % PROGRESS_EVERY == 0:
                    producer.poll(0)
                    if reports.resends_waiting:
                        reports.resend(producer)
                    progress.update(sent)
                value = self.codec.encode(schemas[name], rec)
                kafka_topic = self.prefix + name
                while True:
                    try:
                        producer.produce(kafka_topic, value, rec["symbol"].encode())
                        break
                    except BufferError:  # the local queue is full: let the broker catch up
                        producer.poll(0.05)
                published[kafka_topic] += 1
                nbytes[kafka_topic] += len(value)
                sent += 1
        undelivered = reports.flush(producer, 60)
        if undelivered:
            raise PerpflowError(f"the backtest replay could not deliver {undelivered:,} record(s) to the broker at "
                                f"{self.bootstrap} (first: {reports.first_failure or 'still queued after 60 s'})")
        progress.done(sent)
        return ReplayResult(dict(published), dict(nbytes), LoadReport(), time.monotonic() - started)
