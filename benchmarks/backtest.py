"""Backtest throughput: 5m bars per second through the full live chain (`perpflow backtest`: archive replay →
features → predict → policy → risk → paper exchange → sink, one Faust worker, embedded broker and store), next to a
plain vectorized offline pass of the same decisions (the feature engine over the same events, both sides' models
on the whole matrix at once, the policy over every prediction at once), as a ratio measured in this run.

The home is built first (not timed), as `make run` builds it: the sample's older part archived, labeled, both sides
trained and promoted, then the last 12 days archived (7 with --quick). The backtest replays them (5 warm the
indicators up); its decisions must equal the offline pass's (checked)."""

from __future__ import annotations

import logging
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

from benchmarks import _data

DAY_MS = 86_400_000
TARGET_BARS_PER_S = 2_000


def _build_home(settings, p, rounds: int) -> list[dict]:
    """`make run`'s first steps (`streams.demo.train_and_promote`), then the traded part archived too (a backtest
    replays the archive): the promoted models' registry rows."""
    from connectors.clickhouse_store import Store
    from streams.demo import train_and_promote
    from streams.up import UpOptions, run_up
    from training import registry

    train_and_promote(settings, p, lambda _: None, max_rounds=rounds)
    run_up(settings, UpOptions("replay", p.data, p.symbols, p.train_end_ms, p.end_ms, None, True))
    store = Store(settings)
    try:
        return [registry.promoted(store, side) for side in ("long", "short")]
    finally:
        store.close()


def offline_pass(settings, data: Path, symbols: list[str], start_ms: int, end_ms: int, models: list[dict]):
    """The same decisions without the broker: (bars, seconds, decisions by kind)."""
    from connectors.replay import KIND_KLINE
    from streams.features.offline import FeatureRun
    from streams.policy.signals import Policy
    from streams.predict.agent import PredictAgent, skipped
    from training.artifact import Predictor

    events = _data.replay_events(data, symbols, start_ms, end_ms)
    bars = sum(1 for kind, _ in events if kind == KIND_KLINE)
    # the predict agent's own per-batch code, on one batch holding every ready row
    by_side = {m["side"]: (m["id"], Predictor.load(Path(m["artifact_path"]), m["sha256"])) for m in models}
    agent = types.SimpleNamespace()
    policy = Policy(settings)
    t = time.perf_counter()
    run = FeatureRun("stream")
    rows = [r for kind, rec in events if (r := run.feed(kind, rec)) is not None]
    # every row gets a prediction (a not_ready marker for those still warming up), as in the chain
    preds = [PredictAgent._base(agent, r, by_side["long"][1]) if r["ready"] else skipped(r, "not_ready")
             for r in rows]
    ready = [i for i, r in enumerate(rows) if r["ready"]]
    for side in ("long", "short"):
        PredictAgent._predict_side(agent, side, by_side[side], [rows[i] for i in ready], [preds[i] for i in ready])
    signals = policy.signals(preds)
    seconds = time.perf_counter() - t
    return bars, seconds, Counter(s["decision"] for s in signals)


def run(quick: bool = False) -> bool:
    from streams.settings import Settings
    from training.backtest.orchestrate import BacktestOptions, run_backtest

    logging.basicConfig(level=logging.WARNING)
    data, symbols = _data.BUNDLED, _data.SYMBOLS  # a backtest needs models trained on the archive: the sample's month
    p = _data.sample_plan(quick)
    start, end = p.train_end_ms, p.end_ms  # 5 days warm the indicators up, the rest are traded
    with tempfile.TemporaryDirectory() as home:
        # loose thresholds: the sample's models have no edge, and a backtest that never trades measures less
        settings = Settings(home=Path(home), kafka_bootstrap="", clickhouse_url="", metrics_port=0,
                            worker_metrics_port=0, log_level="WARNING", symbols=symbols, min_pwin=0.3, min_ev=-1.0)
        models = _build_home(settings, p, _data.training_rounds(quick))
        result = run_backtest(settings, BacktestOptions(symbols, start, end, ",".join(m["id"] for m in models)),
                              say=lambda _: None)
        bars, offline_s, decisions = offline_pass(settings, data, symbols, start, end, models)
    chain_rate, offline_rate = result.bars_per_second, bars / offline_s
    days = (end - start) // DAY_MS
    print(f"backtest: {data}, {', '.join(symbols)}, {days} days = {result.bars:,} bars, one Faust worker")
    print(f"  full chain (replay → archived, start-up included) {result.seconds:8.1f} s = {chain_rate:8,.0f} bars/s  "
          f"{'PASS' if chain_rate >= TARGET_BARS_PER_S else 'MISS'} (target ≥ {TARGET_BARS_PER_S:,})")
    print(f"  offline vectorized pass of the same decisions     {offline_s:8.1f} s = {offline_rate:8,.0f} bars/s")
    print(f"  chain / offline = {chain_rate / offline_rate:.3f}×  (the price of running the live agents)")
    chain_decisions = {k: v for k, v in result.metrics.get("signals", {}).items() if k in ("long", "short", "flat")}
    same = {k.lower(): v for k, v in decisions.items()} == {k: v for k, v in chain_decisions.items() if v}
    print(f"  decisions: chain {chain_decisions}, offline {dict(decisions)}  {'same' if same else 'DIFFERENT'}")
    return result.bars == bars and same
