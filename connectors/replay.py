"""The replay source: recorded history → md.klines, md.markprice, md.funding, in event-time order
across symbols, as closed bars, at full speed or N× real time.

Event times: a bar is known at its close (`close_time` = open + interval − 1 ms, as Binance
reports it); a funding settlement at its funding time. Events with the same time go klines, then
marks, then funding, then by symbol — one deterministic order, so two replays publish the same
sequence.

Values are checked as on the live edge (`connectors.validation`): a record with a NaN, negative or absurd value goes
to `deadletter` with the reason, not to its md topic (the history reader has already skipped the rows it cannot
parse, `connectors.history_files`).

Per-bar mark price. The recorded data has mark-price klines only every 8 h, and a stale 8 h mark
would fake a premium. So each closed bar publishes one md.markprice record whose mark price is the
bar's close (source `replay:close-as-mark`: mark premium is zero by construction, no precision is
invented), whose funding_rate is the last *settled* rate at or before the bar's close (an as-of
join; the live stream shows a predicted rate, which the files do not have), and whose
next_funding_time is the next settlement on the symbol's funding grid. The 8 h mark klines are
used where they are exact: the mark price at a settlement (the open of the mark kline starting
then) goes into md.funding, as Binance's /fapi/v1/fundingRate reports it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import Producer

from connectors import validation
from connectors.back_pressure import ChainBackPressure
from connectors.history_files import LoadReport, SymbolHistory, load_history
from schemas import records
from schemas.codec import Codec, default_codec
from schemas.dead_letters import dead_letter
from streams import metrics
from streams.broker import producer_config
from streams.console import ProgressLine
from streams.delivery import DeliveryReports
from streams.errors import PerpflowError

log = logging.getLogger(__name__)

INTERVAL_MS = records.INTERVAL_MS
DEFAULT_FUNDING_MS = 8 * 3_600_000

KIND_KLINE, KIND_MARK, KIND_FUNDING = 0, 1, 2
TOPIC_OF_KIND = {KIND_KLINE: "md.klines", KIND_MARK: "md.markprice", KIND_FUNDING: "md.funding"}
SCHEMA_OF_KIND = {KIND_KLINE: "kline", KIND_MARK: "mark_price", KIND_FUNDING: "funding"}


def _nan_to_none(x: float) -> float | None:
    return None if x != x else x


@dataclass
class _Prepared:
    """One symbol's history as plain Python lists (fast per-event access) plus derived columns."""

    history: SymbolHistory
    kline_rows: list = field(default_factory=list)
    mark_funding_rate: list = field(default_factory=list)
    next_funding: list = field(default_factory=list)
    funding_rows: list = field(default_factory=list)
    funding_marks: list = field(default_factory=list)


