"""`perpflow up`: start what is not configured externally, then run the pipeline — the replay source
(its own process) or the Binance connectors (a thread: live rates are low, and their metrics belong on
this process's /metrics), the ClickHouse sink (a thread of this one, which owns the store) and a Faust
worker (its own process) — until Ctrl-C/SIGTERM, or with `until_drained` until the replay finished and
the sink caught up. Beside the sink, a periodic task measures the promoted models' live calibration
(streams/calibration.py): it reads the store too.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass, field

from confluent_kafka.admin import AdminClient

from connectors.clickhouse_sink import ClickHouseSink
from connectors.replay import ReplayResult, ReplaySource
from schemas.catalog import Topic, archived
from schemas.tables import table_name
from streams.app import app_id_for
from streams.broker import client_config, committed_offsets, die_with_parent, end_offsets, ensure_topics
from streams.calibration import CalibrationMonitor
from streams.errors import PerpflowError
from streams.features.sequencer import INPUT_TOPICS
from streams.settings import CHAIN_HOPS, Settings
from streams.stack import Stack
from streams.worker import WorkerProcess

log = logging.getLogger(__name__)


@dataclass
class UpOptions:
    source: str = "replay"  # replay | binance | none
    data: str | None = None
    symbols: list[str] | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    speed: float | None = None  # None = max
    until_drained: bool = False
    live: bool = False  # with source binance: the user data stream and the execution connector too
    paper: bool = True  # the worker's risk agent fills its orders on the paper exchange (never with live)
    # a backtest run (training.backtest.orchestrate): its topics' prefix (`bt.<run>.`), its id (rows archived in
    # the `bt_` tables), the models it pins (registry rows; None = the promoted ones)
    prefix: str = ""
    run_id: str | None = None
    models: list[dict] | None = None


@dataclass
class UpSummary:
    published: dict[str, int] = field(default_factory=dict)
    topic_messages: dict[str, int] = field(default_factory=dict)
    rows_archived: dict[str, int] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    dead_letters: int = 0
    seconds: float = 0.0
    replay_seconds: float = 0.0  # the replay's own time: to its last message acknowledged by the broker
    archive_seconds: float = 0.0  # from the sink's first insert until drained: the sustained archive rate
    worker_restarts: int = 0


class ReportingThread(threading.Thread):
    """A thread that remembers the exception that ended it."""

    def __init__(self, name: str, target):
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def _replay_process(bootstrap: str, opts: UpOptions, group: str | None, conn) -> None:
    """Child-process body: the replay encodes and produces on its own core while the parent's sink
    decodes and inserts on the other (one process would share one GIL between them)."""
    die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    replay = ReplaySource(bootstrap, opts.data, opts.symbols, opts.start_ms, opts.end_ms, opts.speed, opts.prefix,
                          group=group)
    # Ctrl-C is the parent's to handle; the parent stops the replay with SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: replay.stop_event.set())
    try:
        conn.send(("ok", replay.run()))
    except BaseException as exc:  # sent to the parent, which raises it
        conn.send(("error", exc))


class _ReplayProcess:
    def __init__(self, bootstrap: str, opts: UpOptions, group: str | None):
        ctx = multiprocessing.get_context("spawn")
        self._recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_replay_process, args=(bootstrap, opts, group, send),
                                   name="perpflow-replay", daemon=True)
        self.process.start()
        self.error: BaseException | None = None
        self.result: ReplayResult | None = None

    def poll(self) -> bool:
        """True once the replay has finished (result or error set)."""
        if self.result is None and self.error is None and self._recv.poll():
            status, value = self._recv.recv()
            if status == "ok":
                self.result = value
                value.export_metrics()
            else:
                self.error = value
        elif self.result is None and self.error is None and not self.process.is_alive():
            self.error = RuntimeError(f"the replay process died (exit code {self.process.exitcode})")
        return self.result is not None or self.error is not None

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: the replay stops producing and flushes
            self.process.join(15)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class _ArchiveReplayThread:
    """A backtest's replay of archived data (`--source clickhouse|kafka`): a thread, as it reads this process's
    store (chDB: one process per store); the same interface as _ReplayProcess."""

    def __init__(self, bootstrap: str, store, opts: UpOptions):
        from connectors.archive_replay import ArchiveReplay

        self.replay = ArchiveReplay(bootstrap, opts.source, opts.symbols, opts.start_ms, opts.end_ms, opts.prefix,
                                    app_id_for(opts.prefix), store)
        self.result: ReplayResult | None = None
        self.thread = ReportingThread("archive-replay", self._run)
        self.thread.start()

    def _run(self) -> None:
        self.result = self.replay.run()

    @property
    def error(self) -> BaseException | None:
        return self.thread.error

    def poll(self) -> bool:
        if self.result is None and self.error is None and not self.thread.is_alive():
            self.thread.error = RuntimeError("the backtest replay stopped")
        return self.result is not None or self.error is not None

    def stop(self) -> None:
        self.replay.stop_event.set()
        self.thread.join(30)


class _Borrowed:
    """A stack someone else opened (concurrent backtests in one process share one): used, not closed."""

    def __init__(self, stack: Stack):
        self.stack = stack

    def __enter__(self) -> Stack:
        return self.stack

    def __exit__(self, *exc) -> None:
        pass


def run_up(settings: Settings, opts: UpOptions, stack: Stack | None = None) -> UpSummary:
    """`stack`: run on an open stack instead of opening one (a backtest beside another in the same process)."""
    started = time.monotonic()
    summary = UpSummary()
    px = opts.prefix
    if px:  # a run's workers read and write its topics only, under a group of their own, metrics on any free port
        settings = settings.model_copy(update={"topic_prefix": px, "worker_metrics_port": 0})
    seed_filter = book_a_replay_allows(opts.start_ms) if opts.source == "replay" else None
    with _Borrowed(stack) if stack is not None else Stack(settings, seed_filter) as stack:
        if px:
            ensure_topics(stack.bootstrap, prefix=px)
        if opts.run_id is not None:
            stack.store.ensure_tables(archived(), backtest=True)
        sink = ClickHouseSink(stack.bootstrap, stack.store, batch_rows=settings.sink_batch_rows,
                              batch_seconds=settings.sink_batch_seconds, prefix=px,
                              group=f"perpflow-sink-{px.rstrip('.')}" if px else "perpflow-sink", run_id=opts.run_id)
        sink_thread = ReportingThread("clickhouse-sink", sink.run)
        sink_thread.start()
        announce_promoted_models(stack, px, opts.models)
        calibration = CalibrationMonitor(stack.store, settings)  # the live models' calibration, from live tables
        worker = WorkerProcess(settings, stack.bootstrap, opts.symbols, paper=opts.paper and not opts.live) \
            if settings.run_worker else None
        # at full speed the replay keeps pace with this run's worker (none here: nobody to keep pace with)
        replay = _ReplayProcess(stack.bootstrap, opts, app_id_for(px) if worker else None) \
            if opts.source == "replay" else None
        if opts.source in ("clickhouse", "kafka"):
            replay = _ArchiveReplayThread(stack.bootstrap, stack.store, opts)
        binance, binance_thread = None, None
        if opts.source == "binance":  # a thread: its metrics are this process's /metrics
            from connectors.binance.runner import BinanceSource

            binance = BinanceSource(settings, stack.bootstrap, opts.symbols or settings.symbols, opts.live,
                                    opts.start_ms, archived_bars=stack.store.newest_bars("binance"))
            binance_thread = ReportingThread("binance", binance.run)
            binance_thread.start()
        calibration.start()  # stopped in the finally below, before the store closes
        try:
            while True:
                if sink_thread.error is not None:
                    raise sink_thread.error
                if binance_thread is not None and not binance_thread.is_alive():
                    raise binance_thread.error or RuntimeError("the Binance connectors stopped")
                if worker is not None:
                    worker.check()
                if replay is not None and replay.poll():
                    if replay.error is not None:
                        raise replay.error
                    if opts.until_drained:
                        if worker is not None:
                            log.info("replay finished; waiting for the agents to process everything")
                            wait_for_agents(stack.bootstrap, worker, px)
                        log.info("waiting for the sink to archive everything")
                        _wait_drained(stack.bootstrap, sink, sink_thread, px)
                        summary.archive_seconds = time.monotonic() - (sink.first_insert_at or time.monotonic())
                        summary.published = replay.result.published
                        summary.replay_seconds = replay.result.seconds
                        summary.skipped_rows = dict(replay.result.report.skipped_rows)
                        summary.problems = list(replay.result.report.problems)
                        break
                time.sleep(0.1)
        finally:
            if binance is not None:
                binance.stop()
                binance_thread.join(30)
            if replay:
                replay.stop()
            if worker:
                worker.stop()
            if stack.broker is not None:
                _archive_state(stack.bootstrap, sink, sink_thread, px)
            calibration.stop()
            sink.stop()
            sink_thread.join(60)
        if sink_thread.error is not None:
            raise sink_thread.error
        topics = [t.name for t in archived()]
        offsets = end_offsets(stack.bootstrap, [px + t for t in topics])
        summary.topic_messages = {t: sum(o for (n, _), o in offsets.items() if n == px + t) for t in topics}
        where = f" WHERE run_id = '{opts.run_id}'" if opts.run_id is not None else ""
        summary.rows_archived = {
            t.name: stack.store.query_rows(f"SELECT count() FROM `{table_name(t, opts.run_id is not None)}` FINAL"
                                           f"{where}")[0][0] for t in archived()
        }
        summary.dead_letters = sink.dead_letters
        summary.worker_restarts = worker.restarts if worker else 0
    summary.seconds = time.monotonic() - started
    return summary


def book_a_replay_allows(start_ms: int | None):
    """The archived risk book a file replay from `start_ms` (None: the files' first bar) continues: the newest snapshot
    that has seen nothing at or after it. Replaying history the book has lived through (the same window again, after
    training, or after this run was killed) continues the book as it stood before that history, as the first run
    did: a newer book's fills and marks would contradict the replayed bars (the paper exchange skips bars it has
    applied). The archive keeps the newer snapshots; the trading state on `control` comes back all the same: an
    operator's HALT holds."""

    def keep(t: Topic, store) -> list[dict]:
        if t.name != "risk.book":
            return store.newest_per_key(t)
        if start_ms is None:
            kept = []
        else:
            kept = store.newest_per_key(t, where=f"toUnixTimestamp64Milli(newest_bar) < {int(start_ms)}")
        if [r["event_id"] for r in kept] != [r["event_id"] for r in store.newest_per_key(t)]:
            log.warning("the replay starts before the newest bar of the archived risk book: the paper book continues "
                        "from %s (pass --start after the newest bar to continue the newest book)",
                        "its last snapshot before the start" if kept else "nothing: it starts afresh")
        return kept

    return keep


