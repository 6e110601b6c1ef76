"""Probability quality of P(TP): AUC, log loss, Brier, expected calibration error and the reliability table;
and the isotonic calibration the predictor applies."""

from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

EPS = 1e-12
BINS = 10
P_FLOOR = 1e-4  # calibrated probabilities stay inside (floor, 1 − floor): an isotonic end step of 0 or 1 is a
# statement about a few rows, not a certainty


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2))


def reliability(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per equal-width bin of p: rows, mean predicted, observed frequency."""
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    rows = []
    for b in range(bins):
        m = idx == b
        if m.any():
            rows.append({"bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}", "rows": int(m.sum()),
                         "predicted": float(p[m].mean()), "observed": float(y[m].mean())})
    return rows


def ece(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> float:
    """Σ over bins of (rows in bin / rows) · |mean predicted − observed|."""
    return float(sum(r["rows"] * abs(r["predicted"] - r["observed"]) for r in reliability(y, p, bins)) / len(y))


def binary_metrics(y: np.ndarray, p: np.ndarray, base_rate: float) -> dict[str, float]:
    """Metrics of p against y (0/1), next to the constant prediction `base_rate` (the training frequency)."""
    base = np.full(len(y), base_rate)
    return {"rows": int(len(y)), "rate": float(y.mean()), "auc": float(roc_auc_score(y, p)) if 0 < y.sum() < len(y)
            else float("nan"), "log_loss": log_loss(y, p), "log_loss_base": log_loss(y, base),
            "brier": brier(y, p), "brier_base": brier(y, base), "ece": ece(y, p)}


CAL_ROWS_PER_BIN = 500  # isotonic steps stand on at least this many rows
CAL_MAX_BINS = 100


class Calibrator:
    """Isotonic maps per class (one-vs-rest), then rows renormalized to sum to 1. Stored as the isotonic
    breakpoints, applied with np.interp: the predictor needs neither scikit-learn nor pickle.

    The isotonic fit runs on equal-count bins of the predictions (mean prediction → observed frequency, weighted by
    rows), not on single rows: fitted row by row, the top step stood on 4 rows and mapped them to 0.99."""

    def __init__(self, maps: list[tuple[np.ndarray, np.ndarray]] | None = None):
        self.maps = maps  # None = identity

    @classmethod
    def fit(cls, proba: np.ndarray, outcome: np.ndarray) -> Calibrator:
        maps = []
        bins = int(np.clip(len(proba) // CAL_ROWS_PER_BIN, 1, CAL_MAX_BINS))
        for c in range(proba.shape[1]):
            order = np.argsort(proba[:, c], kind="stable")
            chunks = np.array_split(order, bins)
            x = np.array([proba[i, c].mean() for i in chunks])
            y = np.array([(outcome[i] == c).mean() for i in chunks])
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
                x, y, sample_weight=np.array([len(i) for i in chunks], dtype=np.float64))
            maps.append((iso.X_thresholds_, iso.y_thresholds_))
        return cls(maps)

    def apply(self, proba: np.ndarray) -> np.ndarray:
        if self.maps is None:
            return proba
        out = np.column_stack([np.clip(np.interp(proba[:, c], x, y), P_FLOOR, 1 - P_FLOOR)
                               for c, (x, y) in enumerate(self.maps)])
        return out / out.sum(axis=1, keepdims=True)

    def to_json(self) -> list | None:
        return None if self.maps is None else [{"x": x.tolist(), "y": y.tolist()} for x, y in self.maps]

    @classmethod
    def from_json(cls, data: list | None) -> Calibrator:
        return cls(None if data is None else [(np.asarray(m["x"]), np.asarray(m["y"])) for m in data])
