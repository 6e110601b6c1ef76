"""Live calibration of the promoted models (perpflow_model_calibration_error{side}) on hand-made bars and predictions
whose outcomes are worked out in the comments: first on arrays, then through a real chDB store, the registry's
promoted model and the gauge `perpflow up` exports."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from prometheus_client import REGISTRY

from schemas.catalog import topic
from schemas.tables import arrow_schema
from streams.calibration import CalibrationMonitor, export
from streams.settings import Settings
from training import registry
from training.calibration import Calibration, latest, measure, outcomes
from training.labels import BAR_MS, SL, TIMEOUT, TP, Bars, LabelSpec

T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
SPEC = LabelSpec(k_tp=2.0, k_sl=1.0, horizon=3)  # every bar closes at 100 with ATR 1: long TP 102, SL 99
QUIET = (100.0, 100.2, 99.8, 100.0)
# open, high, low, close of bars 0…7; bar 8 is not archived yet
OHLC = [QUIET,
        (100.0, 102.5, 99.5, 100.0),  # bar 1 reaches 102: TP for the prediction at bar 0
        (100.0, 100.5, 98.5, 100.0),  # bar 2 reaches 99: SL for the prediction at bar 1
        QUIET, QUIET, QUIET,  # bars 3-5 touch nothing: TIMEOUT for the prediction at bar 2 (horizon 3)
        (100.0, 102.1, 99.9, 100.0),  # bar 6 reaches 102: TP for the prediction at bar 3 (its third bar)
        QUIET]
# predictions at bars 0-3 (outcomes TP, SL, TIMEOUT, TP) and at bar 6, whose bars 7-9 are not all archived
PREDICTED = {0: 0.5, 1: 0.4, 2: 0.3, 3: 0.6, 6: 0.9}
# known: bars 0-3, mean P(TP) 0.45, realized TP rate 2/4: error 0.05
EXPECTED = (4, 0.45, 0.5)


def hand_bars() -> Bars:
    o, h, lo, c = (np.array([bar[k] for bar in OHLC]) for k in range(4))
    return Bars.on_grid(T0 + np.arange(len(OHLC)) * BAR_MS, o, h, lo, c, np.ones(len(OHLC)))


def test_outcomes_follow_the_labels_and_unknown_ones_are_left_out():
    at = T0 + np.array(list(PREDICTED)) * BAR_MS
    assert outcomes(hand_bars(), "long", SPEC, at).tolist() == [TP, SL, TIMEOUT, TP, -1]
    found = measure("long", "m", np.array(list(PREDICTED.values())), outcomes(hand_bars(), "long", SPEC, at))
    assert (found.predictions, found.predicted, found.realized) == pytest.approx(EXPECTED)
    assert found.error == pytest.approx(0.05)


def test_no_known_outcome_no_calibration():
    at = T0 + np.array([6, 7]) * BAR_MS
    assert measure("long", "m", np.array([0.9, 0.8]), outcomes(hand_bars(), "long", SPEC, at)) is None


def value(name: str, side: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"side": side})


def test_the_gauge_exists_only_over_enough_predictions():
    export("short", Calibration("short", "m", 150, 0.4, 0.25), min_predictions=100)
    assert value("perpflow_model_calibration_error", "short") == pytest.approx(0.15)
    assert value("perpflow_model_calibration_predictions", "short") == 150
    export("short", Calibration("short", "m", 99, 0.4, 0.25), min_predictions=100)
    assert value("perpflow_model_calibration_error", "short") is None
    assert value("perpflow_model_calibration_predictions", "short") is None
    export("short", None, min_predictions=100)  # no series to remove: fine


def rows_table(name: str, rows: list[dict]) -> pa.Table:
    schema = arrow_schema(topic(name))
    return pa.Table.from_pylist([{"source": "test", "kafka_partition": -1, "kafka_offset": -1, **r} for r in rows],
                                schema=schema)


def fill(store, model_id: str, other_model: str) -> None:
    """md_klines of bars 0-7, the features' ATR of each, the model's predictions above and one of another model
    (which must not count), and the model promoted with SPEC."""
    bars = [{"event_id": f"k{i}", "event_time": T0 + (i + 1) * BAR_MS, "symbol": "BTCUSDT", "interval": "5m",
             "open_time": T0 + i * BAR_MS, "close_time": T0 + (i + 1) * BAR_MS - 1, "open": o, "high": h, "low": lo,
             "close": c, "volume": 1.0, "is_closed": True} for i, (o, h, lo, c) in enumerate(OHLC)]
    store.insert_arrow("md_klines", rows_table("md.klines", bars))
    features = [{"event_id": f"f{i}", "event_time": T0 + (i + 1) * BAR_MS, "symbol": "BTCUSDT", "interval": "5m",
                 "open_time": T0 + i * BAR_MS, "close": 100.0, "atr_14": 1.0, "ready": True} for i in range(len(OHLC))]
    store.insert_arrow("features", rows_table("features", features))

    def prediction(i: int, p: float, model: str) -> dict:
        return {"event_id": f"p{i}-{model}", "event_time": T0 + (i + 1) * BAR_MS, "symbol": "BTCUSDT",
                "interval": "5m", "open_time": T0 + i * BAR_MS, "close": 100.0, "atr_14": 1.0, "k_tp": SPEC.k_tp,
                "k_sl": SPEC.k_sl, "model_id_long": model, "p_tp_long": p, "p_sl_long": 0.3, "p_timeout_long": 0.2,
                "top_features_long": "[]", "model_id_short": "", "top_features_short": "[]"}

    predictions = [prediction(i, p, model_id) for i, p in PREDICTED.items()]
    predictions.append(prediction(4, 0.99, other_model))  # an earlier model's: not this one's record
    store.insert_arrow("predictions", rows_table("predictions", predictions))
    registry.write(store, {"id": model_id, "side": "long", "created_at": T0, "schema_version": 1,
                           "label_spec_id": SPEC.id, "label_spec": SPEC.to_json(), "train_start": T0 - 86_400_000,
                           "train_end": T0, "symbols": ["BTCUSDT"], "fold_metrics": "[]", "metrics": "{}",
                           "artifact_path": "/nowhere", "sha256": "00", "status": registry.PROMOTED,
                           "promoted_at": T0, "actor": "test", "reason": ""})


def test_the_promoted_models_calibration_from_the_archive(store, home):
    monitor = CalibrationMonitor(store, Settings(home=home, clickhouse_url="", calibration_min_predictions=4))
    assert monitor.update() == {"long": None, "short": None}  # nothing promoted: nothing to measure, no series
    assert value("perpflow_model_calibration_error", "long") is None

    fill(store, "long-test", "long-older")
    found = latest(store, "long", limit=1000)
    assert found.model_id == "long-test"
    assert (found.predictions, found.predicted, found.realized) == pytest.approx(EXPECTED)
    assert latest(store, "short", limit=1000) is None
    # the latest 2 predictions whose horizon has passed are the ones at bars 3 and 2 (6's has not): TP, TIMEOUT
    assert latest(store, "long", limit=2).realized == pytest.approx(0.5)
    assert latest(store, "long", limit=2).predicted == pytest.approx(0.45)

    monitor.update()
    assert value("perpflow_model_calibration_error", "long") == pytest.approx(0.05)
    assert value("perpflow_model_calibration_predictions", "long") == 4
    assert value("perpflow_model_calibration_error", "short") is None