def announce_promoted_models(stack: Stack, prefix: str = "", models: list[dict] | None = None) -> None:
    """The registry's promoted models on `control`, where the worker's predict agent learns them (it cannot open
    an embedded store, and the embedded broker starts empty). Same entity and event_id as the promotion's own
    record: announcing again changes nothing. A backtest pins its `models` (registry rows: one per side, or a
    walk-forward schedule of rows with `valid_from`) on its own `control` topic (`prefix`): its predict agent sees no
    other promotion."""
    from streams.control import control_token, publish
    from training import artifact, registry

    token = control_token(stack.settings)
    for side in ("long", "short"):
        rows = [row for row in models or [] if row["side"] == side] or [registry.promoted(stack.store, side)]
        if rows[0] is None:
            log.warning("no promoted model for the %s side: the worker will not predict (see `perpflow models`)", side)
            continue
        for row in rows:
            if models is None:  # promoted before the store kept artifacts: put it there for workers of other homes
                try:
                    artifact.keep(stack.store, artifact.locate(row["artifact_path"], row["sha256"],
                                                               stack.settings.home_dir / "models"), row["sha256"])
                except PerpflowError as exc:
                    log.error("promoted model %s: %s", row["id"], exc)
            entity = f"model:{side}" if row.get("valid_from") is None else f"model:{side}@{row['valid_from']}"
            publish(stack.bootstrap, entity, "model_promoted", registry.control_value(row, None),
                    row["actor"], row["promoted_at"] or row["created_at"], token=token, prefix=prefix)


