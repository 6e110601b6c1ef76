"""Model artifacts, content-addressed under $PERPFLOW_HOME/models/<sha256>/, and the predictor that loads them.

An artifact is `model.json` (the LightGBM boosters as text, the isotonic maps, the feature list and schema version,
the label spec, metrics, the reliability table, feature importance, and the sha256 of `oof.npz`) plus `oof.npz`
(its out-of-fold predictions: what promotion compares on a common window). The directory is named by the sha256 of
`model.json`, which the registry also records; loading checks both hashes, so a corrupt or swapped artifact is
refused rather than served.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import lightgbm as lgb
import numpy as np

from streams.errors import PerpflowError
from training.labels import OUTCOMES, TP
from training.metrics import Calibrator
from training.train import SideModels

FORMAT = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(models: SideModels, root: Path, manifest: dict) -> tuple[Path, str]:
    """Write the artifact under `root` (idempotent: same content, same directory); return (path, sha256)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **models.oof)
    oof = buf.getvalue()
    doc = {"format": FORMAT, **manifest, "side": models.side, "rows": models.rows,
           "metrics": models.metrics, "fold_metrics": models.fold_metrics, "reliability": models.reliability,
           "importance": models.importance, "calibration": models.calibrator.to_json(),
           "boosters": {name: b.model_to_string() for name, b in models.boosters.items()},
           "oof_sha256": _sha256(oof)}
    body = json.dumps(doc, sort_keys=True).encode()
    sha = _sha256(body)
    final = root / sha
    if not final.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        (tmp / "model.json").write_bytes(body)
        (tmp / "oof.npz").write_bytes(oof)
        try:
            os.rename(tmp, final)  # atomic: a reader never sees half an artifact
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return final, sha


def locate(artifact_path: str, sha256: str, models_dir: Path) -> Path:
    """Where a registered artifact is here: its recorded path, or (another machine, a moved home) its
    content-addressed place `models_dir/<sha256>`."""
    path = Path(artifact_path)
    return path if path.exists() else models_dir / sha256


def manifest(path: Path, sha256: str) -> dict:
    """The artifact's document, hash-checked (features, label spec, training config, boosters as text), without
    building its models."""
    model = path / "model.json"
    if not model.is_file():
        raise PerpflowError(f"model artifact {model} is missing; retrain with `perpflow train`")
    body = model.read_bytes()
    if _sha256(body) != sha256:
        raise PerpflowError(f"model artifact {model} is corrupt (sha256 {_sha256(body)[:12]}…, the registry says "
                            f"{sha256[:12]}…); retrain with `perpflow train`")
    doc = json.loads(body)
    oof = path / "oof.npz"
    if not oof.is_file() or _sha256(oof.read_bytes()) != doc["oof_sha256"]:
        raise PerpflowError(f"{oof} is missing or corrupt; retrain with `perpflow train`")
    return doc


def load_oof(path: Path, sha256: str) -> dict[str, np.ndarray]:
    manifest(path, sha256)
    with np.load(path / "oof.npz") as z:
        return {k: z[k] for k in z.files}


class Predictor:
    """What the stream's predictor needs from a promoted model: calibrated outcome probabilities, the regressors,
    and per-feature contributions (which features drove P(TP))."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.features: list[str] = doc["features"]
        self.boosters = {name: lgb.Booster(model_str=text) for name, text in doc["boosters"].items()}
        self.calibrator = Calibrator.from_json(doc["calibration"])

    @classmethod
    def load(cls, path: Path, sha256: str) -> Predictor:
        return cls(manifest(path, sha256))

    def predict(self, X: np.ndarray, threads: int = 0) -> dict[str, np.ndarray]:
        """`threads`: LightGBM's num_threads (0: OpenMP's default, every core). The predict agent passes 1: its
        batches are small, and OpenMP's threads spin after each call on the core the broker needs (measured: 0.74
        ms of CPU per call set with two threads, 0.52 with one) and stall a call when one of them is descheduled."""
        kw = {"num_threads": threads} if threads else {}
        proba = self.calibrator.apply(self.boosters["outcome"].predict(X, **kw))
        out = {f"p_{name.lower()}": proba[:, i] for i, name in enumerate(OUTCOMES)}
        out["hold_bars"] = self.boosters["hold"].predict(X, **kw)
        out["mae_quantile"] = self.boosters["mae"].predict(X, **kw)
        tr = self.boosters.get("timeout_return")
        out["timeout_return"] = tr.predict(X, **kw) if tr is not None else np.full(len(X), np.nan)
        return out

    def contributions(self, X: np.ndarray, threads: int = 0) -> np.ndarray:
        """SHAP-style contributions to the raw TP score (rows × (features + 1), the last column the bias)."""
        c = self.boosters["outcome"].predict(X, pred_contrib=True, **({"num_threads": threads} if threads else {}))
        width = len(self.features) + 1
        return c[:, TP * width:(TP + 1) * width]
