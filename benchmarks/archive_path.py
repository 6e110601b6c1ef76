"""Replay → broker → ClickHouse sink throughput on real data, against the target of 50,000 rows/s.

A: the replay alone into the embedded broker. B: a ClickHouseSink draining the filled topics into chDB.
C: end to end as `perpflow up --source replay --speed max --until-drained` runs it (replay in its own
process, sink in the parent). Each phase checks that exactly what was published arrived."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import _data
from connectors.clickhouse_sink import ClickHouseSink
from connectors.clickhouse_store import Store
from connectors.replay import ReplaySource
from schemas.catalog import archived
from streams.broker import EmbeddedBroker, end_offsets, ensure_topics
from streams.settings import Settings
from streams.up import UpOptions, run_up

TARGET = 50_000  # rows/s
TIMEOUT = 900.0  # s for the sink to catch up


def _settings(home: Path, **extra) -> Settings:
    # embedded broker and store whatever PERPFLOW_* says: the benchmark measures those
    return Settings(home=home, kafka_bootstrap="", clickhouse_url="", **extra)


def _per_topic(offsets: dict[tuple[str, int], int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (name, _), off in offsets.items():
        out[name] = out.get(name, 0) + off
    return out


def _check(what: str, got: dict[str, int], published: dict[str, int]) -> bool:
    """Every archived topic must hold / have archived exactly what was published (0 for the others)."""
    bad = {t.name: (got.get(t.name, 0), published.get(t.name, 0)) for t in archived()
           if got.get(t.name, 0) != published.get(t.name, 0)}
    for name, (n, want) in bad.items():
        print(f"  FAIL {what}: {name} has {n:,}, published {want:,}")
    if not bad:
        print(f"  ok   {what} = published: " + ", ".join(f"{t} {n:,}" for t, n in published.items()))
    return not bad


def _no_dead_letters(n: int) -> bool:
    if n:
        print(f"  FAIL {n:,} messages went to the dead-letter topic")
    return not n


def _figure(label: str, rows: int, seconds: float) -> None:
    rate = rows / seconds
    print(f"  {label:<52} {rows:>9,} rows in {seconds:6.2f} s = {rate:>8,.0f} rows/s  "
          f"{'PASS' if rate >= TARGET else 'MISS'} (target {TARGET:,})")


def _archived_counts(store: Store) -> dict[str, int]:
    return {t.name: store.query_rows(f"SELECT count() FROM `{t.table}` FINAL")[0][0] for t in archived()}


def phases_a_b(data: Path, symbols: list[str] | None, start_ms: int | None, home: Path) -> bool:
    broker = EmbeddedBroker().start()
    store = None
    try:
        ensure_topics(broker.bootstrap)
        settings = _settings(home)
        store = Store(settings)
        store.ensure_tables(archived())

        print("A  replay alone → embedded broker (load + timeline + encode + produce + flush)")
        t0 = time.monotonic()
        result = ReplaySource(broker.bootstrap, str(data), symbols, start_ms, None).run()
        seconds = time.monotonic() - t0
        published = result.published
        targets = end_offsets(broker.bootstrap, [t.name for t in archived()])
        ok = _check("messages in the topics", _per_topic(targets), published)
        _figure("replay events published", sum(published.values()), seconds)

        print("B  ClickHouseSink draining the filled topics → chDB")
        sink = ClickHouseSink(broker.bootstrap, store, batch_rows=settings.sink_batch_rows,
                              batch_seconds=settings.sink_batch_seconds)
        errors: list[BaseException] = []

        def run_sink() -> None:
            try:
                sink.run()
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=run_sink, name="sink", daemon=True)
        t0 = time.monotonic()
        thread.start()
        first: tuple[float, int] | None = None
        while not sink.caught_up(targets) and thread.is_alive() and time.monotonic() - t0 < TIMEOUT:
            if first is None and sink.rows_inserted:
                first = (time.monotonic(), sink.rows_inserted)
            time.sleep(0.002)
        done = time.monotonic()
        sink.stop()
        thread.join(60)
        if errors or not sink.caught_up(targets):
            print(f"  FAIL the sink did not catch up: {errors[0] if errors else f'timeout after {TIMEOUT:.0f} s'}")
            return False
        ok &= _check("rows archived (FINAL)", _archived_counts(store), published)
        ok &= _no_dead_letters(sink.dead_letters)
        total = sink.rows_inserted
        _figure("sink, from start (includes the group join)", total, done - t0)
        if first is not None and total > first[1]:
            print(f"     the first {first[1]:,} rows landed {first[0] - t0:.2f} s after start")
            _figure("sink, from the first inserted rows", total - first[1], done - first[0])
        return ok
    finally:
        if store is not None:
            store.close()
        broker.stop()


def phase_c(data: Path, symbols: list[str] | None, start_ms: int | None, home: Path) -> bool:
    print("C  end to end: streams.up.run_up, replay process + sink (includes broker/store start-up and loading)")
    opts = UpOptions(source="replay", data=str(data), symbols=symbols, start_ms=start_ms, end_ms=None, speed=None,
                     until_drained=True)
    # no Faust worker: this measures the archive path (the features agent has its own benchmark)
    summary = run_up(_settings(home, metrics_port=0, worker_metrics_port=0, run_worker=False), opts)
    ok = _check("rows archived (FINAL)", summary.rows_archived, summary.published)
    ok &= _check("messages in the topics", summary.topic_messages, summary.published)
    ok &= _no_dead_letters(summary.dead_letters)
    _figure("rows archived / summary.seconds (all of up)", sum(summary.rows_archived.values()), summary.seconds)
    _figure("rows archived from the sink's first insert", sum(summary.rows_archived.values()),
            summary.archive_seconds)
    return ok


def run(quick: bool = False) -> bool:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data, symbols, start_ms = _data.choose(quick)
    window = f"{', '.join(symbols)} from 2023-06-01" if symbols else "all symbols, all bars"
    print(f"archive path: data {data} ({window}), target {TARGET:,} rows/s")
    if quick:
        print("(--quick: too few rows for throughput; the figures mostly show the ~3-4 s consumer-group join,\n"
              " the sink's 1 s batch timer and start-up/shutdown)")
    with tempfile.TemporaryDirectory(prefix="perpflow-bench-") as tmp:
        ok = phases_a_b(data, symbols, start_ms, Path(tmp) / "ab")
        ok &= phase_c(data, symbols, start_ms, Path(tmp) / "c")
    print("archive path: " + ("counts verified" if ok else "FAILED: archived counts differ from published"))
    return ok


if __name__ == "__main__":
    raise SystemExit(0 if run() else 1)