STALL_SECONDS = 180.0  # input left, yet no offset committed and nothing released for this long: stuck


def wait_for_agents(bootstrap: str, worker: WorkerProcess, prefix: str = "") -> None:
    """Until the agents' consumer group has committed everything now in its input topics and holds nothing back
    (bars, signals; twice in a row: the agents write to some of their own inputs, e.g. user.events). `prefix`: a run's.
    A chain that stops moving with input left (STALL_SECONDS) is an error naming what is left, not a wait for ever.

    Not features.btc: its copies carry nothing new to up's one worker (BTC's snapshots are handed over in memory;
    a bar still waiting for one counts in held_back), and its Faust consumer was seen to stop fetching it midway
    (committed 2 of 10 per partition, records readable by any other consumer), which left this waiting forever."""
    # inputs of features, predict and risk (user.events: the risk agent's paper fills come back to it)
    topics = sorted({*INPUT_TOPICS, *CHAIN_HOPS, "user.events", "risk.events"})
    topics = [prefix + t for t in topics]
    admin = AdminClient(client_config(bootstrap))
    previous: dict | None = None
    seen, moved = None, time.monotonic()
    while True:
        worker.check()
        targets = end_offsets(bootstrap, topics)
        committed = committed_offsets(admin, app_id_for(prefix))
        held = worker.held_back()
        if all(committed.get(k, 0) >= off for k, off in targets.items() if off > 0) and held == 0:
            if targets == previous:
                return
            previous = targets
        if (committed, held) != seen:
            seen, moved = (committed, held), time.monotonic()
        elif time.monotonic() - moved > STALL_SECONDS:
            left = {}
            for (t, partition), off in targets.items():
                left[t] = left.get(t, 0) + max(off - committed.get((t, partition), 0), 0)
            raise PerpflowError(
                f"the agents stopped taking their input: nothing committed for {STALL_SECONDS:.0f} s with "
                f"{', '.join(f'{n:,} records of {t}' for t, n in sorted(left.items()) if n) or 'nothing'} left and "
                f"{held or 0:.0f} bars or signals held back; the worker's log: {worker.log_path}")
        time.sleep(0.5)


