"""Rebalances mid-replay: a paced replay of the bundled real data through one worker while a second worker of the
same consumer group joins and leaves again (stopped with SIGTERM, or SIGKILLed: its partitions come back after the
group's session timeout). Each join and each leave is a rebalance. After the replay the agents must drain (no stall)
and every bar must have come through each hop of the chain once: one features record, one signal and one verdict
per bar (unique (symbol, open_time) per topic, against the bars replayed).

`python -m benchmarks rebalance` repeats it RUNS times and reports the stalls and the bars missing (goal: 0 and 0)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import _data
from connectors.replay import ReplaySource
from schemas.codec import default_codec
from streams import up
from streams.app import app_id_for
from streams.broker import EmbeddedBroker, ensure_topics, read_messages
from streams.errors import PerpflowError
from streams.settings import Settings
from streams.up import ReportingThread, wait_for_agents
from streams.worker import WorkerProcess

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
START_MS, END_MS = 1_703_808_000_000, 1_704_412_800_000  # 2023-12-29 → 2024-01-05: a week of two symbols
RUNS = 20
CYCLES = 5  # a join and a leave each: 10 rebalances per run
QUICK_CYCLES = 2
# a new worker joins; the older one leaves after JOIN_SECONDS (drawn: in the middle of the newcomer's join and
# table recovery, or after it), then the survivor runs alone for SOLO_SECONDS
JOIN_SECONDS = (0.5, 8.0)
SOLO_SECONDS = (2.0, 8.0)
STALL_SECONDS = 60.0  # the drain's patience: nothing committed this long with input left is a stall
WATCHDOG_SECONDS = 30.0  # the workers' own bound (a stall found is counted, and healed by a restart)
HOPS = ("features", "signals", "risk.verdicts")


@dataclass
class RunResult:
    rebalances: int = 0
    bars: int = 0
    missing: dict[str, int] = field(default_factory=dict)  # hop → bars without a record there
    stalled: str | None = None  # the drain's error
    watchdog_stalls: int = 0  # chain_stalled risk events: stalls the workers' watchdogs found (and `check` healed)
    # the last worker's consumer: records of a fetch handed after a seek back, which once undid the seek
    fetched_before_seek: float = 0.0
    past_gap: float = 0.0  # ... and records its agents were handed past a gap (sought back to, handed again)
    refetches: float = 0.0  # seeks back to a gap made again because it had not filled
    seconds: float = 0.0


def _bars(bootstrap: str, topic: str) -> set[tuple[str, int]]:
    """(symbol, open_time) of every 5m record now in `topic`."""
    return {(r["symbol"], r["open_time"]) for r in _records(bootstrap, topic) if r.get("interval", "5m") == "5m"}


def _records(bootstrap: str, topic: str, **match: object) -> list[dict]:
    """Every record now in `topic` whose fields equal `match`."""
    codec = default_codec()
    records = (codec.decode(m.value())[1] for m in read_messages(bootstrap, topic))
    out = [rec for rec in records if all(rec.get(k) == v for k, v in match.items())]
    return out


def _leave(worker: WorkerProcess, kill: bool) -> None:
    if kill:
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
    else:
        worker.stop()


def run_once(home: Path, cycles: int, seed: int = 0, say=print, full_speed: bool = False,
             symbols: list[str] | None = None, window: tuple[int | None, int | None] = (START_MS, END_MS)) -> RunResult:
    """One paced replay with `cycles` hand-overs: a new worker joins, the older one leaves (alternately stopped
    and SIGKILLed) while the newcomer may still be joining, as when `perpflow up` is restarted or a Deployment rolls.
    The last worker left drains the chain."""
    rng = random.Random(seed)
    symbols = symbols or SYMBOLS
    result = RunResult()
    started = time.monotonic()
    broker = EmbeddedBroker().start()
    try:
        bootstrap = broker.bootstrap

        def settings(n: int) -> Settings:
            s = Settings(home=home / f"worker-{n}", kafka_bootstrap=bootstrap, clickhouse_url="",
                         worker_metrics_port=0, symbols=symbols, control_token="rebalance-soak",
                         watchdog_seconds=WATCHDOG_SECONDS)
            s.run_dir.mkdir(parents=True, exist_ok=True)
            return s

        ensure_topics(bootstrap)
        worker = WorkerProcess(settings(0), bootstrap)
        speed = None  # full speed: as fast as the chain takes it (the replay's back-pressure), big batches
        if not full_speed:  # paced over the hand-overs
            speed = (window[1] - window[0]) / 1000 / (cycles * (sum(JOIN_SECONDS) + sum(SOLO_SECONDS)) / 2 + 5)
        replay = ReplaySource(bootstrap, str(_data.BUNDLED), symbols, *window, speed=speed, group=app_id_for(""))
        thread = ReportingThread("replay", replay.run)
        thread.start()
        try:
            time.sleep(3)  # the first worker's own join and first bars
            for cycle in range(cycles):
                joining = WorkerProcess(settings(cycle + 1), bootstrap)
                time.sleep(rng.uniform(*JOIN_SECONDS))
                kill = cycle % 2 == 1
                _leave(worker, kill)
                worker = joining
                result.rebalances += 2
                say(f"  rebalance {result.rebalances}: worker {cycle} {'SIGKILLed' if kill else 'stopped'}")
                time.sleep(rng.uniform(*SOLO_SECONDS))
                worker.check()
            thread.join()
            if thread.error is not None:
                raise thread.error
            patience, up.STALL_SECONDS = up.STALL_SECONDS, STALL_SECONDS
            try:
                wait_for_agents(bootstrap, worker)
            except (PerpflowError, RuntimeError) as exc:  # a drain stall, or a worker restarted in a loop
                result.stalled = str(exc)
            finally:
                up.STALL_SECONDS = patience
            skipped = "perpflow_agent_input_skipped_total"
            result.fetched_before_seek = worker.metric(skipped, agent="consumer", reason="fetched_before_seek") or 0
            result.past_gap = sum(worker.metric(skipped, agent=a, reason="gap") or 0 for a in ("features", "predict",
                                                                                               "risk"))
            result.refetches = worker.metric("perpflow_agent_input_refetches_total") or 0
        finally:
            replay.stop_event.set()
            worker.stop()
        bars = _bars(bootstrap, "md.klines")
        result.bars = len(bars)
        result.missing = {hop: len(bars - _bars(bootstrap, hop)) for hop in HOPS}
        result.watchdog_stalls = len(_records(bootstrap, "risk.events", kind="chain_stalled"))
    finally:
        broker.stop()
    result.seconds = time.monotonic() - started
    return result


def run(quick: bool = False) -> bool:
    runs, cycles = (1, QUICK_CYCLES) if quick else (RUNS, CYCLES)
    print(f"rebalance: {runs} run(s) of a paced replay (2023-12-29 → 2024-01-05, {', '.join(SYMBOLS)}), "
          f"{2 * cycles} rebalances each (a new worker joins, the older one is stopped or SIGKILLed)")
    stalls = lost = found = 0
    for n in range(runs):
        with tempfile.TemporaryDirectory(prefix="perpflow-rebalance-") as tmp:
            r = run_once(Path(tmp), cycles, seed=n, say=lambda line: None)
            kept = None
            if r.stalled or r.watchdog_stalls or sum(r.missing.values()):  # the workers' logs, to find out why
                kept = Path(tempfile.gettempdir()) / f"perpflow-rebalance-seed-{n}"
                shutil.copytree(tmp, kept, dirs_exist_ok=True)
        missing = sum(r.missing.values())
        stalls += r.stalled is not None
        lost += missing
        found += r.watchdog_stalls
        print(f"  run {n + 1}: {r.rebalances} rebalances, {r.bars:,} bars, missing "
              f"{', '.join(f'{hop} {k}' for hop, k in r.missing.items())}, watchdog stalls {r.watchdog_stalls}, "
              f"records past a gap {r.past_gap:.0f}, refetches {r.refetches:.0f}, fetched before a seek "
              f"{r.fetched_before_seek:.0f}, "
              f"{'STALLED: ' + r.stalled if r.stalled else 'drained'} ({r.seconds:.0f} s)"
              f"{f'; worker logs kept in {kept}' if kept else ''}")
    print(f"  runs {runs}, rebalances {runs * 2 * cycles}, stalls {stalls}, watchdog stalls {found}, "
          f"bars missing {lost}")
    # The quick run (in `make test`) holds what must hold every time: no stall goes unseen (the drain's patience
    # outlasts the watchdog's bound, so a stall the watchdog misses fails here) and no bar is lost. A stall the
    # watchdog found and its restart healed is counted, and fails the full soak only, whose goal is none at all
    # (open: a rebalance now and then leaves one partition unfetched, ~1 run in 10; see the watchdog's log line; and
    # once in ~25 runs verdicts went missing after a worker restart, likely signals held in the book of a worker
    # whose partitions were handed over while the new owner kept its own book: the kept logs say).
    return stalls == 0 and lost == 0 and (quick or found == 0)
