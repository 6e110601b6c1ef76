"""Training rows: the `features` rows that are `ready` and of the running schema version, joined with one side's
labels of one spec, read columnar from ClickHouse in time order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connectors.clickhouse_store import Store
from streams.errors import PerpflowError
from streams.features.registry import NAMES, SCHEMA_VERSION
from training import tables
from training.label_build import window
from training.labels import OUTCOMES

# Absolute price and volume levels differ by symbol and by era: a model pooled over symbols and trained on the
# past would learn "BTC cost 40k then" rather than a pattern. Their scale-free versions are in the registry
# (ema_dist_atr, atr_pct, bb_z, vol_z, ...).
PRICE_SCALED = frozenset({"ema_7", "ema_21", "ema_50", "ema_200", "atr_14", "macd", "macd_signal", "macd_hist",
                          "bb_upper", "bb_middle", "bb_lower", "volume_ma_12"})
MODEL_FEATURES: tuple[str, ...] = tuple(n for n in NAMES if n not in PRICE_SCALED)


@dataclass
class Dataset:
    symbol: np.ndarray  # str
    open_time: np.ndarray  # int64 ms, non-decreasing
    X: np.ndarray  # float64 (rows × MODEL_FEATURES), NaN where null
    outcome: np.ndarray  # int codes of training.labels.OUTCOMES
    bars_held: np.ndarray
    mae: np.ndarray
    gross_return: np.ndarray

    def __len__(self) -> int:
        return len(self.open_time)

    def take(self, rows: np.ndarray) -> Dataset:
        return Dataset(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def load(store: Store, side: str, spec_id: str, symbols: list[str], start_ms: int, end_ms: int) -> Dataset:
    if not tables.exists(store, "features"):
        raise PerpflowError("no `features` table in the store: run `perpflow features build`, then `perpflow label`")
    if not tables.exists(store, "labels"):
        raise PerpflowError("no `labels` table in the store: run `perpflow label --start ... --end ...` first")
    syms = ", ".join(f"'{s}'" for s in symbols)
    feats = ", ".join(f"f.{n}" for n in MODEL_FEATURES)
    t = store.query_arrow(f"""
        SELECT f.symbol AS symbol, toUnixTimestamp64Milli(f.open_time) AS t, {feats},
               l.outcome AS outcome, l.bars_held AS bars_held, l.mae AS mae, l.gross_return AS gross_return
        FROM (SELECT * FROM features FINAL WHERE ready AND schema_version = {SCHEMA_VERSION}
              AND symbol IN ({syms}) AND {window('open_time', start_ms, end_ms)}) AS f
        INNER JOIN (SELECT symbol, open_time, outcome, bars_held, mae, gross_return FROM labels FINAL
              WHERE spec_id = '{spec_id}' AND side = '{side}' AND symbol IN ({syms})
              AND {window('open_time', start_ms, end_ms)}) AS l
        ON f.symbol = l.symbol AND f.open_time = l.open_time
        ORDER BY t, symbol""")
    X = np.column_stack([t.column(n).to_numpy(zero_copy_only=False).astype(np.float64) for n in MODEL_FEATURES]) \
        if t.num_rows else np.empty((0, len(MODEL_FEATURES)))
    code = {name: i for i, name in enumerate(OUTCOMES)}
    return Dataset(np.asarray(t.column("symbol").to_pylist(), dtype=object), t.column("t").to_numpy(), X,
                   np.array([code[o] for o in t.column("outcome").to_pylist()], dtype=np.int64),
                   t.column("bars_held").to_numpy().astype(np.float64), t.column("mae").to_numpy(),
                   t.column("gross_return").to_numpy())
