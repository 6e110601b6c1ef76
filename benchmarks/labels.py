"""Labeling throughput (training.labels: numpy, all rows at once) against per-row loops over the same bars and rules:

- the seed's way, a per-row pandas loop (`seed_label_side`: slice the following bars, find the first touch, sum the
  settlements in the hold) — the baseline of the ≥ 100× target;
- a plain Python loop over floats with an early exit (`loop_label_side`), the fastest per-row form, for scale.

Both loops are timed on a subset of rows and extrapolated per bar (they say so); the results of every timed row
are checked against the vectorized labels. Then the wall time to train the full model set (both sides, walk-forward
and final models) on the shared history (target < 10 minutes)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import _data
from connectors.history_files import load_history
from training.labels import BAR_MS, SL, TIMEOUT, TP, Bars, LabelSpec, Settlements, funding_paid, label_side

LOOP_ROWS = 20_000  # the loops are slow: timed on this many rows (the pandas one on fewer), extrapolated per bar
SEED_ROWS = 2_000
MIN_BARS = 1_000_000
TRAIN_WINDOW = ("2023-01-01", "2024-03-01")  # the shared history's training window (the rest is held out)


def loop_label_side(bars: Bars, funding: Settlements, side: int, spec: LabelSpec, rows: range | None = None) -> dict:
    """One row at a time, one following bar at a time: the per-row loop the vectorized code replaces."""
    out: dict[str, list] = {k: [] for k in ("open_time", "outcome", "exit_price", "gross_return", "funding",
                                             "net_return", "mae", "mfe", "bars_held")}
    n, h = len(bars.close), spec.horizon
    f_times = funding.time.tolist()  # settlements are found by bisection, not scanned: a fair loop
    for i in rows if rows is not None else range(n):
        entry, atr = bars.close[i], bars.atr[i]
        if not (math.isfinite(entry) and math.isfinite(atr) and atr > 0):
            continue
        tp, sl = entry + side * spec.k_tp * atr, entry - side * spec.k_sl * atr
        worst, best, result = entry, entry, None
        for j in range(i + 1, i + h + 1):
            if j >= n or math.isnan(bars.high[j]) or math.isnan(bars.low[j]) or math.isnan(bars.close[j]):
                break  # the outcome is hidden in a gap (or past the end)
            hi, lo = bars.high[j], bars.low[j]
            worst, best = (min(worst, lo), max(best, hi)) if side == 1 else (max(worst, hi), min(best, lo))
            touch_sl = lo <= sl if side == 1 else hi >= sl
            touch_tp = hi >= tp if side == 1 else lo <= tp
            if touch_sl:
                o = bars.open[j]
                result = (SL, (min(sl, o) if side == 1 else max(sl, o)) if not math.isnan(o) else sl, j)
            elif touch_tp:
                result = (TP, tp, j)
            elif j == i + h:
                result = (TIMEOUT, bars.close[j], j)
            if result:
                break
        if result is None:
            continue
        outcome, exit_price, j = result
        gross = side * (exit_price / entry - 1)
        entry_time, exit_time = bars.open_time[i] + BAR_MS, bars.open_time[j] + BAR_MS
        paid = 0.0
        for s in range(bisect_left(f_times, entry_time), bisect_left(f_times, exit_time)):
            t, rate, mark = f_times[s], funding.rate[s], funding.mark[s]
            if math.isnan(mark):
                k = (t - BAR_MS - bars.open_time[0]) // BAR_MS
                mark = bars.close[k] if 0 <= k < n else math.nan
            if math.isfinite(mark):
                paid += rate * mark
        fund = -side * paid / entry
        costs = (spec.fee + spec.slippage) * (1 + exit_price / entry)
        mae = gross if outcome == SL else min(0.0, side * (worst / entry - 1))
        mfe = gross if outcome == TP else max(0.0, side * (best / entry - 1))
        for k, v in zip(out, (bars.open_time[i], outcome, exit_price, gross, fund, gross - costs + fund, mae, mfe,
                              j - i), strict=True):
            out[k].append(v)
    return {k: np.asarray(v) for k, v in out.items()}


def seed_label_side(df: pd.DataFrame, funding: pd.DataFrame, side: int, spec: LabelSpec, rows: range) -> pd.DataFrame:
    """The per-row pandas loop: `df` holds the grid's open_time, open, high, low, close, atr (NaN rows = gaps),
    `funding` the settlements' time, rate and mark (already valued)."""
    out, h = [], spec.horizon
    for i in rows:
        entry, atr = df["close"].iloc[i], df["atr"].iloc[i]
        if not (np.isfinite(entry) and np.isfinite(atr) and atr > 0):
            continue
        tp, sl = entry + side * spec.k_tp * atr, entry - side * spec.k_sl * atr
        w = df.iloc[i + 1:i + 1 + h]
        hit_sl = (w["low"] <= sl) if side == 1 else (w["high"] >= sl)
        hit_tp = (w["high"] >= tp) if side == 1 else (w["low"] <= tp)
        gap = w[["high", "low", "close"]].isna().any(axis=1)
        event = (hit_sl | hit_tp).to_numpy()
        j = int(event.argmax()) if event.any() else h - 1
        if len(w) < j + 1 or gap.iloc[:j + 1].any():
            continue
        if hit_sl.iloc[j]:
            o = w["open"].iloc[j]
            outcome, exit_price = SL, (min(sl, o) if side == 1 else max(sl, o)) if np.isfinite(o) else sl
        elif hit_tp.iloc[j]:
            outcome, exit_price = TP, tp
        else:
            outcome, exit_price = TIMEOUT, w["close"].iloc[j]
        entry_time = df["open_time"].iloc[i] + BAR_MS
        crossed = funding[(funding["time"] >= entry_time) & (funding["time"] < entry_time + (j + 1) * BAR_MS)]
        fund = -side * (crossed["rate"] * crossed["mark"]).sum() / entry
        gross = side * (exit_price / entry - 1)
        out.append((df["open_time"].iloc[i], outcome, exit_price, gross, fund))
    return pd.DataFrame(out, columns=["open_time", "outcome", "exit_price", "gross_return", "funding"])


