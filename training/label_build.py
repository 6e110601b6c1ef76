"""`perpflow label`: the archive (md_klines, md_funding, the features' ATR) → the `labels` table.

Bars with open time in [start, end) are labeled; the klines and settlements up to `horizon` bars past `end` are read
so that the last bars can still finish. A bar needs its features row (for the ATR): build features first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from connectors.clickhouse_store import Store
from streams.errors import PerpflowError
from training import tables
from training.labels import BAR_MS, OUTCOMES, SIDES, Bars, LabelSpec, Settlements, label_side

INTERVAL = "5m"


def window(column: str, lo_ms: int, hi_ms: int) -> str:
    """SQL: `column` (a DateTime64) in [lo, hi)."""
    return (f"{column} >= fromUnixTimestamp64Milli(toInt64({int(lo_ms)}), 'UTC') "
            f"AND {column} < fromUnixTimestamp64Milli(toInt64({int(hi_ms)}), 'UTC')")


@dataclass
class SideSummary:
    symbol: str
    side: str
    bars: int  # bars in the window
    labeled: int
    outcomes: dict[str, int]
    mean_net: float
    mean_funding: float


def read_bars(store: Store, symbol: str, start_ms: int, end_ms: int, horizon: int) -> Bars:
    k = store.query_arrow(
        f"SELECT toUnixTimestamp64Milli(open_time) AS t, open, high, low, close FROM md_klines FINAL "
        f"WHERE symbol = '{symbol}' AND interval = '{INTERVAL}' "
        f"AND {window('open_time', start_ms, end_ms + (horizon + 1) * BAR_MS)} ORDER BY t")
    f = store.query_arrow(
        f"SELECT toUnixTimestamp64Milli(open_time) AS t, atr_14 FROM features FINAL "
        f"WHERE symbol = '{symbol}' AND {window('open_time', start_ms, end_ms)} ORDER BY t")
    t = k.column("t").to_numpy()
    atr = np.full(len(t), np.nan)
    ft = f.column("t").to_numpy()
    pos = np.searchsorted(t, ft)
    found = (pos < len(t)) & (t[np.minimum(pos, len(t) - 1)] == ft) if len(t) else np.zeros(len(ft), bool)
    atr[pos[found]] = f.column("atr_14").to_numpy(zero_copy_only=False)[found]
    col = {name: k.column(name).to_numpy() for name in ("open", "high", "low", "close")}
    return Bars.on_grid(t, col["open"], col["high"], col["low"], col["close"], atr)


def read_settlements(store: Store, symbol: str, start_ms: int, end_ms: int, horizon: int) -> Settlements:
    s = store.query_arrow(
        f"SELECT toUnixTimestamp64Milli(funding_time) AS t, funding_rate, mark_price FROM md_funding FINAL "
        f"WHERE symbol = '{symbol}' AND {window('funding_time', start_ms, end_ms + (horizon + 2) * BAR_MS)} "
        "ORDER BY t")
    mark = s.column("mark_price").to_numpy(zero_copy_only=False).astype(np.float64)  # null → NaN
    return Settlements(s.column("t").to_numpy(), s.column("funding_rate").to_numpy(), mark)


def to_arrow(spec: LabelSpec, symbol: str, side: str, out: dict[str, np.ndarray]) -> pa.Table:
    n = len(out["open_time"])
    cols = {"spec_id": pa.array([spec.id] * n), "side": pa.array([side] * n), "symbol": pa.array([symbol] * n),
            "open_time": pa.array(out["open_time"].astype(np.int64), type=pa.timestamp("ms", tz="UTC")),
            "outcome": pa.array(np.asarray(OUTCOMES)[out["outcome"]])}
    for name in ("entry_price", "exit_price", "gross_return", "fee", "slippage", "funding", "net_return", "mae",
                 "mfe"):
        cols[name] = pa.array(out[name].astype(np.float64))
    for name in ("bars_held", "minutes_to_event", "settlements"):
        cols[name] = pa.array(out[name].astype(np.int32))
    return pa.table(cols)


def build_labels(store: Store, symbols: list[str], start_ms: int, end_ms: int, spec: LabelSpec,
                 say=print) -> list[SideSummary]:
    """Label both sides of every bar of `symbols` in [start, end) and write them to `labels`."""
    if not tables.exists(store, "features") or not tables.exists(store, "md_klines"):
        raise PerpflowError("no archived bars or features in the store: archive market data (`perpflow up "
                            "--source replay ... --until-drained`), then `perpflow features build`, then label")
    tables.ensure(store, "label_specs", "labels")
    store.insert_arrow("label_specs", pa.table({"spec_id": [spec.id], "spec": [spec.to_json()]}))
    summaries = []
    for symbol in symbols:
        started = time.monotonic()
        bars = read_bars(store, symbol, start_ms, end_ms, spec.horizon)
        funding = read_settlements(store, symbol, start_ms, end_ms, spec.horizon)
        in_window = int(((bars.open_time < end_ms) & np.isfinite(bars.close)).sum())
        for side, sign in SIDES.items():
            out = label_side(bars, funding, sign, spec)
            if len(out["open_time"]):
                store.insert_arrow("labels", to_arrow(spec, symbol, side, out))
            counts = np.bincount(out["outcome"].astype(np.int64), minlength=3)
            summaries.append(SideSummary(symbol, side, in_window, len(out["open_time"]),
                                         dict(zip(OUTCOMES, counts.tolist(), strict=True)),
                                         float(out["net_return"].mean()) if len(out["net_return"]) else 0.0,
                                         float(out["funding"].mean()) if len(out["funding"]) else 0.0))
        say(f"label {symbol}: {in_window:,} bars, both sides in {time.monotonic() - started:.1f} s")
    return summaries
