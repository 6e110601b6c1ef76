"""Live calibration of the promoted models: |mean predicted P(TP) − realized TP rate| over the latest predictions
whose outcome is known.

The realized outcome of a prediction is its bar's label by the labels' own rules (training/labels.py, the triple
barrier of the promoted model's label spec: entry at the bar's close, barriers from the features' ATR, touches on
the following bars of md_klines). A prediction counts once all `horizon` bars after it are archived; one whose
outcome could hide in a gap of the archive gets no outcome, as it gets no label. Only predictions made with the
promoted model count, so a new promotion starts its own record.

`perpflow up` (the process that owns the store) computes it every few minutes and exports
`perpflow_model_calibration_error{side}` (streams/up.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connectors.clickhouse_store import Store
from training import registry
from training.label_build import INTERVAL, read_bars
from training.labels import BAR_MS, SIDES, TP, Bars, LabelSpec, Settlements, label_side


@dataclass(frozen=True)
class Calibration:
    side: str
    model_id: str
    predictions: int  # predictions whose outcome is known, the ones below are means over
    predicted: float  # mean predicted P(TP)
    realized: float  # share of them whose outcome was TP

    @property
    def error(self) -> float:
        return abs(self.predicted - self.realized)


def outcomes(bars: Bars, side: str, spec: LabelSpec, open_time: np.ndarray) -> np.ndarray:
    """The labels' outcome code (TP, SL, TIMEOUT) of the bars opened at `open_time`, −1 where none is known yet (the
    horizon has not passed, or a gap could hide it). Funding and costs change returns, not outcomes: none needed."""
    out = np.full(len(open_time), -1, np.int8)
    if len(bars.open_time) == 0 or len(open_time) == 0:
        return out
    labels = label_side(bars, Settlements.none(), SIDES[side], spec)
    pos = np.searchsorted(labels["open_time"], open_time)
    found = pos < len(labels["open_time"])
    found[found] = labels["open_time"][pos[found]] == open_time[found]
    out[found] = labels["outcome"][pos[found]]
    return out


def measure(side: str, model_id: str, p_tp: np.ndarray, outcome: np.ndarray) -> Calibration | None:
    """Over the predictions with a known outcome (code ≥ 0); None when there is none."""
    known = outcome >= 0
    if not known.any():
        return None
    return Calibration(side, model_id, int(known.sum()), float(np.mean(p_tp[known])),
                       float(np.mean(outcome[known] == TP)))


@dataclass
class Known:
    """The promoted model's latest predictions whose horizon has passed, newest first, with their outcomes."""

    model: dict  # its registry row
    symbol: np.ndarray
    open_time: np.ndarray  # int64 ms
    p_tp: np.ndarray
    outcome: np.ndarray  # TP, SL, TIMEOUT, or −1 where a gap hides it


def known_outcomes(store: Store, side: str, limit: int) -> Known | None:
    """None without a promoted `side` model."""
    model = registry.promoted(store, side)
    if model is None:
        return None
    spec = LabelSpec.from_json(model["label_spec"])
    model_id = model["id"].replace("'", "")
    horizon_ms = spec.horizon * BAR_MS
    found = store.query_arrow(
        f"SELECT symbol, toUnixTimestamp64Milli(open_time) AS t, p_tp_{side} AS p FROM predictions FINAL\n"
        f"INNER JOIN (SELECT symbol, toUnixTimestamp64Milli(max(open_time)) AS last_bar FROM md_klines\n"
        f"  WHERE interval = '{INTERVAL}' GROUP BY symbol) AS k USING (symbol)\n"
        f"WHERE model_id_{side} = '{model_id}' AND t + {horizon_ms} <= last_bar\n"
        f"ORDER BY t DESC, symbol LIMIT {int(limit)}")
    symbols = np.asarray(found.column("symbol").to_pylist(), dtype=object)
    open_time = found.column("t").to_numpy().astype(np.int64)
    outcome = np.full(len(open_time), -1, np.int8)
    for symbol in np.unique(symbols):
        rows = np.flatnonzero(symbols == symbol)
        t = open_time[rows]
        bars = read_bars(store, str(symbol), int(t.min()), int(t.max()) + BAR_MS, spec.horizon)
        outcome[rows] = outcomes(bars, side, spec, t)
    return Known(model, symbols, open_time, found.column("p").to_numpy().astype(np.float64), outcome)


def latest(store: Store, side: str, limit: int) -> Calibration | None:
    """The promoted `side` model's calibration over its latest `limit` predictions whose horizon has passed in the
    archive (those a gap hides are left out); None without a promoted model or any such prediction."""
    found = known_outcomes(store, side, limit)
    if found is None:
        return None
    return measure(side, found.model["id"], found.p_tp, found.outcome)