def history_bars(data, symbols: list[str] | None) -> list[tuple[Bars, Settlements]]:
    """Every symbol's bars and settlements from the files, with a 14-bar mean true range as the ATR (the
    settlements' marks are left to the labeler's fallback: the close of the bar ending at the settlement)."""
    out = []
    histories, _ = load_history(data, symbols)
    for h in histories.values():
        k = h.klines
        t = k["open_time"].to_numpy(np.int64)
        close = k["close"].to_numpy(float)
        prev = np.r_[np.nan, close[:-1]]
        tr = np.nanmax(np.column_stack([k["high"] - k["low"], abs(k["high"] - prev), abs(k["low"] - prev)]), axis=1)
        atr = np.convolve(tr, np.ones(14) / 14)[:len(tr)]
        bars = Bars.on_grid(t, k["open"], k["high"], k["low"], close, atr)
        f = h.funding
        out.append((bars, Settlements(f["funding_time"].to_numpy(np.int64), f["funding_rate"].to_numpy(float),
                                      np.full(len(f), np.nan))))
    return out


def _agree(vec: dict, loop: dict) -> bool:
    at = np.isin(vec["open_time"], np.asarray(loop["open_time"]))
    return at.sum() == len(loop["open_time"]) and bool((vec["outcome"][at] == np.asarray(loop["outcome"])).all()) \
        and np.allclose(vec["gross_return"][at], np.asarray(loop["gross_return"])) \
        and np.allclose(vec["funding"][at], np.asarray(loop["funding"]))


