"""The ClickHouse sink: every archived topic → its table, at-least-once, idempotent.

Batches are bounded by rows and by time; offsets are committed only after the insert succeeded,
so a crash replays the last batch, and the tables (ReplacingMergeTree on event_id) absorb the
repeat. While ClickHouse is unavailable the sink pauses its partitions and retries with backoff.
Undecodable messages go to `deadletter` with the reason before their offset is committed.

A batch the store refuses for its data (a constraint, a value it cannot take: `data_error`) is split in halves
until the rows it refuses are single; each of those goes to `deadletter` (reason `store_rejected`, the store's
message) and the others land. Bounded: a batch of n rows with k refused ones costs at most ~2·k·log2(n) more
inserts. Anything else (the store down, overloaded, read-only) is retried with backoff for the whole batch, which
loses and skips nothing: its offsets are committed only after it landed.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from operator import itemgetter

import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from connectors.clickhouse_store import Store, below_the_chain
from schemas import event_ids
from schemas.catalog import Topic, archived
from schemas.codec import Codec, DecodeError, default_codec
from schemas.dead_letters import dead_letter
from schemas.tables import arrow_table, columns, table_name, to_json_if_nested
from streams import metrics
from streams.broker import consumer_config, producer_config
from streams.delivery import DeliveryReports

log = logging.getLogger(__name__)

GROUP = "perpflow-sink"
RISK_EVENTS = "risk.events"  # the live topic's: a backtest's (prefixed) risk events alert no one

# ClickHouse error codes that name the inserted data, not the server's state: CANNOT_PARSE_* (6, 27, 38, 41, 72),
# TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE, INCORRECT_DATA, TOO_LARGE_STRING_SIZE,
# SIZES_OF_ARRAYS_DONT_MATCH, CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN, DECIMAL_OVERFLOW, VIOLATED_CONSTRAINT. (252 is
# both "too many parts", the server's back-pressure, and "too many partitions for single INSERT block", the batch's
# shape, which a smaller block passes: see `data_error`.)
_DATA_ERROR_CODES = frozenset({6, 27, 38, 41, 53, 69, 70, 72, 117, 131, 190, 349, 407, 469})
_CODE = re.compile(r"\bCode:\s*(\d+)")


def data_error(exc: Exception) -> bool:
    """True when the store refused the rows themselves (or they could not be made into its columns); False for
    connection and server trouble, which a retry of the same rows outlives."""
    if isinstance(exc, (pa.ArrowException, OverflowError, TypeError, ValueError)) and not isinstance(exc, OSError):
        return True  # the Arrow columns could not be built from the rows
    code = getattr(exc, "code", None)
    if code is None:
        found = _CODE.search(str(exc))
        code = int(found.group(1)) if found else None
    if code == 252:
        return "partitions for single INSERT block" in str(exc)
    return code in _DATA_ERROR_CODES


class _TopicBatch:
    """Pending rows of one topic, kept as tuples of field values: columns are built once per insert."""

    def __init__(self, topic: Topic, name: str, run_id: str | None = None):
        self.topic = topic
        self.name = name  # the Kafka topic name (may carry a run prefix)
        self.run_id = run_id  # a backtest's rows go to its `bt_` table, with the run id
        self.table_name = table_name(topic, run_id is not None)
        fields = [c.name for c in columns(topic)]
        self.values = itemgetter(*fields)
        self.event_time_index = fields.index("event_time")
        self.nested = [c.name for c in columns(topic) if c.nested]
        self.record_name = default_codec().full_name(topic.schema)
        self.clear()

    def clear(self) -> None:
        self.rows: list[tuple] = []
        self.partitions: list[int] = []
        self.offsets: list[int] = []
        self.messages: list[tuple[bytes | None, bytes]] = []  # (key, value) as consumed: what a refused row was

    def table(self, lo: int = 0, hi: int | None = None) -> pa.Table:
        """The insert of rows [lo, hi)."""
        sl = slice(lo, hi)
        return arrow_table(self.topic, self.rows[sl], self.partitions[sl], self.offsets[sl], self.run_id)


class ClickHouseSink:
    def __init__(self, bootstrap: str, store: Store, topics: list[Topic] | None = None, prefix: str = "",
                 group: str = GROUP, batch_rows: int = 50_000, batch_seconds: float = 1.0,
                 codec: Codec | None = None, run_id: str | None = None):
        self.store = store
        self.codec = codec or default_codec()
        self.group = group
        self.batch_rows = batch_rows
        self.batch_seconds = batch_seconds
        self.topics = {prefix + t.name: t for t in (topics or archived())}
        self.dlq_topic = prefix + "deadletter"
        self.consumer = Consumer(consumer_config(bootstrap, group, **{"max.poll.interval.ms": 600_000}))
        self.dlq_reports = DeliveryReports("sink dead letters")
        self.dlq = Producer(producer_config(bootstrap, **self.dlq_reports.config()))
        self.batches = {name: _TopicBatch(t, name, run_id) for name, t in self.topics.items()}
        self._next_offsets: dict[tuple[str, int], int] = {}
        self.committed: dict[tuple[str, int], int] = {}
        self.rows_inserted = 0
        self.first_insert_at: float | None = None  # monotonic time of the first successful insert
        self.dead_letters = 0
        self.rows_rejected = 0  # rows the store refused for their data, dead-lettered
        self.stop_event = threading.Event()
        self._pending_rows = 0
        self._batch_started = time.monotonic()
        self._risk_event_last: dict[tuple[str, str, str], float] = {}

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        below_the_chain()
        self.consumer.subscribe(
            list(self.topics), on_revoke=lambda c, parts: self.flush(),
            on_assign=self._on_assign)
        try:
            while not self.stop_event.is_set():
                self._take_all(self.consumer.consume(5_000, timeout=0.1))
                if self._pending_rows and (
                    self._pending_rows >= self.batch_rows
                    or time.monotonic() - self._batch_started >= self.batch_seconds
                ):
                    self.flush()
                elif not self._pending_rows:
                    self._batch_started = time.monotonic()
                self._export_lag()
            self.flush()
        finally:
            self.consumer.close()
            self.dlq.flush(10)
            self.dlq = None  # release the client now, not whenever the sink object is collected

    def stop(self) -> None:
        self.stop_event.set()

    def _on_assign(self, consumer: Consumer, parts: list) -> None:
        """What the group committed before (an earlier sink on a broker that outlives it) counts as archived: a
        partition with nothing new would otherwise never look caught up."""
        for tp in consumer.committed(parts, timeout=10):
            if tp.offset >= 0:
                key = (tp.topic, tp.partition)
                self.committed[key] = max(self.committed.get(key, 0), tp.offset)
        log.info("sink joined group %s: %d partitions", self.group, len(parts))

    def caught_up(self, targets: dict[tuple[str, int], int]) -> bool:
        """True when every partition in `targets` has been archived and committed up to its offset."""
        return all(self.committed.get(k, 0) >= off for k, off in targets.items() if off > 0)

    # -- per message ------------------------------------------------------------------------
    def _take_all(self, msgs: list) -> None:
        """Decode a consumed batch into per-topic rows; metrics are counted once per batch."""
        decode, batches, next_offsets = self.codec.decode, self.batches, self._next_offsets
        counts: dict[str, list[int]] = {}
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("sink consumer error: %s", err)
                continue
            name, partition, offset, value = msg.topic(), msg.partition(), msg.offset(), msg.value()
            batch = batches[name]
            c = counts.setdefault(name, [0, 0])
            c[0] += 1
            c[1] += len(value) if value else 0
            next_offsets[(name, partition)] = offset + 1
            try:
                record_name, record = decode(value)
                if record_name != batch.record_name:
                    raise DecodeError("wrong_schema", f"{record_name} on a topic of {batch.record_name}")
            except DecodeError as exc:
                self._dead_letter(msg, exc)
                continue
            if name == RISK_EVENTS:
                self._note_risk_event(record)
            for col in batch.nested:
                record[col] = to_json_if_nested(record[col])
            batch.rows.append(batch.values(record))
            batch.partitions.append(partition)
            batch.offsets.append(offset)
            batch.messages.append((msg.key(), value))
            self._pending_rows += 1
        for name, (n, nbytes) in counts.items():
            metrics.MESSAGES_CONSUMED.labels(self.group, name).inc(n)
            metrics.BYTES_CONSUMED.labels(self.group, name).inc(nbytes)

    def _note_risk_event(self, record: dict) -> None:
        """perpflow_risk_event_last_seconds: every process's risk events pass through here (the guard's, the
        watchdog's, the connectors'), so the alerts on them need no exporter of their own."""
        key = (record["kind"], record["severity"], record["symbol"])
        t = record["event_time"] / 1000
        if t > self._risk_event_last.get(key, 0.0):
            self._risk_event_last[key] = t
            metrics.RISK_EVENT_LAST.labels(*key).set(t)

    def _dead_letter(self, msg, exc: DecodeError) -> None:
        self._send_dead_letter(dead_letter(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                                           exc.reason, exc.detail))

    def _send_dead_letter(self, record: dict) -> None:
        value = self.codec.encode("dead_letter", record)
        while True:
            try:
                self.dlq.produce(self.dlq_topic, key=record["source_topic"].encode(), value=value)
                break
            except BufferError:
                self.dlq.poll(0.05)
        self.dlq.poll(0)
        if self.dlq_reports.resends_waiting:
            self.dlq_reports.resend(self.dlq)
        self.dead_letters += 1
        metrics.DEAD_LETTERS.labels(record["source_topic"], record["reason"]).inc()
        log.warning("dead letter from %s[%d]@%d: %s (%s)", record["source_topic"], record["partition"],
                    record["offset"], record["reason"], record["error"][:200])

    # -- batches ----------------------------------------------------------------------------
    def flush(self) -> None:
        """Insert every pending batch, then commit the offsets they came from."""
        for batch in self.batches.values():
            if batch.rows:
                self._insert(batch)
        # dead letters must be safely in their topic before the offsets that produced them move on
        undelivered = self.dlq_reports.flush(self.dlq, 30)
        if undelivered:
            first = self.dlq_reports.first_failure or "still queued after 30 s"
            raise RuntimeError(f"{undelivered} dead-letter message(s) could not be delivered ({first}); "
                               "not committing offsets")
        if self._next_offsets:
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._next_offsets.items()]
            self.consumer.commit(offsets=offsets, asynchronous=False)
            self.committed.update(self._next_offsets)
            self._next_offsets.clear()
            metrics.SINK_BATCHES.inc()
        self._pending_rows = 0
        self._batch_started = time.monotonic()

    def _insert(self, batch: _TopicBatch) -> None:
        """Insert the batch; rows the store refuses for their data are found by halving and dead-lettered."""
        spans = [(0, len(batch.rows))]
        landed = 0
        while spans:
            lo, hi = spans.pop()
            refused = self._insert_span(batch, lo, hi)
            if refused is None:
                landed += hi - lo
            elif hi - lo == 1:
                self._reject_row(batch, lo, refused)
            else:
                mid = (lo + hi) // 2
                spans += [(mid, hi), (lo, mid)]  # the first half next
        metrics.SINK_ROWS.labels(batch.table_name).inc(landed)
        self.rows_inserted += landed
        if self.first_insert_at is None and landed:
            self.first_insert_at = time.monotonic()
        newest = max(r[batch.event_time_index] for r in batch.rows)
        metrics.EVENT_TIME_LAG.labels(self.group, batch.name).set(time.time() - newest / 1000)
        batch.clear()

    def _reject_row(self, batch: _TopicBatch, i: int, exc: Exception) -> None:
        self.rows_rejected += 1
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        partition, offset = batch.partitions[i], batch.offsets[i]
        if batch.topic.name == "deadletter":  # never a dead letter of a dead letter: it stays in its topic
            log.error("the store refused dead letter %s[%d]@%d (%s); it stays in the topic only", batch.name,
                      partition, offset, detail)
            return
        key, value = batch.messages[i]
        self._send_dead_letter(dead_letter(batch.name, partition, offset, key, value, "store_rejected", detail,
                                           event_ids.dead_letter(batch.name, partition, offset, "store")))

    def _insert_span(self, batch: _TopicBatch, lo: int, hi: int) -> Exception | None:
        """Insert rows [lo, hi), retrying with backoff while the store is unavailable; returns the error when it
        refuses the rows themselves (`data_error`), None once they landed."""
        try:
            table = batch.table(lo, hi)
        except Exception as exc:
            if data_error(exc):
                return exc
            raise
        delay, paused = 0.5, False
        while True:
            started = time.perf_counter()
            try:
                self.store.insert_arrow(batch.table_name, table)
                break
            except Exception as exc:
                metrics.SINK_INSERT_FAILURES.labels(batch.table_name).inc()
                if data_error(exc):
                    if paused:
                        self.consumer.resume(self.consumer.assignment())
                    log.warning("the store refused %d row(s) of %s (%s)%s", hi - lo, batch.table_name,
                                str(exc).splitlines()[0][:200], "" if hi - lo == 1 else "; splitting the batch")
                    return exc
                if self.stop_event.is_set() and delay > 8:
                    raise
                log.warning("insert into %s failed (%s); retrying in %.1f s", batch.table_name,
                            str(exc).splitlines()[0][:200], delay)
                if not paused:  # keep the group membership while waiting, fetch nothing new
                    self.consumer.pause(self.consumer.assignment())
                    paused = True
                _sleep_polling(self.consumer, delay)
                delay = min(delay * 2, 30.0)
        if paused:
            self.consumer.resume(self.consumer.assignment())
        metrics.SINK_INSERT_SECONDS.labels(batch.table_name).observe(time.perf_counter() - started)
        return None

    def _export_lag(self) -> None:
        for tp in self.consumer.assignment():
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            key = (tp.topic, tp.partition)
            pos = self._next_offsets.get(key, self.committed.get(key))
            if high >= 0 and pos is not None:
                metrics.CONSUMER_LAG.labels(self.group, tp.topic, str(tp.partition)).set(max(high - pos, 0))


def _sleep_polling(consumer: Consumer, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        consumer.poll(0.1)  # paused: serves heartbeats and callbacks, returns no records

