"""`perpflow backtest`: archived market data replayed through the live chain — the same Faust agents (features →
predict → policy → risk) and the same paper exchange `perpflow up` runs, on topics of the run's own, with the run's
models pinned — then accounted, reported and recorded.

A run is `streams.up.run_up` with a topic prefix: its id names its topics (`bt.<run>.md.klines` …
`bt.<run>.user.events`), its agents' consumer group and changelog topics (`perpflow-bt.<run>…`), its sink group and
its `bt_*` archive rows (`run_id`), so live topics and runs beside each other never see each other's messages. The
models are pinned by publishing their promotion records on the run's own `control` topic, where its predict agent
looks for them; a live promotion meanwhile goes to the live `control` and changes nothing in the run.

Walk-forward (`--walk-forward`): the window is cut into steps of `retrain_every`; before the replay, each step gets
models trained with the recipe of the pinned models (their label spec and training config) on the trailing
`train_window` that ends a label horizon plus the training embargo before the step starts — so no label a model
learned from reaches into the bars it trades. The schedule is pinned (`valid_from` = the step's start) and the
predict agent switches models in event time, within one continuous replay: indicators, positions and the account
carry across steps as they would live. Leading steps without enough history to train trade nothing.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka.admin import AdminClient

from connectors.clickhouse_store import Store
from schemas.catalog import topic
from schemas.tables import columns, select_fields, table_name
from streams.app import app_id_for
from streams.broker import client_config
from streams.errors import PerpflowError
from streams.features.engine import BAR_MS, DAY_MS
from streams.settings import Settings
from streams.stack import Stack
from streams.up import UpOptions, UpSummary, run_up
from training import registry
from training.backtest import accounting, report, runs
from training.backtest import metrics as run_metrics

log = logging.getLogger(__name__)
SOURCES = ("clickhouse", "kafka")


@dataclass
class BacktestOptions:
    symbols: list[str]
    start_ms: int
    end_ms: int  # exclusive
    model: str = "promoted"  # "promoted", or model ids (comma-separated; a side not named uses its promoted model)
    source: str = "clickhouse"
    fee: float | None = None  # per fill, a fraction of the notional; None = the settings'
    slippage_bps: float | None = None
    out: Path | None = None  # default: $PERPFLOW_HOME/backtests/<run>
    keep_topics: bool = False
    walk_forward: bool = False
    retrain_every_ms: int = 7 * DAY_MS
    train_window_ms: int = 180 * DAY_MS


@dataclass
class BacktestResult:
    run_id: str
    out_dir: Path
    report_path: Path
    metrics: dict
    models: list[str]
    bars: int  # 5m bars replayed through the chain
    seconds: float  # replay start → everything archived
    up: UpSummary = field(default_factory=UpSummary)
    topics_deleted: int = 0

    @property
    def bars_per_second(self) -> float:
        return self.bars / self.seconds if self.seconds > 0 else 0.0


def new_run_id() -> str:
    """Time-ordered and unique (two runs in the same second differ): valid in topic and group names."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def run_prefix(run_id: str) -> str:
    return f"bt.{run_id}."


def run_settings(settings: Settings, opts: BacktestOptions) -> Settings:
    """The settings of the run's worker: the cost model the policy assumes is the one the paper exchange charges."""
    update = {}
    if opts.fee is not None:
        update |= {"fee": opts.fee, "paper_taker_fee": opts.fee}
    if opts.slippage_bps is not None:
        update |= {"slippage": opts.slippage_bps / 10_000, "paper_slippage_bps": opts.slippage_bps}
    return settings.model_copy(update=update) if update else settings


def pinned_models(store: Store, model: str) -> list[dict]:
    """Registry rows of both sides: the named ids, the promoted model for a side not named."""
    rows: dict[str, dict] = {}
    if model != "promoted":
        for mid in (m.strip() for m in model.split(",") if m.strip()):
            row = registry.get(store, mid)
            if row["side"] in rows:
                raise PerpflowError(f"--model names two {row['side']} models ({rows[row['side']]['id']}, {mid})")
            rows[row["side"]] = row
    for side in ("long", "short"):
        if side not in rows:
            row = registry.promoted(store, side)
            if row is None:
                raise PerpflowError(f"no model for the {side} side: name one with --model ID (`perpflow models "
                                    "list`) or promote one (`perpflow models promote`)")
            rows[side] = row
    return [rows["long"], rows["short"]]


