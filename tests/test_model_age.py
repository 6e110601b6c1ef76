"""perpflow_model_age_seconds{side}: the predict agent's gauge of the promoted model's age, from the end of its
training data as the promotion record on `control` carries it; it grows between scrapes without an update."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY

from streams.predict.agent import track_model_age
from training.registry import control_value


def age(side: str) -> float | None:
    return REGISTRY.get_sample_value("perpflow_model_age_seconds", {"side": side})


def test_the_promotion_record_carries_the_training_data_end():
    row = {"id": "long-1", "side": "long", "artifact_path": "/m", "sha256": "ab", "schema_version": 1,
           "label_spec_id": "s", "reason": "", "train_end": 1_704_067_200_000}
    assert control_value(row, None)["train_end"] == 1_704_067_200_000


def test_the_age_grows_from_the_training_data_end(monkeypatch):
    now = time.time()
    track_model_age("long", int((now - 3 * 86400) * 1000))
    first = age("long")
    assert abs(first - 3 * 86400) < 5
    monkeypatch.setattr(time, "time", lambda: now + 3600)  # an hour later, nobody touched the gauge
    assert abs(age("long") - (3 * 86400 + 3600)) < 5


def test_no_series_without_a_training_data_end():
    track_model_age("short", 1_704_067_200_000)
    assert age("short") is not None
    track_model_age("short", None)  # a promotion record from before the field existed
    assert age("short") is None
    track_model_age("short", None)
