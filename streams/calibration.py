"""The live-calibration task of `perpflow up`: every few minutes, per side, the promoted model's
|mean predicted P(TP) − realized TP rate| over its latest predictions whose outcome is known (training/calibration.py
says how outcomes are known), exported as perpflow_model_calibration_error{side} with the number of predictions it
is computed over. `perpflow up` runs it because it owns the store (the embedded one admits one process).

No series for a side without a promoted model or with fewer than PERPFLOW_CALIBRATION_MIN_PREDICTIONS known
outcomes: an error over a handful of trades says nothing, and an absent series cannot fire the alert."""

from __future__ import annotations

import logging
import threading

from connectors.clickhouse_store import Store, below_the_chain
from streams.metrics import MODEL_CALIBRATION_ERROR, MODEL_CALIBRATION_PREDICTIONS
from streams.settings import Settings
from training import calibration
from training.calibration import Calibration

log = logging.getLogger(__name__)
SIDES = ("long", "short")


def export(side: str, found: Calibration | None, min_predictions: int) -> None:
    if found is None or found.predictions < min_predictions:
        for gauge in (MODEL_CALIBRATION_ERROR, MODEL_CALIBRATION_PREDICTIONS):
            try:
                gauge.remove(side)
            except KeyError:  # no series yet
                pass
        return
    MODEL_CALIBRATION_ERROR.labels(side).set(found.error)
    MODEL_CALIBRATION_PREDICTIONS.labels(side).set(found.predictions)


class CalibrationMonitor:
    """Recomputes at start and then every `calibration_interval_seconds`, in a daemon thread, until stopped. A
    failed computation is logged and tried again next time: monitoring never stops the pipeline."""

    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="calibration", daemon=True)

    def update(self) -> dict[str, Calibration | None]:
        out = {}
        for side in SIDES:
            out[side] = calibration.latest(self.store, side, self.settings.calibration_predictions)
            export(side, out[side], self.settings.calibration_min_predictions)
        return out

    def _run(self) -> None:
        below_the_chain()
        while not self._stop.is_set():
            try:
                for side, found in self.update().items():
                    if found is not None:
                        log.info("%s model %s: mean P(TP) %.3f, realized TP rate %.3f over %d predictions",
                                 side, found.model_id, found.predicted, found.realized, found.predictions)
            except Exception:  # noqa: BLE001 - logged, retried at the next interval
                log.warning("live calibration failed; trying again in %.0f s",
                            self.settings.calibration_interval_seconds, exc_info=True)
            self._stop.wait(self.settings.calibration_interval_seconds)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)
