"""The model registry: rows of the `models` table (one per trained model of a side) pointing at content-addressed
artifacts, and the gated promotion.

A status change writes the row again with a later `updated_at` (the table keeps the latest version). Promotion
gates: the artifact is intact (always, even forced); the feature schema version is the running code's; when the side
has a promoted model, the candidate's out-of-fold log loss and Brier of P(TP), on the rows both have out-of-fold
predictions for (same symbols and times, same label spec), are not worse. `force` with a reason overrides the
last two and records why. The previous model of the side is archived.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from connectors.clickhouse_store import Store
from streams.errors import PerpflowError
from streams.features.registry import SCHEMA_VERSION
from training import tables
from training.artifact import keep, load_oof, resolve
from training.metrics import brier, log_loss

TRAINED, PROMOTED, ARCHIVED = "trained", "promoted", "archived"
FIELDS = ("id", "side", "created_at", "schema_version", "label_spec_id", "label_spec", "train_start", "train_end",
          "symbols", "fold_metrics", "metrics", "artifact_path", "sha256", "status", "promoted_at", "actor", "reason")
TIMES = ("created_at", "train_start", "train_end", "promoted_at")
_TS = pa.timestamp("ms", tz="UTC")
_ARROW = {"schema_version": pa.int32(), "symbols": pa.list_(pa.string()), **dict.fromkeys(TIMES, _TS)}


def _now_ms() -> int:
    return int(time.time() * 1000)


def model_id(side: str, created_ms: int, sha256: str) -> str:
    return f"{side}-{datetime.fromtimestamp(created_ms / 1000, UTC):%Y%m%dT%H%M%S}-{sha256[:8]}"


def write(store: Store, row: dict) -> None:
    tables.ensure(store, "models")
    cols = {f: pa.array([row[f]], type=_ARROW.get(f, pa.string())) for f in FIELDS}
    cols["updated_at"] = pa.array([_now_ms()], type=_TS)
    store.insert_arrow("models", pa.table(cols))


def rows(store: Store, where: str = "1") -> list[dict]:
    if not tables.exists(store, "models"):
        return []
    select = ", ".join(f"toUnixTimestamp64Milli({f})" if f in TIMES else f for f in FIELDS)
    found = store.query_rows(f"SELECT {select} FROM models FINAL WHERE {where} ORDER BY created_at, id")
    return [dict(zip(FIELDS, r, strict=True)) for r in found]


def get(store: Store, model: str) -> dict:
    if not all(c.isalnum() or c in "-_" for c in model):
        raise PerpflowError(f"{model!r} is not a model id (see `perpflow models list`)")
    found = rows(store, f"id = '{model}'")
    if not found:
        raise PerpflowError(f"no model {model!r} in the registry: `perpflow models list` shows them, "
                            "`perpflow train` makes them")
    return found[0]


def promoted(store: Store, side: str) -> dict | None:
    found = rows(store, f"side = '{side}' AND status = '{PROMOTED}'")
    return found[-1] if found else None


@dataclass
class Gate:
    name: str
    ok: bool
    detail: str


@dataclass
class Promotion:
    model: dict
    incumbent: dict | None
    gates: list[Gate] = field(default_factory=list)
    forced: bool = False
    control: dict | None = None  # the record published on `control`, if a broker took it


def common_window(store: Store, candidate: dict, incumbent: dict) -> Gate:
    """Log loss and Brier of P(TP) of both models on the rows both predicted out of fold."""
    if candidate["label_spec_id"] != incumbent["label_spec_id"]:
        return Gate("not worse than the incumbent", False,
                    f"label specs differ ({candidate['label_spec_id']} vs {incumbent['label_spec_id']}): "
                    "the probabilities are of different events")
    a = load_oof(resolve(store, candidate), candidate["sha256"])
    b = load_oof(resolve(store, incumbent), incumbent["sha256"])
    key_a = np.char.add(a["symbol"].astype(str), a["open_time"].astype(str))
    key_b = np.char.add(b["symbol"].astype(str), b["open_time"].astype(str))
    _, ia, ib = np.intersect1d(key_a, key_b, return_indices=True)
    if len(ia) == 0:
        return Gate("not worse than the incumbent", False, "no common out-of-fold window to compare on")
    y = (a["outcome"][ia] == 0).astype(np.float64)
    pa_, pb = a["p_tp"][ia], b["p_tp"][ib]
    ll_a, ll_b, br_a, br_b = log_loss(y, pa_), log_loss(y, pb), brier(y, pa_), brier(y, pb)
    ok = ll_a <= ll_b and br_a <= br_b
    return Gate("not worse than the incumbent", ok,
                f"{len(ia):,} common rows: log loss {ll_a:.5f} vs {ll_b:.5f}, Brier {br_a:.5f} vs {br_b:.5f}")


class Refused(PerpflowError):
    """A promotion the gates refused; `gates` are all of them, passed and failed."""

    def __init__(self, message: str, gates: list[Gate]):
        super().__init__(message)
        self.gates = gates


def promote(store: Store, model: str, actor: str, reason: str = "", force: bool = False,
            publish: Callable[[dict, dict | None], dict | None] | None = None,
            extra_gates: list[Gate] | None = None) -> Promotion:
    """Check the gates (`extra_gates`: the caller's own, e.g. retraining's newest unseen window), archive the side's
    previous model, promote this one, then `publish` the change."""
    row = get(store, model)
    path = resolve(store, row)
    load_oof(path, row["sha256"])  # corrupt or missing artifacts: refused, even forced
    keep(store, path, row["sha256"])  # in the store, where every worker can fetch it
    incumbent = promoted(store, row["side"])
    result = Promotion(row, incumbent if incumbent and incumbent["id"] != row["id"] else None, forced=force)
    result.gates.append(Gate("feature schema version", row["schema_version"] == SCHEMA_VERSION,
                             f"model {row['schema_version']}, running code {SCHEMA_VERSION}"))
    if result.incumbent is not None:
        result.gates.append(common_window(store, row, result.incumbent))
    result.gates += extra_gates or []
    failed = [g for g in result.gates if not g.ok]
    if failed and not force:
        raise Refused(f"{model} not promoted: " + "; ".join(f"{g.name}: {g.detail}" for g in failed)
                      + ". `--force --reason TEXT` overrides and records why", result.gates)
    now = _now_ms()
    if result.incumbent is not None:
        write(store, {**result.incumbent, "status": ARCHIVED})
    row = {**row, "status": PROMOTED, "promoted_at": now, "actor": actor, "reason": reason}
    write(store, row)
    result.model = row
    if publish is not None:
        result.control = publish(row, result.incumbent)
    return result


def control_value(row: dict, previous: dict | None) -> dict:
    """What the `control` record says: enough for a predictor to load and verify the model."""
    return {"model_id": row["id"], "side": row["side"], "artifact_path": row["artifact_path"],
            "sha256": row["sha256"], "schema_version": row["schema_version"], "label_spec_id": row["label_spec_id"],
            "previous": previous["id"] if previous else None, "reason": row["reason"],
            "train_end": row["train_end"],  # epoch ms, exclusive: the model's age (perpflow_model_age_seconds)
            # a walk-forward step's model: used for the bars opening from then on (event time, ms); none live
            **({"valid_from": row["valid_from"]} if row.get("valid_from") is not None else {})}


def metrics_of(row: dict) -> tuple[dict, list[dict]]:
    return json.loads(row["metrics"]), json.loads(row["fold_metrics"])
