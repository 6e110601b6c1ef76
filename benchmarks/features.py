"""Per-bar cost of the incremental feature engine (streams.features) against the seed approach it replaces:
recomputing the indicators with pandas over the last 300 bars on every bar (target ratio ≥ 100×); then the
features agent's throughput through the embedded broker: the replay fills md.* first, then one Faust worker
turns every bar into a features record (bars/s from its first output to the group's last commit)."""

from __future__ import annotations

import json
import logging
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks import _data
from connectors.replay import KIND_KLINE, ReplaySource
from streams.broker import EmbeddedBroker, end_offsets, ensure_topics
from streams.features.offline import FeatureRun
from streams.features.registry import NAMES
from streams.settings import Settings
from streams.up import wait_for_agents
from streams.worker import WorkerProcess

WINDOW = 300  # bars the seed recomputed per bar
SEED_BARS = 400  # the seed approach is slow: time it on this many bars


def _events(quick: bool) -> tuple[str, list[tuple[int, dict]]]:
    data, _, start_ms = _data.choose(quick)
    return str(data), _data.replay_events(data, ["BTCUSDT", "ETHUSDT"], start_ms, None)


def seed_features(w: pd.DataFrame) -> dict:
    """The seed's way: the indicators of the last bar, recomputed with pandas from the whole window."""
    c, h, lo, v = w["close"], w["high"], w["low"], w["volume"]
    prev = c.shift()
    tr = pd.concat([h - lo, (h - prev).abs(), (lo - prev).abs()], axis=1).max(axis=1)
    delta = c.diff()
    gain = delta.clip(lower=0).ewm(alpha=1 / 14, adjust=False).mean()
    loss = (-delta.clip(upper=0)).ewm(alpha=1 / 14, adjust=False).mean()
    macd = c.ewm(span=12, adjust=False).mean() - c.ewm(span=26, adjust=False).mean()
    ret = c.pct_change()
    mid, std = c.rolling(20).mean(), c.rolling(20).std()
    low14, high14 = lo.rolling(14).min(), h.rolling(14).max()
    k = 100 * (c - low14) / (high14 - low14)
    out = {f"ema_{n}": c.ewm(span=n, adjust=False).mean() for n in (7, 21, 50, 200)}
    out |= {"atr_14": tr.ewm(alpha=1 / 14, adjust=False).mean(), "rsi_14": 100 - 100 / (1 + gain / loss),
            "macd": macd, "macd_signal": macd.ewm(span=9, adjust=False).mean(), "bb_middle": mid,
            "bb_z": (c - mid) / (2 * std), "stoch_k": k, "stoch_d": k.rolling(3).mean(),
            "volatility_10": ret.rolling(10).std(), "volatility_30": ret.rolling(30).std(),
            "volume_ma_12": v.rolling(12).mean(), "vol_z": (v - v.rolling(48).mean()) / v.rolling(48).std()}
    return {name: s.iloc[-1] for name, s in out.items()}


def run(quick: bool = False) -> bool:
    data, events = _events(quick)
    klines = sum(1 for kind, _ in events if kind == KIND_KLINE)
    # incremental: every event through the engines (context events are cheap and counted in)
    times = []
    for _ in range(3):
        feature_run = FeatureRun()
        t = time.perf_counter()
        rows = [r for kind, rec in events if (r := feature_run.feed(kind, rec)) is not None]
        times.append((time.perf_counter() - t) / klines * 1e6)
    incremental_us = statistics.median(times)
    if len(rows) != klines:
        print(f"FAIL features: {len(rows)} rows for {klines} bars")
        return False
    engine = feature_run.engines["ETHUSDT"]
    t = time.perf_counter()
    for _ in range(200):
        state_json = json.dumps(engine.to_state())
    json_us = (time.perf_counter() - t) / 200 * 1e6
    t = time.perf_counter()
    for _ in range(200):
        state_pickle = pickle.dumps(engine.to_state(), protocol=pickle.HIGHEST_PROTOCOL)
    pickle_us = (time.perf_counter() - t) / 200 * 1e6
    # the seed: pandas over the trailing 300 bars, on every bar
    bars = pd.DataFrame([rec for kind, rec in events if kind == KIND_KLINE and rec["symbol"] == "ETHUSDT"])
    t = time.perf_counter()
    for end in range(WINDOW, WINDOW + SEED_BARS):
        seed_features(bars.iloc[end - WINDOW:end])
    seed_us = (time.perf_counter() - t) / SEED_BARS * 1e6

    print(f"features: data {data}, BTCUSDT + ETHUSDT, {klines:,} bars (incremental, median of 3), "
          f"seed timed on {SEED_BARS} bars of a {WINDOW}-bar window")
    print(f"  incremental engine, all {len(NAMES)} features   {incremental_us:10.1f} µs/bar (with mark/funding events)")
    print(f"  + state saved as JSON ({len(state_json):,} B)        {json_us:10.1f} µs/bar")
    print(f"  + state saved as pickle ({len(state_pickle):,} B)      {pickle_us:10.1f} µs/bar")
    print(f"  seed: pandas recompute of {WINDOW} bars, 17 features {seed_us:10.1f} µs/bar")
    ratio = seed_us / incremental_us
    print(f"  seed / incremental = {ratio:,.0f}×  {'PASS' if ratio >= 100 else 'MISS'} (target ≥ 100×); "
          f"with JSON state {seed_us / (incremental_us + json_us):,.0f}×, "
          f"with pickle state {seed_us / (incremental_us + pickle_us):,.0f}×")
    return agent_throughput(quick)


def agent_throughput(quick: bool) -> bool:
    logging.basicConfig(level=logging.WARNING)
    data, symbols, start_ms = _data.choose(quick)
    if not quick:
        start_ms = 1_704_067_200_000  # 2024-01-01: 4.5 months of three symbols (~115k bars)
    broker = EmbeddedBroker().start()
    worker = None
    try:
        ensure_topics(broker.bootstrap)
        result = ReplaySource(broker.bootstrap, str(data), symbols, start_ms, None).run()
        bars = result.published.get("md.klines", 0)
        with tempfile.TemporaryDirectory() as home:
            settings = Settings(home=Path(home), kafka_bootstrap=broker.bootstrap, clickhouse_url="",
                                worker_metrics_port=0, symbols=symbols or _data.SYMBOLS)
            settings.run_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            worker = WorkerProcess(settings, broker.bootstrap)
            first = None
            while first is None and time.monotonic() - t0 < 120:
                if sum(end_offsets(broker.bootstrap, ["features"]).values()):
                    first = time.monotonic()
                time.sleep(0.2)
            wait_for_agents(broker.bootstrap, worker)
            done = time.monotonic()
            made = sum(end_offsets(broker.bootstrap, ["features"]).values())
        print(f"features agent: {data}, {bars:,} bars (+ marks and funding) in md.*, one Faust worker")
        if made < bars or first is None:
            print(f"  FAIL {made:,} features records for {bars:,} bars")
            return False
        print(f"  worker start → first features record     {first - t0:8.1f} s (start-up, group join, recovery)")
        print(f"  first record → group committed all input  {done - first:8.1f} s = {bars / (done - first):,.0f} "
              f"bars/s ({made:,} records, {made - bars:,} repeated after a rebalance)")
        return True
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()
