"""`perpflow demo` (what `make run` runs): the whole system on the bundled real sample, nothing pre-computed.

1. replay the older part of the sample through the topics: the features agent computes features, the sink archives
   every topic in ClickHouse (no model yet, so nothing is predicted);
2. label it (triple barrier, fees, slippage, funding) and train both sides' models on it, then promote them;
3. replay the most recent part through the live chain — features → predict → policy → risk → orders → the paper
   exchange → user.events — at full speed, and summarize it from the archive: bars, signals by decision, verdicts
   by reason, trades, PnL net of fees and funding, max drawdown, rows archived per table.

No look-ahead: training ends `warmup` before the traded part begins, and the traded replay starts at the end of
training, so its first days warm the indicators up (the longest window needs ~4.5 days of 5m bars before a
features record is `ready`) on bars no model was trained on (the labels of the last training bars look `horizon`
bars ahead, far less than the warm-up)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from connectors.clickhouse_store import Store
from streams.errors import PerpflowError
from streams.settings import Settings
from streams.up import UpOptions, UpSummary, run_up
from training.backtest import accounting, metrics
from training.backtest.orchestrate import run_records

log = logging.getLogger(__name__)
DAY_MS = 86_400_000


@dataclass
class DemoPlan:
    data: str
    symbols: list[str]
    start_ms: int
    train_end_ms: int  # training window [start, train_end); the traded replay starts here (warm-up first)
    trade_start_ms: int  # bars from here are traded and summarized
    end_ms: int


@dataclass
class TradingSummary:
    bars: int = 0
    signals: dict[str, int] = field(default_factory=dict)
    verdicts: dict[str, int] = field(default_factory=dict)
    orders: dict[str, int] = field(default_factory=dict)
    best_p_win: float = 0.0
    metrics: dict = field(default_factory=dict)  # training.backtest.metrics of the traded window
    trading_states: list[str] = field(default_factory=list)


def plan(data: str, symbols: list[str], first_ms: int, last_ms: int, trade_days: int = 7,
         warmup_days: int = 5) -> DemoPlan:
    """Split the sample: the last `trade_days` are traded, after the warm-up days; everything before is training."""
    end = last_ms
    trade_start = end - trade_days * DAY_MS
    train_end = trade_start - warmup_days * DAY_MS
    if train_end - first_ms < 14 * DAY_MS:
        raise PerpflowError(f"the sample in {data} is too short for the demo: it needs ≥ 14 days of training "
                            f"before {trade_days + warmup_days} days of trading")
    return DemoPlan(data, symbols, first_ms, train_end, trade_start, end)


def train_and_promote(settings: Settings, p: DemoPlan, say: Callable[[str], None], max_rounds: int = 150) -> list:
    """Steps 1 and 2: the training part archived (features by the agent), labeled, trained and promoted."""
    from training import registry
    from training.label_build import build_labels
    from training.labels import LabelSpec
    from training.pipeline import train_models
    from training.train import TrainConfig

    say("1/3 replaying the training part through the topics (features agent, ClickHouse sink)")
    run_up(settings, UpOptions("replay", p.data, p.symbols, p.start_ms, p.train_end_ms, None, True))
    say("2/3 labeling and training both sides on it")
    store = Store(settings)
    try:
        spec = LabelSpec()
        build_labels(store, p.symbols, p.start_ms, p.train_end_ms, spec, say=say)
        trained = train_models(store, settings.home_dir / "models", ["long", "short"], p.symbols, p.start_ms,
                               p.train_end_ms, spec.id, TrainConfig(folds=3, embargo_bars=48, max_rounds=max_rounds),
                               say=say)
        models = []
        for row, side_models in trained:
            result = registry.promote(store, row["id"], "demo", "make run")
            refused = [g for g in result.gates if not g.ok]
            if refused:  # the incumbent stays: it is at least as good on the common window
                say(f"{row['side']}: {row['id']} not promoted ({'; '.join(g.detail for g in refused)})")
            models.append((row["id"], side_models.metrics))
    finally:
        store.close()
    return models


def run_demo(settings: Settings, p: DemoPlan, say: Callable[[str], None]) -> tuple[UpSummary, TradingSummary, list]:
    models = train_and_promote(settings, p, say)
    say("3/3 replaying the most recent part through the live chain and the paper exchange")
    up = run_up(settings, UpOptions("replay", p.data, p.symbols, p.train_end_ms, p.end_ms, None, True))
    store = Store(settings)
    try:
        trading = summarize(store, p.symbols, p.trade_start_ms, p.end_ms)
    finally:
        store.close()
    return up, trading, models


def summarize(store: Store, symbols: list[str], start_ms: int, end_ms: int) -> TradingSummary:
    """The traded window, from the archive (FINAL: what was replayed twice counts once)."""
    s = TradingSummary()
    names = ", ".join(f"'{x}'" for x in symbols)
    window = f"symbol IN ({names}) AND toUnixTimestamp64Milli(open_time) >= {start_ms} " \
             f"AND toUnixTimestamp64Milli(open_time) < {end_ms}"
    q = store.query_rows
    s.bars = q(f"SELECT count() FROM features FINAL WHERE {window}")[0][0]
    s.signals = dict(q(f"SELECT decision, count() FROM signals FINAL WHERE {window} GROUP BY decision"))
    s.best_p_win = q(f"SELECT max(greatest(p_win_long, p_win_short)) FROM signals FINAL WHERE {window}")[0][0] or 0.0
    rows = q(f"SELECT verdict, violations FROM risk_verdicts FINAL WHERE {window}")
    reasons: Counter[str] = Counter()
    for verdict, violations in rows:
        for v in json.loads(violations) or [verdict.lower()]:
            reasons[v] += 1
    s.verdicts = dict(reasons)
    s.orders = dict(q(f"SELECT action, count() FROM orders FINAL WHERE symbol IN ({names}) "
                      f"AND toUnixTimestamp64Milli(event_time) >= {start_ms} GROUP BY action"))
    # the trades, PnL split and drawdown: the backtests' accounting, on the live archive's records of the window
    since = f"symbol IN ({names}) AND toUnixTimestamp64Milli(event_time) >= {start_ms}"
    klines = run_records(store, None, "md.klines", f"{window} AND `interval` = '5m'", "symbol, open_time")
    ledger = accounting.reconstruct(run_records(store, None, "user.events", since), klines)
    s.metrics = metrics.compute(ledger)
    s.trading_states = [json.loads(d)["to"] for (d,) in q(
        "SELECT detail FROM risk_events FINAL WHERE kind = 'trading_state' "
        f"AND toUnixTimestamp64Milli(event_time) >= {start_ms} ORDER BY event_time")]
    return s