def train_wall_time(quick: bool) -> tuple[float, str] | None:
    """Archive, featurize and label the training window in a scratch store through the CLI, then time
    `perpflow train` (both sides: walk-forward with 5 folds, final outcome model and regressors)."""
    data, symbols, _ = _data.choose(quick)
    start, end = ("2023-12-09", "2024-01-09") if data == _data.BUNDLED else TRAIN_WINDOW
    syms = ",".join(symbols or _data.SYMBOLS)
    perpflow = str(Path(sys.executable).parent / "perpflow")
    with tempfile.TemporaryDirectory(prefix="perpflow-bench-") as tmp:
        env = {**os.environ, "PERPFLOW_HOME": tmp, "PERPFLOW_METRICS_PORT": "0", "PERPFLOW_RUN_WORKER": "false",
               "PERPFLOW_LOG_LEVEL": "WARNING"}
        steps = [["up", "--source", "replay", "--data", str(data), "--symbols", syms, "--start", start, "--end", end,
                  "--until-drained"], ["features", "build", "--symbols", syms, "--start", start, "--end", end],
                 ["label", "--symbols", syms, "--start", start, "--end", end]]
        for step in steps:
            done = subprocess.run([perpflow, *step], env=env, capture_output=True, text=True)
            if done.returncode:
                print(f"FAIL labels: perpflow {' '.join(step)}: {done.stderr.strip()[-500:]}")
                return None
        t = time.perf_counter()
        done = subprocess.run([perpflow, "train", "--symbols", syms, "--start", start, "--end", end], env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if done.returncode:
            print(f"FAIL labels: perpflow train: {done.stderr.strip()[-500:]}")
            return None
    rows = next((line for line in done.stderr.splitlines() if line.startswith("long: ") and " rows of " in line), "")
    return seconds, f"{syms} {start}..{end}, {rows.split(': ', 1)[-1].split(' (')[0]} per side"


def run(quick: bool = False) -> bool:
    data, symbols, _ = _data.choose(quick)
    series = history_bars(data, symbols)
    spec = LabelSpec()
    bars_one_pass = sum(len(b.close) for b, _ in series)
    repeat = max(1, math.ceil(MIN_BARS / bars_one_pass)) if not quick else 1
    t = time.perf_counter()
    labeled = 0
    for _ in range(repeat):
        results = [label_side(bars, funding, side, spec) for bars, funding in series for side in (1, -1)]
        labeled += sum(len(r["open_time"]) for r in results)
    vec_s = time.perf_counter() - t
    vec_rate = bars_one_pass * repeat / vec_s  # bars labeled on both sides per second
    bars, funding = series[0]
    vec = {side: label_side(bars, funding, side, spec) for side in (1, -1)}
    rows = range(1000, 1000 + min(LOOP_ROWS if not quick else 2_000, len(bars.close) - 1000))
    t = time.perf_counter()
    loops = {side: loop_label_side(bars, funding, side, spec, rows) for side in (1, -1)}
    loop_rate = len(rows) / (time.perf_counter() - t)
    df = pd.DataFrame({"open_time": bars.open_time, "open": bars.open, "high": bars.high, "low": bars.low,
                       "close": bars.close, "atr": bars.atr})
    paid_time, paid_cum = funding_paid(bars, funding)
    settled = pd.DataFrame({"time": paid_time, "rate": np.diff(paid_cum), "mark": 1.0})
    seed_rows = range(1000, 1000 + min(SEED_ROWS if not quick else 300, len(bars.close) - 1000))
    t = time.perf_counter()
    seeds = {side: seed_label_side(df, settled, side, spec, seed_rows) for side in (1, -1)}
    seed_rate = len(seed_rows) / (time.perf_counter() - t)
    ok = all(_agree(vec[s], loops[s]) and _agree(vec[s], {k: seeds[s][k].to_numpy() for k in seeds[s]})
             for s in (1, -1))
    print(f"labels: data {data}, {len(series)} symbols, spec {spec.to_json()}")
    print(f"  vectorized (numpy)       {bars_one_pass * repeat:>11,} bars × 2 sides in {vec_s:6.2f} s = "
          f"{vec_rate:12,.0f} bars/s ({labeled:,} labels{f', {repeat} passes over the data' if repeat > 1 else ''})")
    print(f"  seed: per-row pandas loop {len(seed_rows):>10,} bars × 2 sides timed, extrapolated per bar = "
          f"{seed_rate:10,.0f} bars/s")
    print(f"  plain Python loop        {len(rows):>11,} bars × 2 sides timed, extrapolated per bar = "
          f"{loop_rate:10,.0f} bars/s")
    ratio = vec_rate / seed_rate
    print(f"  vectorized / seed loop = {ratio:,.0f}×  {'PASS' if ratio >= 100 else 'MISS'} (target ≥ 100×); "
          f"vectorized / plain Python loop = {vec_rate / loop_rate:,.0f}×; "
          f"loops agree with the vectorized labels: {'yes' if ok else 'NO'}")
    trained = train_wall_time(quick)
    if trained is None:
        return False
    seconds, what = trained
    print(f"  training the full model set (2 sides × 5 folds + final models), {what}: {seconds:,.0f} s wall  "
          f"{'PASS' if seconds < 600 else 'MISS'} (target < 10 min)")
    return ok and labeled > 0
