"""Model artifacts, content-addressed under $PERPFLOW_HOME/models/<sha256>/, and the predictor that loads them.

An artifact is `model.json` (the LightGBM boosters as text, the isotonic maps, the feature list and schema version,
the label spec, metrics, the reliability table, feature importance, and the sha256 of `oof.npz`) plus `oof.npz`
(its out-of-fold predictions: what promotion compares on a common window). The directory is named by the sha256 of
`model.json`, which the registry also records; loading checks both hashes, so a corrupt or swapped artifact is
refused rather than served.

The same two files are kept in the store's `model_artifacts` table, beside the registry (`keep`, by the trainer and at
promotion): a worker of another home — a deployed one, whose home starts empty — fetches the artifact a `control`
promotion names from there (`fetch`), checks both hashes before anything is written, and caches it under its own
`models/<sha256>`. The store rather than an object store: every deployment already has it (chDB embedded, a
ClickHouse server in compose and k8s), artifacts are a few MB, and the registry row and its files then live and are
backed up together.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pyarrow as pa

from connectors.clickhouse_store import Store
from streams.errors import PerpflowError
from streams.settings import settings
from training import tables
from training.labels import OUTCOMES, TP
from training.metrics import Calibrator
from training.train import SideModels

FORMAT = 1
MODEL, OOF = "model.json", "oof.npz"
SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactRefused(PerpflowError):
    """An artifact whose bytes do not hash to what the registry recorded: corrupt, swapped or tampered with."""


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
    return _write(root, sha, {MODEL: body, OOF: oof}), sha


def _write(root: Path, sha256: str, files: dict[str, bytes]) -> Path:
    """The artifact's directory `root/<sha256>`, written once (same content, same directory)."""
    final = root / sha256
    if not final.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        try:
            os.rename(tmp, final)  # atomic: a reader never sees half an artifact
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def locate(artifact_path: str, sha256: str, models_dir: Path) -> Path:
    """Where a registered artifact is here: its recorded path, or (another machine, a moved home) its
    content-addressed place `models_dir/<sha256>`."""
    path = Path(artifact_path)
    return path if path.exists() else models_dir / sha256


def resolve(store: Store, row: dict, models_dir: Path | None = None) -> Path:
    """Where a registry row's artifact is here — its recorded path, or `models_dir/<sha256>` (default: this home's
    models) — fetched into `models_dir` from the store's `model_artifacts` when it is in neither (a trainer or a
    command with a fresh home, e.g. each run of the Kubernetes CronJob)."""
    models_dir = models_dir or settings().home_dir / "models"
    path = locate(row["artifact_path"], row["sha256"], models_dir)
    if (path / MODEL).is_file():
        return path
    tables.ensure(store, "model_artifacts")
    return fetch(lambda q: store.query_text(q, "tsv"), row["sha256"], models_dir)


def manifest(path: Path, sha256: str) -> dict:
    """The artifact's document, hash-checked (features, label spec, training config, boosters as text), without
    building its models."""
    model = path / MODEL
    if not model.is_file():
        raise PerpflowError(f"model artifact {model} is missing; retrain with `perpflow train`")
    oof = path / OOF
    return verify({MODEL: model.read_bytes(), **({OOF: oof.read_bytes()} if oof.is_file() else {})}, sha256,
                  str(path), "retrain with `perpflow train`")


def verify(files: dict[str, bytes], sha256: str, where: str, fix: str) -> dict:
    """The artifact's document, once `model.json` hashes to `sha256` and `oof.npz` to what the document records;
    else ArtifactRefused naming `where` it came from and how to `fix` it."""
    body = files.get(MODEL, b"")
    if _sha256(body) != sha256:
        raise ArtifactRefused(f"model artifact {where}/{MODEL} is corrupt or tampered with (sha256 "
                              f"{_sha256(body)[:12]}…, the registry says {sha256[:12]}…): refused; {fix}")
    doc = json.loads(body)
    if _sha256(files.get(OOF, b"")) != doc["oof_sha256"]:
        raise ArtifactRefused(f"model artifact {where}/{OOF} is missing, corrupt or tampered with: refused; {fix}")
    return doc


def keep(store: Store, path: Path, sha256: str) -> None:
    """Put the artifact at `path` in the store's `model_artifacts` (once; a corrupt one is refused, never kept)."""
    tables.ensure(store, "model_artifacts")
    if store.query_rows(f"SELECT count() FROM model_artifacts FINAL WHERE sha256 = '{_checked(sha256)}'")[0][0] >= 2:
        return
    manifest(path, sha256)
    files = {MODEL: (path / MODEL).read_bytes(), OOF: (path / OOF).read_bytes()}
    now = int(time.time() * 1000)
    store.insert_arrow("model_artifacts", pa.table({
        "sha256": pa.array([sha256] * len(files)), "file": pa.array(list(files)),
        "body": pa.array(list(files.values()), type=pa.binary()),
        "size": pa.array([len(b) for b in files.values()], type=pa.uint64()),
        "stored_at": pa.array([now] * len(files), type=pa.timestamp("ms", tz="UTC"))}))


def fetch(query_tsv: Callable[[str], str], sha256: str, models_dir: Path) -> Path:
    """The artifact `sha256` from the store (`query_tsv`: a read-only query answered as TSV), hash-checked before
    anything is written, cached as `models_dir/<sha256>`."""
    text = query_tsv("SELECT file, base64Encode(body) FROM model_artifacts FINAL "
                     f"WHERE sha256 = '{_checked(sha256)}' ORDER BY file")
    files = {name: base64.b64decode(data) for name, data in (line.split("\t") for line in text.splitlines() if line)}
    if not files:
        raise PerpflowError(f"model artifact {sha256[:12]}… is neither under {models_dir} nor in the store's "
                            "model_artifacts: promote it with `perpflow models promote` where it was trained (that "
                            "stores it)")
    verify(files, sha256, f"model_artifacts:{sha256[:12]}…", "train and promote the model again")
    return _write(models_dir, sha256, files)


def _checked(sha256: str) -> str:
    if not SHA256.fullmatch(sha256):
        raise ArtifactRefused(f"{sha256!r} is not a sha256")
    return sha256


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