def _archive_state(bootstrap: str, sink: ClickHouseSink, sink_thread: ReportingThread, prefix: str = "",
                   timeout: float = 15.0) -> None:
    """Before the sink stops: what the worker and the connectors wrote last to the compacted topics (a HALT, the
    book's last copy, a lifecycle's step) archived. The embedded broker forgets them: the archive is their only copy."""
    targets = end_offsets(bootstrap, [prefix + t.name for t in archived() if t.compacted])
    deadline = time.monotonic() + timeout
    while not sink.caught_up(targets):
        if sink_thread.error is not None or not sink_thread.is_alive() or time.monotonic() > deadline:
            log.warning("the sink did not archive the last state records (trading state, risk book, execution "
                        "lifecycles) before stopping: a restart may not see them")
            return
        time.sleep(0.1)


def _wait_drained(bootstrap: str, sink: ClickHouseSink, sink_thread: ReportingThread, prefix: str = "") -> None:
    """Until the sink has archived and committed everything now in the archived topics."""
    topics = [prefix + t.name for t in archived()]
    while True:
        targets = end_offsets(bootstrap, topics)
        while not sink.caught_up(targets):
            if sink_thread.error is not None:
                raise sink_thread.error
            time.sleep(0.1)
        # dead letters the sink itself produced meanwhile are archived too: loop until stable
        if end_offsets(bootstrap, topics) == targets:
            return
