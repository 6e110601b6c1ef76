"""The predict agent: `features` → `predictions` and `signals`, one each, in order: ready records are predicted
with the promoted model of each side; the others (not ready, or no model for their time) become markers with
`skip_reason` set and no probabilities, so every bar of every symbol reaches the risk agent, which decides all
symbols in event-time order and must know when a symbol has passed a time. The policy (`streams.policy.signals`)
turns the batch's prediction records into its signals before either is sent: both topics are published, the
predictions for the archive and the model-quality views, the signals for the risk agent, one broker hop sooner.

Where the models come from: the worker cannot open the registry (in embedded mode `perpflow up` owns the chDB
store, one process per data path), so it reads the promotions from the compacted `control` topic — entity
`model:<side>`, kind `model_promoted`, the value naming the model id, its artifact path and sha256
(`training.registry.control_value`) — and loads the artifact from disk, hash-checked (`training.artifact`). When
the recorded path does not exist here (another machine, a moved home), $PERPFLOW_HOME/models/<sha256> is tried: the
artifacts are content-addressed; when that is missing too (a deployed worker starts with an empty home), the artifact
is fetched from the store's `model_artifacts` (`streams.store_client`: the ClickHouse server, or the `perpflow up`
holding the embedded store), hash-checked before it is cached there. An artifact that is missing or fails its hashes
is refused: the side keeps the model it had, the refusal is logged, counted (perpflow_model_refused_total) and shown
in the worker's GET /status. Loading and fetching run off the event loop. `perpflow up` announces the registry's
promoted models on `control` at start (the embedded broker keeps nothing between runs); `perpflow models promote`
announces new ones.

The model's age, `perpflow_model_age_seconds{side}`, is the time since the end of its training data (`train_end` in
the promotion record), computed at each scrape so it grows between promotions; a side without a model, or promoted
by a record older than that field, has no series.

`control` is read by a plain consumer of this worker (every partition, from the beginning, no group): every
worker needs every promotion, whatever partitions of `features` it owns. Before the first batch it reads
`control` to its end; afterwards a timer polls it, so a promotion switches the model without a restart. Until both
sides have a model, ready features get `no_model` markers (counted, and logged once per change): no crash.

Walk-forward backtests pin a schedule: promotions carrying `valid_from` (event time, ms; entity
`model:<side>@<valid_from>`), each model used for the bars that open at or after its `valid_from` and before the
next one's — in event time, so the switch happens at the same bar at any replay speed. A live promotion has no
`valid_from` and replaces the side's model for every bar from then on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import numpy as np

from schemas import event_ids
from streams import metrics
from streams.app import topic_prefix
from streams.batch_agent import BatchAgent
from streams.control import ControlReader, control_token
from streams.features.registry import SCHEMA_VERSION
from streams.policy.signals import Policy
from streams.settings import Settings
from streams.store_client import query_text
from training.artifact import Predictor, fetch, locate

log = logging.getLogger(__name__)

SIDES = ("long", "short")
TOP_FEATURES = 5
CONTROL_POLL_SECONDS = 1.0


def promotions(records: list[dict]) -> dict[tuple[str, int], dict]:
    """The newest model promotion per side and start (`valid_from`, 0 for a live promotion) among `control`
    records."""
    found: dict[tuple[str, int], dict] = {}
    for record in records:
        if record["kind"] == "model_promoted" and record["entity"].startswith("model:"):
            value = json.loads(record["value"])
            found[(value["side"], int(value.get("valid_from") or 0))] = value
    return found


class PredictAgent(BatchAgent):
    name = "predict"
    input_topics, output_topics = ("features",), ("predictions", "signals")
    isolates_failing_records = True  # stateless per record: a features record it cannot predict is dead-lettered

    def __init__(self, app: Any, settings: Settings) -> None:
        super().__init__(app)
        self.settings = settings
        self.policy = Policy(settings)
        self.bootstrap = settings.kafka_bootstrap  # run_worker sets the worker's own
        # side → its schedule, by valid_from: (valid_from, model id, predictor); live, one entry from 0
        self.models: dict[str, list[tuple[int, str, Predictor]]] = {}
        self.control: ControlReader | None = None
        self.status = ""
        self.refused: dict[str, str] = {}  # side → the promotion last refused and why (cleared by a model loading)
        for side in SIDES:
            metrics.MODEL_INFO.labels(side, "none").set(0)  # exported before a model loads; 1 marks the one in use
            metrics.PREDICTION_P_TP.labels(side)
            metrics.MODEL_REFUSED.labels(side)
        app.timer(CONTROL_POLL_SECONDS)(self.poll_control)

    def _load(self, promotions: dict[tuple[str, int], dict]) -> list[tuple[str, int, dict, Predictor | None, str]]:
        """The promotions that change a side's schedule, each with its predictor or why it was refused. Blocking (disk,
        the store): run off the event loop."""
        loaded = []
        for (side, valid_from), value in sorted(promotions.items()):
            current = next((e for e in self.models.get(side, []) if e[0] == valid_from), None)
            if side not in SIDES or (current is not None and current[1] == value["model_id"]):
                continue
            if value.get("schema_version") != SCHEMA_VERSION:
                loaded.append((side, valid_from, value, None, f"trained on feature schema {value.get('schema_version')}"
                               f", this code computes {SCHEMA_VERSION}"))
                continue
            models_dir = self.settings.home_dir / "models"
            try:
                path = locate(value["artifact_path"], value["sha256"], models_dir)
                if not (path / "model.json").is_file():
                    path = fetch(lambda q: query_text(self.settings, q, "tsv", open_embedded=False), value["sha256"],
                                 models_dir)
                    log.info("model %s fetched from the store into %s", value["model_id"], path)
                loaded.append((side, valid_from, value, Predictor.load(path, value["sha256"]), ""))
            except Exception as exc:  # missing, unreachable or failing its hashes: keep serving the previous model
                loaded.append((side, valid_from, value, None, str(exc)))
        return loaded

    def _install(self, loaded: list[tuple[str, int, dict, Predictor | None, str]]) -> None:
        for side, valid_from, value, predictor, refusal in loaded:
            schedule = self.models.get(side, [])
            if predictor is None:
                log.error("model %s for the %s side not loaded: %s", value["model_id"], side, refusal)
                metrics.MODEL_REFUSED.labels(side).inc()
                self.refused[side] = f"{value['model_id']}: {refusal}"
                continue
            self.refused.pop(side, None)
            current = next((e for e in schedule if e[0] == valid_from), None)
            newest = schedule[-1] if schedule else None
            self.models[side] = sorted([e for e in schedule if e[0] != valid_from] +
                                       [(valid_from, value["model_id"], predictor)], key=lambda e: e[0])
            if self.models[side][-1][0] == valid_from:  # the side's newest model: the one the metrics describe
                metrics.MODEL_INFO.labels(side, newest[1] if newest else "none").set(0)
                metrics.MODEL_INFO.labels(side, value["model_id"]).set(1)
                track_model_age(side, value.get("train_end"))
            log.info("%s side: predicting with model %s%s%s", side, value["model_id"],
                     f" from {valid_from}" if valid_from else "",
                     f" (was {current[1]})" if current else "")
        missing = [s for s in SIDES if s not in self.models]
        status = f"no promoted model for the {' and '.join(missing)} side: no predictions until " \
                 "`perpflow models promote` announces one" if missing else "ready"
        if status != self.status:
            (log.warning if missing else log.info)("predict: %s", status)
            self.status = status

    async def _take(self, promotions: dict[tuple[str, int], dict]) -> list:
        return await asyncio.get_running_loop().run_in_executor(None, self._load, promotions)

    def describe(self) -> dict:
        """What GET /status shows: each side's newest model, and the promotions refused since."""
        return {"models": {side: schedule[-1][1] for side, schedule in self.models.items() if schedule},
                "models_status": self.status, "models_refused": dict(self.refused)}

    async def poll_control(self) -> None:
        if self.control is not None:
            found = promotions(self.control.poll())
            if found:
                loaded = await self._take(found)
                async with self.lock:
                    self._install(loaded)

    async def handle(self, inputs: list[tuple[str, int, bytes, dict]]) -> list[tuple[str, int | None, bytes, dict]]:
        if self.control is None:
            self.control = ControlReader(self.bootstrap, "perpflow-predict-control", control_token(self.settings),
                                         topic_prefix(self.app))
            caught_up = await asyncio.get_running_loop().run_in_executor(None, self.control.catch_up)
            self._install(await self._take(promotions(caught_up)))
        out: list[dict] = []
        chosen: list[tuple[dict, dict, dict]] = []  # (features record, its prediction, the models) to predict
        for _, _, _, r in inputs:
            models = self._models_for(r["open_time"]) if r["ready"] else None
            if models is None:
                reason = "no_model" if r["ready"] else "not_ready"
                metrics.PREDICT_SKIPPED.labels(reason).inc()
                out.append(skipped(r, reason))
            else:
                out.append(self._base(r, models["long"][1]))
                chosen.append((r, out[-1], models))
        for side in SIDES:  # one call per model in use: a walk-forward batch may straddle a switch
            groups: dict[str, list[int]] = {}
            for i, (_, _, models) in enumerate(chosen):
                groups.setdefault(models[side][0], []).append(i)
            for rows in groups.values():
                self._predict_side(side, chosen[rows[0]][2][side], [chosen[i][0] for i in rows],
                                   [chosen[i][1] for i in rows])
        for _, o, _ in chosen:
            metrics.PREDICTIONS.labels(o["symbol"]).inc()
        signals = self.policy.signals(out)  # from the records as published: the topic's doubles lose nothing
        return ([("predictions", p, k, o) for (_, p, k, _), o in zip(inputs, out, strict=True)] +
                [("signals", p, k, s) for (_, p, k, _), s in zip(inputs, signals, strict=True)])

    def _models_for(self, open_time: int) -> dict[str, tuple[str, Predictor]] | None:
        """Each side's model for a bar opening at `open_time` (None: a side has none yet)."""
        found = {}
        for side in SIDES:
            entry = None
            for e in self.models.get(side, ()):
                if e[0] > open_time:
                    break
                entry = e
            if entry is None:
                return None
            found[side] = (entry[1], entry[2])
        return found

    def _base(self, r: dict, long_model: Predictor) -> dict:
        spec = long_model.doc["label_spec"]
        return {**_bar(r), "close": _close(r), "k_tp": spec["k_tp"], "k_sl": spec["k_sl"], "skip_reason": ""}

    def _predict_side(self, side: str, model: tuple[str, Predictor], records: list[dict], out: list[dict]) -> None:
        model_id, predictor = model
        names = predictor.features
        X = np.array([[np.nan if r[n] is None else r[n] for n in names] for r in records], dtype=np.float64)
        pred = predictor.predict(X, threads=1)
        contrib = predictor.contributions(X, threads=1)[:, :-1]
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


