"""The predict agent: ready `features` → `predictions`, with the promoted model of each side.

Where the models come from: the worker cannot open the registry (in embedded mode `perpflow up` owns the chDB
store, one process per data path), so it reads the promotions from the compacted `control` topic — entity
`model:<side>`, kind `model_promoted`, the value naming the model id, its artifact path and sha256
(`training.registry.control_value`) — and loads the artifact from disk, hash-checked (`training.artifact`). When
the recorded path does not exist here (another machine, a moved home), $PERPFLOW_HOME/models/<sha256> is tried: the
artifacts are content-addressed. `perpflow up` announces the registry's promoted models on `control` at start (the
embedded broker keeps nothing between runs); `perpflow models promote` announces new ones.

The model's age, `perpflow_model_age_seconds{side}`, is the time since the end of its training data (`train_end` in
the promotion record), computed at each scrape so it grows between promotions; a side without a model, or promoted
by a record older than that field, has no series.

`control` is read by a plain consumer of this worker (every partition, from the beginning, no group): every
worker needs every promotion, whatever partitions of `features` it owns. Before the first batch it reads
`control` to its end; afterwards a timer polls it, so a promotion switches the model without a restart. Until both
sides have a model, ready features are skipped (counted, and logged once per change): no predictions, no crash.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from schemas import event_ids
from streams import metrics
from streams.app import topic_prefix
from streams.batch_agent import BatchAgent
from streams.control import ControlReader
from streams.features.registry import SCHEMA_VERSION
from streams.settings import Settings
from training.artifact import Predictor

log = logging.getLogger(__name__)

SIDES = ("long", "short")
TOP_FEATURES = 5
CONTROL_POLL_SECONDS = 1.0


def promotions(records: list[dict]) -> dict[str, dict]:
    """The newest model promotion per side among `control` records."""
    found: dict[str, dict] = {}
    for record in records:
        if record["kind"] == "model_promoted" and record["entity"].startswith("model:"):
            value = json.loads(record["value"])
            found[value["side"]] = value
    return found


class PredictAgent(BatchAgent):
    name = "predict"
    input_topics, output_topics = ("features",), ("predictions",)

    def __init__(self, app: Any, settings: Settings) -> None:
        super().__init__(app)
        self.settings = settings
        self.bootstrap = settings.kafka_bootstrap or app.conf.broker[0].netloc
        self.models: dict[str, tuple[str, Predictor]] = {}  # side → (model id, predictor)
        self.control: ControlReader | None = None
        self.status = ""
        for side in SIDES:
            metrics.MODEL_INFO.labels(side, "none").set(0)  # exported before a model loads; 1 marks the one in use
            metrics.PREDICTION_P_TP.labels(side)
        app.timer(CONTROL_POLL_SECONDS)(self.poll_control)

    def _apply(self, promotions: dict[str, dict]) -> None:
        for side, value in promotions.items():
            if side not in SIDES or (side in self.models and self.models[side][0] == value["model_id"]):
                continue
            if value.get("schema_version") != SCHEMA_VERSION:
                log.error("model %s was trained on feature schema %s, this code computes %s: not loaded",
                          value["model_id"], value.get("schema_version"), SCHEMA_VERSION)
                continue
            path = Path(value["artifact_path"])
            if not path.exists():
                path = self.settings.home_dir / "models" / value["sha256"]
            try:
                predictor = Predictor.load(path, value["sha256"])
            except Exception as exc:  # a missing or corrupt artifact: keep serving the previous model
                log.error("cannot load model %s for the %s side from %s: %s", value["model_id"], side, path, exc)
                continue
            previous = self.models.get(side)
            metrics.MODEL_INFO.labels(side, previous[0] if previous else "none").set(0)
            metrics.MODEL_INFO.labels(side, value["model_id"]).set(1)
            self.models[side] = (value["model_id"], predictor)
            track_model_age(side, value.get("train_end"))
            log.info("%s side: predicting with model %s%s", side, value["model_id"],
                     f" (was {previous[0]})" if previous else "")
        missing = [s for s in SIDES if s not in self.models]
        status = f"no promoted model for the {' and '.join(missing)} side: no predictions until " \
                 "`perpflow models promote` announces one" if missing else "ready"
        if status != self.status:
            (log.warning if missing else log.info)("predict: %s", status)
            self.status = status

    async def poll_control(self) -> None:
        if self.control is not None:
            found = promotions(self.control.poll())
            if found:
                async with self.lock:
                    self._apply(found)

    async def handle(self, inputs: list[tuple[str, int, bytes, dict]]) -> list[tuple[str, int | None, bytes, dict]]:
        if self.control is None:
            self.control = ControlReader(self.bootstrap, "perpflow-predict-control", topic_prefix(self.app))
            self._apply(promotions(await asyncio.get_running_loop().run_in_executor(None, self.control.catch_up)))
        ready = [(p, k, r) for _, p, k, r in inputs if r["ready"]]
        if len(ready) < len(inputs):
            metrics.PREDICT_SKIPPED.labels("not_ready").inc(len(inputs) - len(ready))
        if not ready:
            return []
        if len(self.models) < len(SIDES):
            metrics.PREDICT_SKIPPED.labels("no_model").inc(len(ready))
            return []
        records = [r for _, _, r in ready]
        out = [self._base(r) for r in records]
        for side in SIDES:
            self._predict_side(side, records, out)
        for r in out:
            metrics.PREDICTIONS.labels(r["symbol"]).inc()
        return [("predictions", p, k, o) for (p, k, _), o in zip(ready, out, strict=True)]

    def _base(self, r: dict) -> dict:
        spec = self.models["long"][1].doc["label_spec"]
        return {"event_id": event_ids.prediction(r["symbol"], r["interval"], r["open_time"]),
                "event_time": r["event_time"], "symbol": r["symbol"], "source": r["source"],
                "interval": r["interval"], "open_time": r["open_time"],
                "close": _close(r), "atr_14": r["atr_14"], "funding_rate": r["funding_rate"],
                "minutes_to_funding": r["minutes_to_funding"], "k_tp": spec["k_tp"], "k_sl": spec["k_sl"]}

    def _predict_side(self, side: str, records: list[dict], out: list[dict]) -> None:
        model_id, predictor = self.models[side]
        names = predictor.features
        X = np.array([[np.nan if r[n] is None else r[n] for n in names] for r in records], dtype=np.float64)
        pred = predictor.predict(X)
        contrib = predictor.contributions(X)[:, :-1]
        top = np.argsort(-np.abs(contrib), axis=1)[:, :TOP_FEATURES]
        metrics_hist = metrics.PREDICTION_P_TP.labels(side)
        for i, o in enumerate(out):
            tr = float(pred["timeout_return"][i])
            o.update({f"model_id_{side}": model_id, f"p_tp_{side}": float(pred["p_tp"][i]),
                      f"p_sl_{side}": float(pred["p_sl"][i]), f"p_timeout_{side}": float(pred["p_timeout"][i]),
                      f"hold_bars_{side}": float(pred["hold_bars"][i]), f"mae_{side}": float(pred["mae_quantile"][i]),
                      f"timeout_return_{side}": tr if np.isfinite(tr) else None,
                      f"top_features_{side}": [{"feature": names[j], "value": float(contrib[i, j])} for j in top[i]]})
            metrics_hist.observe(o[f"p_tp_{side}"])


def track_model_age(side: str, train_end_ms: int | None) -> None:
    """perpflow_model_age_seconds{side}: now minus the end of the model's training data, evaluated at each scrape
    (so it grows without anyone updating it); no series when the promotion did not say when its data ends."""
    if train_end_ms is None:
        try:
            metrics.MODEL_AGE.remove(side)
        except KeyError:
            pass
        return
    end_s = int(train_end_ms) / 1000
    metrics.MODEL_AGE.labels(side).set_function(lambda: time.time() - end_s)


def _close(r: dict) -> float:
    """The features record has no close, but ATR and its ratio to the close (ready records have both)."""
    return r["atr_14"] / r["atr_pct"]


def register(app: Any, settings: Settings) -> PredictAgent:
    return PredictAgent(app, settings)
