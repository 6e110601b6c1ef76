"""`perpflow train`: for each side, features ⨝ labels from the store → walk-forward validation and the final
models → a content-addressed artifact → a `trained` row in the registry."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from connectors.clickhouse_store import Store
from streams.errors import PerpflowError
from streams.features.registry import SCHEMA_VERSION
from training import artifact, dataset, registry, tables
from training.labels import LabelSpec
from training.train import SideModels, TrainConfig, train_side


def label_spec(store: Store, spec_id: str) -> LabelSpec:
    found = store.query_rows(f"SELECT spec FROM label_specs FINAL WHERE spec_id = '{spec_id}'") \
        if tables.exists(store, "label_specs") else []
    if not found:
        raise PerpflowError(f"no labels of spec {spec_id} in the store: run `perpflow label` (its summary names the "
                            "spec id)")
    return LabelSpec.from_json(found[0][0])


def train_models(store: Store, models_dir: Path, sides: list[str], symbols: list[str], start_ms: int, end_ms: int,
                 spec_id: str, cfg: TrainConfig, say: Callable[[str], None] = print) -> list[tuple[dict, SideModels]]:
    spec = label_spec(store, spec_id)
    out = []
    for side in sides:
        started = time.monotonic()
        ds = dataset.load(store, side, spec_id, symbols, start_ms, end_ms)
        if len(ds) < 1000 * (cfg.folds + 1):
            raise PerpflowError(f"{side}: {len(ds):,} ready feature rows with labels of spec {spec_id} in the window; "
                                "walk-forward needs more: build features and labels over a longer window")
        say(f"{side}: {len(ds):,} rows of {', '.join(symbols)} ({time.monotonic() - started:.1f} s to read)")
        models = train_side(ds, side, spec.horizon, cfg, say)
        created = int(time.time() * 1000)
        manifest = {"schema_version": SCHEMA_VERSION, "features": list(dataset.MODEL_FEATURES),
                    "label_spec": json.loads(spec.to_json()), "label_spec_id": spec_id, "symbols": symbols,
                    "train_start": start_ms, "train_end": end_ms, "config": cfg.__dict__}
        path, sha = artifact.save(models, models_dir, manifest)
        artifact.keep(store, path, sha)  # beside its registry row: how it reaches a worker of another home
        row = {"id": registry.model_id(side, created, sha), "side": side, "created_at": created,
               "schema_version": SCHEMA_VERSION, "label_spec_id": spec_id, "label_spec": spec.to_json(),
               "train_start": start_ms, "train_end": end_ms, "symbols": symbols,
               "fold_metrics": json.dumps(models.fold_metrics), "metrics": json.dumps(models.metrics),
               "artifact_path": str(path), "sha256": sha, "status": registry.TRAINED, "promoted_at": None,
               "actor": "", "reason": ""}
        registry.write(store, row)
        say(f"{side}: registered {row['id']} ({time.monotonic() - started:.0f} s)")
        out.append((row, models))
    return out
