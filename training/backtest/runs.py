"""The `backtest_runs` table: one row per run — its parameters, models, symbols, data window, metrics and where its
report is. Recording a run again (same run id) replaces its row (read with FINAL)."""

from __future__ import annotations

import json
import time

import pyarrow as pa

from connectors.clickhouse_store import Store
from training import tables
from training.backtest import metrics as run_metrics

FIELDS = ("run_id", "created_at", "parameters", "model_ids", "symbols", "data_start", "data_end", "metrics",
          "report_path")
TIMES = ("created_at", "data_start", "data_end")
_TS = pa.timestamp("ms", tz="UTC")
_ARROW = {"model_ids": pa.list_(pa.string()), "symbols": pa.list_(pa.string()), **dict.fromkeys(TIMES, _TS)}


def record(store: Store, run_id: str, *, created_at: int, parameters: dict, model_ids: list[str], symbols: list[str],
           data_start: int, data_end: int, metrics: dict, report_path: str) -> None:
    """Write the run's row (times in UTC ms; `metrics` as `metrics.compute` returns them, stored as metrics.json)."""
    tables.ensure(store, "backtest_runs")
    row = {"run_id": run_id, "created_at": created_at, "parameters": json.dumps(parameters, sort_keys=True),
           "model_ids": list(model_ids), "symbols": list(symbols), "data_start": data_start, "data_end": data_end,
           "metrics": run_metrics.to_json(metrics), "report_path": str(report_path)}
    cols = {f: pa.array([row[f]], type=_ARROW.get(f, pa.string())) for f in FIELDS}
    cols["recorded_at"] = pa.array([int(time.time() * 1000)], type=_TS)
    store.insert_arrow("backtest_runs", pa.table(cols))


def rows(store: Store) -> list[dict]:
    """Every recorded run, oldest first; parameters and metrics parsed."""
    if not tables.exists(store, "backtest_runs"):
        return []
    select = ", ".join(f"toUnixTimestamp64Milli({f})" if f in TIMES else f for f in FIELDS)
    found = store.query_rows(f"SELECT {select} FROM backtest_runs FINAL ORDER BY created_at, run_id")
    out = [dict(zip(FIELDS, r, strict=True)) for r in found]
    for r in out:
        r["parameters"], r["metrics"] = json.loads(r["parameters"]), json.loads(r["metrics"])
    return out
