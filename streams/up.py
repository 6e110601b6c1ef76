"""`perpflow up`: start what is not configured externally, then run the pipeline pieces of this
process — replay source and ClickHouse sink (the Faust worker joins when it has agents) — until
Ctrl-C/SIGTERM, or with `until_drained` until the replay finished and the sink caught up.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from connectors.clickhouse_sink import ClickHouseSink
from connectors.replay import ReplayResult, ReplaySource
from schemas.catalog import archived
from streams.broker import end_offsets
from streams.settings import Settings
from streams.stack import Stack

log = logging.getLogger(__name__)


@dataclass
class UpOptions:
    source: str = "replay"  # replay | none
    data: str | None = None
    symbols: list[str] | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    speed: float | None = None  # None = max
    until_drained: bool = False


@dataclass
class UpSummary:
    published: dict[str, int] = field(default_factory=dict)
    topic_messages: dict[str, int] = field(default_factory=dict)
    rows_archived: dict[str, int] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    dead_letters: int = 0
    seconds: float = 0.0


class _Worker(threading.Thread):
    """A thread that remembers the exception that ended it."""

    def __init__(self, name: str, target):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None
        self.result = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def run_up(settings: Settings, opts: UpOptions) -> UpSummary:
    started = time.monotonic()
    summary = UpSummary()
    with Stack(settings) as stack:
        sink = ClickHouseSink(stack.bootstrap, stack.store, batch_rows=settings.sink_batch_rows,
                              batch_seconds=settings.sink_batch_seconds)
        sink_thread = _Worker("clickhouse-sink", sink.run)
        sink_thread.start()
        replay = replay_thread = None
        if opts.source == "replay":
            replay = ReplaySource(stack.bootstrap, opts.data, opts.symbols, opts.start_ms, opts.end_ms, opts.speed)
            replay_thread = _Worker("replay", replay.run)
            replay_thread.start()
        try:
            while True:
                for t in (sink_thread, replay_thread):
                    if t is not None and t.error is not None:
                        raise t.error
                if opts.until_drained and replay_thread is not None and not replay_thread.is_alive():
                    result: ReplayResult = replay_thread.result
                    _wait_drained(stack.bootstrap, sink, sink_thread)
                    summary.published = result.published
                    summary.skipped_rows = dict(result.report.skipped_rows)
                    summary.problems = list(result.report.problems)
                    break
                time.sleep(0.2)
        finally:
            if replay:
                replay.stop_event.set()
            sink.stop()
            sink_thread.join(60)
        if sink_thread.error is not None:
            raise sink_thread.error
        topics = [t.name for t in archived()]
        offsets = end_offsets(stack.bootstrap, topics)
        summary.topic_messages = {t: sum(o for (n, _), o in offsets.items() if n == t) for t in topics}
        summary.rows_archived = {
            t.name: stack.store.query_rows(f"SELECT count() FROM `{t.table}` FINAL")[0][0] for t in archived()
        }
        summary.dead_letters = sink.dead_letters
    summary.seconds = time.monotonic() - started
    return summary


def _wait_drained(bootstrap: str, sink: ClickHouseSink, sink_thread: _Worker) -> None:
    """Until the sink has archived and committed everything now in the archived topics."""
    topics = [t.name for t in archived()]
    while True:
        targets = end_offsets(bootstrap, topics)
        while not sink.caught_up(targets):
            if sink_thread.error is not None:
                raise sink_thread.error
            time.sleep(0.1)
        # dead letters the sink itself produced meanwhile are archived too: loop until stable
        if end_offsets(bootstrap, topics) == targets:
            return