def _bar(r: dict) -> dict:
    """What a prediction repeats of its features record."""
    return {"event_id": event_ids.prediction(r["symbol"], r["interval"], r["open_time"]),
            "event_time": r["event_time"], "symbol": r["symbol"], "source": r["source"], "interval": r["interval"],
            "open_time": r["open_time"], "atr_14": r["atr_14"], "funding_rate": r["funding_rate"],
            "minutes_to_funding": r["minutes_to_funding"]}


def skipped(r: dict, reason: str) -> dict:
    """The marker of a bar that was not predicted: no model ids, no probabilities (0), `skip_reason` says why."""
    sides = {f"{name}_{side}": value for side in SIDES for name, value in (
        ("model_id", ""), ("p_tp", 0.0), ("p_sl", 0.0), ("p_timeout", 0.0), ("hold_bars", 0.0), ("mae", 0.0),
        ("timeout_return", None), ("top_features", []))}
    close = _close(r) if r["atr_14"] and r["atr_pct"] else 0.0
    return {**_bar(r), **sides, "close": close, "k_tp": 0.0, "k_sl": 0.0, "skip_reason": reason}


def _close(r: dict) -> float:
    """The features record has no close, but ATR and its ratio to the close (ready records have both)."""
    return r["atr_14"] / r["atr_pct"]


def register(app: Any, settings: Settings) -> PredictAgent:
    return PredictAgent(app, settings)
