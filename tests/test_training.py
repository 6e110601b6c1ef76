"""Walk-forward without leakage, the probability metrics and the calibration, on small data."""

from __future__ import annotations

import numpy as np
import pytest

from training.dataset import MODEL_FEATURES, PRICE_SCALED, Dataset
from training.folds import walk_forward
from training.labels import BAR_MS, SL, TIMEOUT, TP
from training.metrics import Calibrator, binary_metrics, brier, ece, log_loss, reliability
from training.train import TrainConfig, train_side, walk_forward_oof

T0 = 1_704_067_200_000
HORIZON = 12
CFG = TrainConfig(folds=3, embargo_bars=24, max_rounds=40, threads=1)


def synthetic(n: int = 12_000, seed: int = 3) -> Dataset:
    """Two symbols on one clock; P(TP) rises with the first feature, TIMEOUT is rare."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(MODEL_FEATURES)))
    p_tp = 1 / (1 + np.exp(-(X[:, 0] - 0.7)))
    u = rng.uniform(size=n)
    outcome = np.where(u < p_tp, TP, np.where(u < 0.97, SL, TIMEOUT))
    return Dataset(np.array(["AAAUSDT", "BBBUSDT"] * (n // 2), dtype=object), T0 + (np.arange(n) // 2) * BAR_MS, X,
                   outcome, rng.integers(1, HORIZON + 1, n).astype(float), -rng.exponential(0.01, n),
                   rng.normal(0, 0.01, n))


def test_folds_purge_and_embargo_the_rows_before_each_test_block():
    times = T0 + np.arange(10_000) * BAR_MS
    purge, embargo = (HORIZON + 1) * BAR_MS, 24 * BAR_MS
    folds = walk_forward(times, 4, purge, embargo)
    assert [f.k for f in folds] == [1, 2, 3, 4]
    assert sum(len(f.test) for f in folds) == len(times) - np.sum(times < folds[0].test_start)
    for f in folds:
        assert times[f.train].max() < f.test_start - purge - embargo  # no label reaches into the test block
        assert times[f.test].min() >= f.test_start and times[f.test].max() < f.test_end
        assert f.dropped == (purge + embargo) // BAR_MS  # exactly the purged and embargoed rows
        assert not np.intersect1d(f.train, f.test).size


def test_labels_of_purged_rows_cannot_change_a_fold():
    ds = synthetic()
    base, raw, _ = walk_forward_oof(ds, HORIZON, CFG, say=lambda _: None)
    folds = walk_forward(ds.open_time, CFG.folds, (HORIZON + 1) * BAR_MS, CFG.embargo_bars * BAR_MS)
    start = folds[1].test_start
    purged = (ds.open_time >= start - (HORIZON + 1 + CFG.embargo_bars) * BAR_MS) & (ds.open_time < start)
    assert purged.sum() == 2 * (HORIZON + 1 + CFG.embargo_bars)
    poisoned = ds.take(np.arange(len(ds)))
    poisoned.outcome = np.where(purged, (ds.outcome + 1) % 3, ds.outcome)
    _, raw2, _ = walk_forward_oof(poisoned, HORIZON, CFG, say=lambda _: None)
    fold2 = folds[1].test
    np.testing.assert_array_equal(raw2[fold2], raw[fold2])  # fold 2 never saw them
    assert not np.array_equal(raw2[folds[2].test], raw[folds[2].test])  # fold 3 trains on them


def test_shuffling_future_labels_does_not_change_past_folds():
    ds = synthetic()
    base, raw, _ = walk_forward_oof(ds, HORIZON, CFG, say=lambda _: None)
    future = np.flatnonzero(ds.open_time >= base[1]["test_end"])  # after fold 2's test block
    shuffled = ds.take(np.arange(len(ds)))
    shuffled.outcome = ds.outcome.copy()
    shuffled.outcome[future] = np.random.default_rng(1).permutation(ds.outcome[future])
    again, raw2, _ = walk_forward_oof(shuffled, HORIZON, CFG, say=lambda _: None)
    past = np.flatnonzero(ds.open_time < base[1]["test_end"])
    np.testing.assert_array_equal(raw2[past], raw[past])
    assert again[:2] == base[:2]
    assert again[2] != base[2]  # the shuffle did reach fold 3


def test_walk_forward_finds_the_signal_and_calibrates():
    ds = synthetic()
    models = train_side(ds, "long", HORIZON, CFG, say=lambda _: None)
    m = models.metrics
    assert m["auc"] > 0.65 and m["log_loss"] < m["log_loss_base"] and m["brier"] < m["brier_base"]
    assert m["ece"] < 0.05
    assert len(models.fold_metrics) == 3 and all(f["purged_rows"] > 0 for f in models.fold_metrics)
    assert next(iter(models.importance)) == MODEL_FEATURES[0]  # the feature that carries the signal
    assert set(models.boosters) == {"outcome", "hold", "mae", "timeout_return"}


def test_model_features_are_scale_free():
    assert not set(MODEL_FEATURES) & PRICE_SCALED
    assert {"atr_pct", "ema_dist_atr", "bb_z", "funding_rate"} <= set(MODEL_FEATURES)


def test_metrics_by_hand():
    y = np.array([1, 0, 1, 1, 0], float)
    p = np.array([0.9, 0.2, 0.6, 0.4, 0.4])
    assert log_loss(y, p) == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.6, 0.4, 0.6])))
    assert brier(y, p) == pytest.approx((0.01 + 0.04 + 0.16 + 0.36 + 0.16) / 5)
    # bins: 0.2 → [0]; 0.4, 0.4 → [1, 0]; 0.6 → [1]; 0.9 → [1]
    assert ece(y, p) == pytest.approx((0.2 + 2 * 0.1 + 0.4 + 0.1) / 5)
    assert [r["rows"] for r in reliability(y, p)] == [1, 2, 1, 1]
    m = binary_metrics(y, p, base_rate=0.6)
    assert m["auc"] == pytest.approx(5.5 / 6)  # 6 positive/negative pairs: 5 ordered, 0.4 vs 0.4 a tie
    assert m["log_loss_base"] == pytest.approx(log_loss(y, np.full(5, 0.6)))


def test_isotonic_calibration_maps_overconfidence_back_and_round_trips():
    rng = np.random.default_rng(0)
    raw = np.tile([0.8, 0.15, 0.05], (4000, 1))
    raw[2000:] = [0.2, 0.75, 0.05]
    outcome = np.where(rng.uniform(size=4000) < 0.5, TP, SL)  # really a coin flip
    cal = Calibrator.fit(raw, outcome)
    out = cal.apply(raw)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    assert abs(out[:2000, TP].mean() - (outcome[:2000] == TP).mean()) < 0.01
    again = Calibrator.from_json(cal.to_json()).apply(raw)
    np.testing.assert_array_equal(again, out)
    assert (out > 0).all()  # never a certainty: timeouts never seen still get a floor


def test_a_feature_row_never_uses_data_after_its_close():
    """The features of every bar are the same whether the history stops at its close or goes on."""
    from connectors.replay import KIND_FUNDING, KIND_KLINE, KIND_MARK, ReplaySource
    from streams.features.offline import compute
    from tests.conftest import SAMPLE

    src = ReplaySource("", str(SAMPLE), ["BTCUSDT", "ETHUSDT"], T0 - 6 * 86_400_000, T0 + 86_400_000)
    events = []
    for p in src.load()[0]:
        events += [(KIND_KLINE, src.kline_record(p, r)) for r in range(len(p.kline_rows))]
        events += [(KIND_MARK, src.mark_record(p, r)) for r in range(len(p.kline_rows))]
        events += [(KIND_FUNDING, src.funding_record(p, r)) for r in range(len(p.funding_rows))]
    full = compute(events)
    for cut in (T0 - 1, T0 + 8 * 3_600_000 - 1):  # a bar's close; the close of the bar before a settlement
        known = compute([e for e in events if e[1]["event_time"] <= cut])
        for symbol, rows in known.items():
            assert rows, symbol
            assert rows == full[symbol][:len(rows)]
            assert rows[-1]["close_time"] == cut and full[symbol][len(rows)]["close_time"] > cut
            assert rows[-1]["ready"]


def test_calibration_does_not_trust_a_handful_of_extreme_predictions():
    rng = np.random.default_rng(5)
    raw = np.column_stack([rng.uniform(0.30, 0.36, 20_000), np.zeros(20_000), np.full(20_000, 0.01)])
    raw[:4, 0] = 0.99  # four confident rows, all of which happened to hit TP
    raw[:, 1] = 1 - raw[:, 0] - raw[:, 2]
    outcome = np.where(rng.uniform(size=20_000) < 0.33, TP, SL)
    outcome[:4] = TP
    cal = Calibrator.fit(raw, outcome).apply(raw)
    assert cal[:4, TP].max() < 0.45  # their bin holds 500 rows: a third of them TP