def _prepare(h: SymbolHistory, start_ms: int | None) -> _Prepared:
    k, f, m = h.klines, h.funding, h.marks
    interval_ms = INTERVAL_MS[h.interval]
    p = _Prepared(h)
    close_time = k["open_time"].to_numpy() + interval_ms - 1
    p.kline_rows = list(zip(
        k["open_time"].tolist(), close_time.tolist(), k["open"].tolist(), k["high"].tolist(), k["low"].tolist(),
        k["close"].tolist(), k["volume"].tolist(), k["quote_volume"].tolist(),
        [None if t != t else int(t) for t in k["trades"].astype("float64").tolist()],
        k["taker_buy_volume"].tolist(), k["taker_buy_quote_volume"].tolist(), strict=True))
    f_time = f["funding_time"].to_numpy()
    f_rate = f["funding_rate"].to_numpy()
    # as-of: the last settlement at or before each bar's close, among those with a sane rate (a corrupt one is
    # dead-lettered as a funding event, and the marks after it carry the rate before it)
    with np.errstate(invalid="ignore"):
        sane = np.isfinite(f_rate) & (np.abs(f_rate) <= validation.MAX_FUNDING_RATE)
    sane_time, sane_rate = f_time[sane], f_rate[sane]
    idx = np.searchsorted(sane_time, close_time, side="right") - 1
    p.mark_funding_rate = [None if i < 0 else float(sane_rate[i]) for i in idx.tolist()]
    # settlements sit on a grid of whole hours from 00:00 UTC (8 h: 00/08/16); recorded times may be a few ms late
    hour = 3_600_000
    step = max(round(float(np.median(np.diff(f_time))) / hour), 1) * hour if len(f_time) > 1 else DEFAULT_FUNDING_MS
    p.next_funding = ((close_time // step + 1) * step).tolist()
    # funding events: the as-of row before start is context for marks, not an event to publish
    keep = f_time >= (start_ms if start_ms is not None else -(2**62))
    p.funding_rows = list(zip(f_time[keep].tolist(), f_rate[keep].tolist(), strict=True))
    # the mark price at a settlement: the open of the mark kline that starts then (within a second)
    m_open_time = m["open_time"].to_numpy(dtype=np.int64) if len(m) else np.array([], dtype=np.int64)
    m_open = m["open"].to_numpy(dtype=np.float64) if len(m) else np.array([])
    j = np.searchsorted(m_open_time, f_time[keep], side="right") - 1
    ok = (j >= 0) & (f_time[keep] - m_open_time[np.maximum(j, 0)] <= 1000) if len(m_open_time) else j < -1
    p.funding_marks = [float(m_open[jj]) if good else None for jj, good in zip(j.tolist(), ok.tolist(), strict=True)]
    return p


def build_timeline(prepared: list[_Prepared]) -> np.ndarray:
    """Event-time order across symbols: rows of (event_time, kind, symbol index, row index)."""
    parts = []
    for s, p in enumerate(prepared):
        n = len(p.kline_rows)
        close = np.fromiter((r[1] for r in p.kline_rows), dtype=np.int64, count=n)
        rows = np.arange(n, dtype=np.int64)
        for kind in (KIND_KLINE, KIND_MARK):
            parts.append(np.column_stack([close, np.full(n, kind), np.full(n, s), rows]))
        nf = len(p.funding_rows)
        ftime = np.fromiter((r[0] for r in p.funding_rows), dtype=np.int64, count=nf)
        parts.append(np.column_stack([ftime, np.full(nf, KIND_FUNDING), np.full(nf, s),
                                      np.arange(nf, dtype=np.int64)]))
    timeline = np.concatenate(parts) if parts else np.empty((0, 4), dtype=np.int64)
    order = np.lexsort((timeline[:, 3], timeline[:, 2], timeline[:, 1], timeline[:, 0]))
    return timeline[order]


@dataclass
class ReplayResult:
    published: dict[str, int]  # messages per topic
    published_bytes: dict[str, int]
    report: LoadReport
    seconds: float
    dead_letters: dict[tuple[str, str], int] = field(default_factory=dict)  # (topic, reason) → records refused

    def export_metrics(self) -> None:
        """Count the replay in this process's metrics (`perpflow up` runs the replay in a child process
        and calls this again on the result it receives, so its /metrics shows the replay too)."""
        for topic, n in self.published.items():
            metrics.MESSAGES_PRODUCED.labels(topic).inc(n)
            metrics.BYTES_PRODUCED.labels(topic).inc(self.published_bytes[topic])
            metrics.REPLAY_EVENTS.labels(topic).inc(n)
        for reason, count in self.report.skipped_rows.items():
            metrics.REPLAY_SKIPPED_ROWS.labels(reason).inc(count)
        for (topic, reason), count in self.dead_letters.items():
            metrics.DEAD_LETTERS.labels(topic, reason).inc(count)


class ReplaySource:
    def __init__(self, bootstrap: str, data_dir: str, symbols: list[str] | None, start_ms: int | None,
                 end_ms: int | None, speed: float | None = None, prefix: str = "", codec: Codec | None = None,
                 source_name: str = "replay", group: str | None = None, message_timeout_s: float | None = None):
        self.bootstrap = bootstrap
        self.data_dir = data_dir
        self.symbols = symbols
        self.start_ms, self.end_ms = start_ms, end_ms
        self.speed = speed  # None = as fast as the broker takes it
        self.prefix = prefix
        self.codec = codec or default_codec()
        self.source_name = source_name
        self.stop_event = threading.Event()
        # the consumer group of the agents reading what is replayed: at full speed the replay keeps pace with them
        # (`connectors.back_pressure`); None when no agent reads it (an archive-only run would wait forever)
        self.group = group
        self.message_timeout_s = message_timeout_s  # how long librdkafka tries a record (None: its default, 5 min)

    def load(self) -> tuple[list[_Prepared], LoadReport]:
        histories, report = load_history(self.data_dir, self.symbols, self.start_ms, self.end_ms)
        for problem in report.problems:
            log.warning("replay input: %s", problem)
        return [_prepare(histories[s], self.start_ms) for s in sorted(histories)], report

    def run(self) -> ReplayResult:
        started = time.monotonic()
        prepared, report = self.load()
        timeline = build_timeline(prepared)
        # paced like a live feed, an event leaves at once (the default linger, 20 ms, was most of the first hop's
        # latency); at full speed the linger fills the batches
        reports = DeliveryReports("replay")
        extra = {"linger.ms": 1} if self.speed else {}
        if self.message_timeout_s is not None:
            extra["message.timeout.ms"] = int(self.message_timeout_s * 1000)
        producer = Producer(producer_config(self.bootstrap, **extra, **reports.config()))
        topics = {k: self.prefix + v for k, v in TOPIC_OF_KIND.items()}
        published = dict.fromkeys(topics.values(), 0)
        nbytes = dict.fromkeys(topics.values(), 0)
        dead_letters: dict[tuple[str, str], int] = {}
        record_of = {KIND_KLINE: self.kline_record, KIND_MARK: self.mark_record, KIND_FUNDING: self.funding_record}
        check = {k: validation.CHECKS[v] for k, v in TOPIC_OF_KIND.items()}
        progress = ProgressLine("replay", total=len(timeline), unit="events")
        encode, produce, poll = self.codec.encode, producer.produce, producer.poll
        back_pressure = ChainBackPressure(self.bootstrap, self.prefix, self.group, len(prepared)) \
            if self.group and not self.speed else None
        wall0 = time.monotonic()
        t0 = int(timeline[0, 0]) if len(timeline) else 0
        for i, (event_time, kind, s, row) in enumerate(timeline.tolist()):
            if self.stop_event.is_set():
                break
            if self.speed:
                ahead = (event_time - t0) / 1000 / self.speed - (time.monotonic() - wall0)
                if ahead > 0:
                    producer.poll(0)
                    self.stop_event.wait(ahead)
            elif back_pressure is not None:
                back_pressure.pace(event_time, producer, self.stop_event)
            p = prepared[s]
            record = record_of[kind](p, row)
            symbol = p.history.symbol
            topic = topics[kind]
            found = check[kind](record)
            if found is not None:  # a NaN, negative or absurd value in the files: to the dead letters, not the md topic
                self._dead_letter(producer, topic, symbol, record, *found)
                dead_letters[(topic, found[0])] = dead_letters.get((topic, found[0]), 0) + 1
                continue
            value = encode(SCHEMA_OF_KIND[kind], record)
            while True:
                try:
                    produce(topic, value, symbol.encode())
                    break
                except BufferError:  # back-pressure: the local queue is full, let the broker catch up
                    poll(0.05)
            published[topic] += 1
            nbytes[topic] += len(value)
            if i % 5000 == 0:
                poll(0)
                if reports.resends_waiting:
                    reports.resend(producer)
                progress.update(i + 1)
        undelivered = reports.flush(producer, 60)
        if undelivered:
            raise PerpflowError(f"the replay could not deliver {undelivered:,} record(s) to the broker at "
                                f"{self.bootstrap} (first: {reports.first_failure or 'still queued after 60 s'}); "
                                "the md topics miss them: check the broker, then replay again")
        progress.done(sum(published.values()))
        result = ReplayResult(published, nbytes, report, time.monotonic() - started, dead_letters)
        result.export_metrics()
        return result

    def _dead_letter(self, producer: Producer, topic: str, symbol: str, record: dict, reason: str,
                     error: str) -> None:
        log.warning("replay: a %s record of %s refused (%s: %s)", topic, symbol, reason, error)
        payload = json.dumps(record, default=str).encode()
        value = self.codec.encode("dead_letter", dead_letter(topic, -1, -1, symbol, payload, reason, error))
        while True:
            try:
                producer.produce(self.prefix + "deadletter", value, topic.encode())
                return
            except BufferError:
                producer.poll(0.05)

    # -- the records, one per event kind (also used by benchmarks/codec.py) ----------------------
    def kline_record(self, p: _Prepared, row: int) -> dict:
        open_time, close_time, o, h, low, c, v, qv, trades, tbv, tbqv = p.kline_rows[row]
        return records.kline(p.history.symbol, p.history.interval, open_time, close_time, o, h, low, c, v,
                             _nan_to_none(qv), trades, _nan_to_none(tbv), _nan_to_none(tbqv), self.source_name)

    def mark_record(self, p: _Prepared, row: int) -> dict:
        close_time = p.kline_rows[row][1]
        return records.mark_price(p.history.symbol, close_time, p.kline_rows[row][5], None, None,
                                  p.mark_funding_rate[row], p.next_funding[row], f"{self.source_name}:close-as-mark")

    def funding_record(self, p: _Prepared, row: int) -> dict:
        funding_time, rate = p.funding_rows[row]
        return records.funding(p.history.symbol, funding_time, rate, p.funding_marks[row], self.source_name)
