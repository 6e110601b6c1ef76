"""LightGBM models of one side, validated walk-forward.

The outcome model is one three-class model, P(TP), P(SL), P(TIMEOUT): the three are exclusive and exhaustive, so
one softmax keeps them consistent (two binary models can sum past 1) and the policy reads them directly. Beside it,
what EV over the expected hold needs: the hold time in bars (mean), the adverse tail of MAE (a low quantile) and the
gross return of a timeout (mean over timeouts).

Walk-forward (`training.folds`): each fold's outcome model stops early on a purged tail of its own training rows
(never on the test block); fold metrics are those of its raw softmax on the test block, out of sample. The final
models are fitted on all rows with the folds' median number of rounds, and the calibration (isotonic per class) on
all out-of-fold predictions. Calibrating each fold on its own training tail was tried and made the folds worse:
a tail of a few weeks has its own TP rate, and isotonic steps follow it (the softmax, fitted by log loss, is
already close). Metrics are those of P(TP) against TP / not TP. The target is noisy (with barriers in ATR units a
random walk already decides the rates), hence small trees with many rows per leaf.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np

from streams.errors import PerpflowError
from training.dataset import MODEL_FEATURES, Dataset
from training.folds import walk_forward
from training.labels import BAR_MS, TIMEOUT, TP
from training.metrics import Calibrator, binary_metrics, reliability

BASE_PARAMS = {"learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 500, "feature_fraction": 0.8,
               "bagging_fraction": 0.7, "bagging_freq": 1, "lambda_l2": 1.0, "max_bin": 63,
               "deterministic": True, "force_row_wise": True, "verbosity": -1}
OUTCOME = {"objective": "multiclass", "num_class": 3}
REGRESSOR_ROUNDS = 150
EARLY_STOP = 30


@dataclass(frozen=True)
class TrainConfig:
    folds: int = 5
    embargo_bars: int = 288  # one day
    max_rounds: int = 400
    threads: int = 2
    seed: int = 7
    mae_quantile: float = 0.1  # the MAE model predicts this quantile: the adverse tail
    valid_fraction: float = 0.15  # the tail of a training set used to stop early

    def params(self, **extra) -> dict:
        return {**BASE_PARAMS, "num_threads": self.threads, "seed": self.seed, **extra}


@dataclass
class SideModels:
    side: str
    rows: int
    fold_metrics: list[dict]
    metrics: dict  # aggregated over the out-of-fold rows
    oof: dict[str, np.ndarray]  # symbol, open_time, outcome, p_tp, p_sl: the out-of-sample predictions
    boosters: dict[str, lgb.Booster] = field(default_factory=dict)  # outcome, hold, mae, timeout_return
    calibrator: Calibrator = field(default_factory=Calibrator)
    reliability: list[dict] = field(default_factory=list)
    importance: dict[str, float] = field(default_factory=dict)


def _fit_early(params: dict, X, y, times, purge_ms: int, cfg: TrainConfig) -> lgb.Booster:
    """Fit with early stopping on the last `valid_fraction` of the rows (by time), purged from the rest."""
    cut = times[min(int(len(times) * (1 - cfg.valid_fraction)), len(times) - 1)]
    fit, val = np.flatnonzero(times < cut - purge_ms), np.flatnonzero(times >= cut)
    train_set = lgb.Dataset(X[fit], y[fit], feature_name=list(MODEL_FEATURES), free_raw_data=False)
    valid_set = lgb.Dataset(X[val], y[val], reference=train_set)
    return lgb.train(params, train_set, cfg.max_rounds, valid_sets=[valid_set],
                     callbacks=[lgb.early_stopping(EARLY_STOP, verbose=False)])


def _fit(params: dict, X, y, rounds: int) -> lgb.Booster:
    return lgb.train(params, lgb.Dataset(X, y, feature_name=list(MODEL_FEATURES)), rounds)


def _metrics(outcome: np.ndarray, proba: np.ndarray, base_rate: float) -> dict:
    m = binary_metrics((outcome == TP).astype(np.float64), proba[:, TP], base_rate)
    m["log_loss_3class"] = float(-np.mean(np.log(np.clip(proba[np.arange(len(outcome)), outcome], 1e-12, 1))))
    return m


def walk_forward_oof(ds: Dataset, horizon: int, cfg: TrainConfig, say: Callable[[str], None] = print,
                     label: str = "") -> tuple[list[dict], np.ndarray, list[int]]:
    """(fold metrics, OOF probabilities with NaN outside the test blocks, best rounds per fold)."""
    purge_ms = (horizon + 1) * BAR_MS
    folds = walk_forward(ds.open_time, cfg.folds, purge_ms, cfg.embargo_bars * BAR_MS)
    raw = np.full((len(ds), 3), np.nan)
    fold_metrics, rounds, started = [], [], time.monotonic()
    for f in folds:
        tr, te = f.train, f.test
        if len(tr) < 1000 or len(te) == 0:
            # the user's window is too short for the folds asked for: a one-line answer, not a traceback
            raise PerpflowError(f"fold {f.k}: {len(tr)} training and {len(te)} test rows; label a longer window "
                                "or ask for fewer --folds")
        booster = _fit_early(cfg.params(**OUTCOME), ds.X[tr], ds.outcome[tr], ds.open_time[tr], purge_ms, cfg)
        rounds.append(booster.best_iteration or cfg.max_rounds)
        raw[te] = booster.predict(ds.X[te], num_iteration=booster.best_iteration or None)
        m = _metrics(ds.outcome[te], raw[te], float(np.mean(ds.outcome[tr] == TP)))
        m |= {"fold": f.k, "train_rows": len(tr), "purged_rows": f.dropped, "rounds": rounds[-1],
              "test_start": f.test_start, "test_end": f.test_end}
        fold_metrics.append(m)
        say(f"{label}fold {f.k}/{len(folds)}: train {len(tr):,} rows (purged {f.dropped:,}), test {len(te):,} rows, "
            f"{rounds[-1]} rounds, AUC {m['auc']:.3f}, log loss {m['log_loss']:.4f} (base {m['log_loss_base']:.4f}),"
            f" {time.monotonic() - started:.0f} s elapsed")
    return fold_metrics, raw, rounds


def train_side(ds: Dataset, side: str, horizon: int, cfg: TrainConfig,
               say: Callable[[str], None] = print) -> SideModels:
    label = f"{side}: "
    fold_metrics, raw, rounds = walk_forward_oof(ds, horizon, cfg, say, label)
    oof = np.flatnonzero(~np.isnan(raw[:, 0]))
    first_test = fold_metrics[0]["test_start"]
    metrics = _metrics(ds.outcome[oof], raw[oof], float(np.mean(ds.outcome[ds.open_time < first_test] == TP)))
    metrics["fold_mean_auc"] = float(np.mean([m["auc"] for m in fold_metrics]))
    started = time.monotonic()
    n_rounds = max(10, int(np.median(rounds)))
    models = SideModels(side, len(ds), fold_metrics, metrics,
                        {"symbol": ds.symbol[oof].astype(str), "open_time": ds.open_time[oof],
                         "outcome": ds.outcome[oof], "p_tp": raw[oof, TP], "p_sl": raw[oof, 1]})
    models.boosters["outcome"] = _fit(cfg.params(**OUTCOME), ds.X, ds.outcome, n_rounds)
    models.calibrator = Calibrator.fit(raw[oof], ds.outcome[oof])
    # on the rows the calibration was fitted on: how it reads, not an out-of-sample score
    models.reliability = reliability((ds.outcome[oof] == TP).astype(np.float64),
                                     models.calibrator.apply(raw[oof])[:, TP])
    gain = models.boosters["outcome"].feature_importance("gain")
    models.importance = {n: float(g / max(gain.sum(), 1e-12)) for n, g in
                         sorted(zip(MODEL_FEATURES, gain, strict=True), key=lambda kv: -kv[1])}
    say(f"{label}final outcome model: {len(ds):,} rows, {n_rounds} rounds, {time.monotonic() - started:.0f} s")
    models.boosters["hold"] = _fit(cfg.params(objective="regression"), ds.X, ds.bars_held, REGRESSOR_ROUNDS)
    models.boosters["mae"] = _fit(cfg.params(objective="quantile", alpha=cfg.mae_quantile), ds.X, ds.mae,
                                  REGRESSOR_ROUNDS)
    timeouts = ds.outcome == TIMEOUT
    if timeouts.any():  # rare with wide barriers: under 100 rows, one round ≈ their mean
        models.boosters["timeout_return"] = _fit(cfg.params(objective="regression", min_data_in_leaf=20),
                                                 ds.X[timeouts], ds.gross_return[timeouts],
                                                 REGRESSOR_ROUNDS if timeouts.sum() >= 100 else 1)
    say(f"{label}hold, MAE q{cfg.mae_quantile:g} and timeout-return models: {time.monotonic() - started:.0f} s")
    return models

