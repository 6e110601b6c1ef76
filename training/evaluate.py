"""A registered model on a window it was not trained on: the same P(TP) metrics as the walk-forward, against the
TP rate the model saw out of fold (known before the window), and how its regressors do."""

from __future__ import annotations

import numpy as np

from connectors.clickhouse_store import Store
from streams.errors import PerpflowError
from training import dataset
from training.artifact import Predictor, resolve
from training.labels import TP
from training.metrics import binary_metrics, log_loss


def evaluate(store: Store, row: dict, start_ms: int, end_ms: int) -> dict:
    predictor = Predictor.load(resolve(store, row), row["sha256"])
    if predictor.features != list(dataset.MODEL_FEATURES):
        raise PerpflowError(f"{row['id']} was trained on other features than the running code's; retrain it")
    ds = dataset.load(store, row["side"], row["label_spec_id"], list(row["symbols"]), start_ms, end_ms)
    if len(ds) == 0:
        raise PerpflowError("no ready features with labels of the model's spec in the window: build features and "
                            "labels for it first (`perpflow features build`, `perpflow label`)")
    overlap = start_ms < row["train_end"] and end_ms > row["train_start"]
    pred = predictor.predict(ds.X)
    y = (ds.outcome == TP).astype(np.float64)
    out = binary_metrics(y, pred["p_tp"], predictor.doc["metrics"]["rate"])
    out["log_loss_uncalibrated"] = log_loss(y, predictor.boosters["outcome"].predict(ds.X)[:, TP])
    q = float(predictor.doc["config"]["mae_quantile"])
    # baselines are the window's own mean hold and MAE quantile: constants that know the answer's level
    out |= {"overlaps_training": overlap,
            "hold_rmse": _rmse(pred["hold_bars"], ds.bars_held),
            "hold_rmse_window_mean": _rmse(np.full(len(ds), ds.bars_held.mean()), ds.bars_held),
            "mae_quantile": q, "mae_coverage": float(np.mean(ds.mae < pred["mae_quantile"])),
            "mae_pinball": _pinball(ds.mae, pred["mae_quantile"], q),
            "mae_pinball_window_quantile": _pinball(ds.mae, np.full(len(ds), np.quantile(ds.mae, q)), q)}
    return out


def _rmse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - y) ** 2)))


def _pinball(y: np.ndarray, pred: np.ndarray, q: float) -> float:
    """The loss a q-quantile minimizes."""
    d = y - pred
    return float(np.mean(np.maximum(q * d, (q - 1) * d)))