def walk_forward_models(store: Store, models_dir: Path, opts: BacktestOptions,
                        say: Callable[[str], None]) -> list[dict]:
    """Train both sides for every step of the window; registry rows with `valid_from`, in step order."""
    from training import artifact
    from training.pipeline import label_spec, train_models
    from training.train import TrainConfig

    if opts.retrain_every_ms <= 0 or opts.train_window_ms <= 0:
        raise PerpflowError("--retrain-every and --train-window must be positive durations")
    recipe = pinned_models(store, opts.model)[0]  # both sides of a run share the label spec and the config
    path = artifact.locate(recipe["artifact_path"], recipe["sha256"], models_dir)
    cfg = TrainConfig(**artifact.manifest(path, recipe["sha256"])["config"])
    spec_id = recipe["label_spec_id"]
    gap = (label_spec(store, spec_id).horizon + cfg.embargo_bars) * BAR_MS
    rows: list[dict] = []
    for step in range(opts.start_ms, opts.end_ms, opts.retrain_every_ms):
        train_end = step - gap
        say(f"walk-forward step {_iso(step)}: training on {_iso(train_end - opts.train_window_ms)} → "
            f"{_iso(train_end)} (labels of spec {spec_id})")
        try:
            trained = train_models(store, models_dir, ["long", "short"], list(opts.symbols),
                                   train_end - opts.train_window_ms, train_end, spec_id, cfg,
                                   say=lambda line: say(f"  {line}"))
        except PerpflowError as exc:
            if rows:  # a later step always has more history than one that trained: something else is wrong
                raise
            say(f"  not trained ({exc}): the chain trades nothing before a later step's models")
            continue
        rows.extend({**row, "valid_from": step} for row, _ in trained)
    if not rows:
        raise PerpflowError("walk-forward: no step had enough labeled history before it to train; start the "
                            "backtest later or use a shorter --train-window")
    return rows


def run_backtest(settings: Settings, opts: BacktestOptions, stack: Stack | None = None,
                 say: Callable[[str], None] = log.info, run_id: str | None = None) -> BacktestResult:
    """One run. `stack`: an open stack to run on (several runs in one process share it); else one is opened here
    (on the embedded default it owns the store, so not while `perpflow up` runs on the same home)."""
    if opts.source not in SOURCES:
        raise PerpflowError(f"--source {opts.source!r}: one of {', '.join(SOURCES)}")
    if opts.start_ms >= opts.end_ms:
        raise PerpflowError("--start must be before --end")
    if stack is None:
        if opts.source == "kafka" and not settings.kafka_bootstrap:
            raise PerpflowError("--source kafka replays the md.* topics of a Kafka cluster (PERPFLOW_KAFKA_BOOTSTRAP); "
                                "the embedded broker starts empty: use --source clickhouse")
        with Stack(settings) as own:
            return run_backtest(settings, opts, own, say, run_id)
    if opts.source == "clickhouse":
        from connectors.archive_replay import ArchiveReplay

        found = ArchiveReplay(stack.bootstrap, "clickhouse", opts.symbols, opts.start_ms, opts.end_ms, "", "",
                              stack.store).count()
        if not found:
            raise PerpflowError(f"no archived market data of {','.join(opts.symbols)} in {_iso(opts.start_ms)} → "
                                f"{_iso(opts.end_ms)}: archive it first (`perpflow up --source replay ... "
                                "--until-drained` or `perpflow backfill`)")
    run_id = run_id or new_run_id()
    prefix = run_prefix(run_id)
    created_at = int(time.time() * 1000)
    if opts.walk_forward:
        models = walk_forward_models(stack.store, settings.home_dir / "models", opts, say)
    else:
        models = pinned_models(stack.store, opts.model)
    model_ids = [m["id"] for m in models]
    say(f"backtest {run_id}: {','.join(opts.symbols)} {_iso(opts.start_ms)} → {_iso(opts.end_ms)} from "
        f"{opts.source}, models {', '.join(model_ids)}, topics {prefix}*")
    s = run_settings(settings, opts)
    up_opts = UpOptions(opts.source, None, list(opts.symbols), opts.start_ms, opts.end_ms, None, True,
                        prefix=prefix, run_id=run_id, models=models)
    try:
        started = time.monotonic()
        up = run_up(s, up_opts, stack)
        seconds = time.monotonic() - started
        ledger, bars = _ledger(stack.store, run_id, s)
    finally:
        deleted = 0 if opts.keep_topics else delete_run_topics(stack.bootstrap, run_id, s)
    m = run_metrics.compute(ledger)
    out_dir = Path(opts.out) if opts.out else s.home_dir / "backtests" / run_id
    parameters = {"run_id": run_id, "symbols": list(opts.symbols), "start": _iso(opts.start_ms),
                  "end": _iso(opts.end_ms), "source": opts.source, "models": model_ids, "fee": s.paper_taker_fee,
                  "slippage_bps": s.paper_slippage_bps, "policy_fee": s.fee, "policy_slippage": s.slippage,
                  "min_ev": s.min_ev, "min_pwin": s.min_pwin, "initial_balance": s.paper_balance}
    if opts.walk_forward:
        parameters["walk_forward"] = {
            "retrain_every_days": opts.retrain_every_ms / DAY_MS, "train_window_days": opts.train_window_ms / DAY_MS,
            "steps": [{"valid_from": _iso(m["valid_from"]), "model": m["id"], "train_start": _iso(m["train_start"]),
                       "train_end": _iso(m["train_end"])} for m in models]}
    path = report.write(out_dir, ledger, m, title=f"Backtest {run_id}", parameters=parameters)
    runs.record(stack.store, run_id, created_at=created_at, parameters=parameters, model_ids=model_ids,
                symbols=list(opts.symbols), data_start=opts.start_ms, data_end=opts.end_ms, metrics=m,
                report_path=str(path))
    return BacktestResult(run_id, out_dir, path, m, model_ids, bars, seconds, up, deleted)


def run_records(store: Store, run_id: str | None, name: str, where: str = "1", order: str = "kafka_partition, "
                "kafka_offset") -> list[dict]:
    """A run's archived records of one topic (FINAL: what the at-least-once chain wrote twice counts once), in topic
    order by default (per partition, i.e. per symbol — what `accounting.reconstruct` wants); run_id None: the live
    archive's."""
    t = topic(name)
    cols = columns(t)
    fields, nested = [c.name for c in cols], [c.name for c in cols if c.nested]
    run = f"run_id = '{run_id}' AND " if run_id is not None else ""
    rows = store.query_rows(f"SELECT {select_fields(t)} FROM `{table_name(t, run_id is not None)}` FINAL "
                            f"WHERE {run}{where} ORDER BY {order}")
    records = [dict(zip(fields, r, strict=True)) for r in rows]
    for rec in records:  # the archive keeps nested values as JSON text: the records as they were published
        for name in nested:
            if rec[name] is not None:
                rec[name] = json.loads(rec[name])
    return records


def _ledger(store: Store, run_id: str, s: Settings) -> tuple[accounting.Ledger, int]:
    klines = run_records(store, run_id, "md.klines", "`interval` = '5m'", "symbol, open_time")
    ledger = accounting.reconstruct(
        run_records(store, run_id, "user.events"), klines,
        signals=run_records(store, run_id, "signals"), predictions=run_records(store, run_id, "predictions"),
        verdicts=run_records(store, run_id, "risk.verdicts"), orders=run_records(store, run_id, "orders"),
        initial_balance=s.paper_balance)
    return ledger, len(klines)


def delete_run_topics(bootstrap: str, run_id: str, settings: Settings) -> int:
    """The run's topics (its prefix) and its agents' internal ones (changelogs, Faust's leader topic: named from
    the run's app id), its consumer groups and its Faust working directory. Returns how many topics were deleted."""
    prefix, app_id = run_prefix(run_id), app_id_for(run_prefix(run_id))
    admin = AdminClient(client_config(bootstrap))
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith((prefix, app_id + "-"))]
    deleted = 0
    if names:
        for name, future in admin.delete_topics(names, operation_timeout=30).items():
            try:
                future.result()
                deleted += 1
            except Exception as exc:  # reported, not fatal: the run's results are archived already
                log.warning("could not delete topic %s: %s", name, exc)
    groups = [app_id, f"perpflow-sink-{prefix.rstrip('.')}", f"{app_id}-source"]
    try:
        for future in admin.delete_consumer_groups(groups, request_timeout=10).values():
            try:
                future.result()
            except Exception:  # a group never made (the Kafka source's), or a broker without the API
                pass
    except Exception as exc:
        log.info("consumer groups of run %s not deleted: %s", run_id, exc)
    shutil.rmtree(settings.run_dir / f"faust-{prefix.rstrip('.')}", ignore_errors=True)
    return deleted


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M")

