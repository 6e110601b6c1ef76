"""The ClickHouse tables of the training room: `label_specs`, `labels`, `models`, `model_artifacts` and
`backtest_runs`.

They are not topics (nothing streams them), so their DDL lives here rather than being derived from an Avro
schema. All are ReplacingMergeTrees versioned by a time column: writing a row again with the same key replaces it
(read with FINAL) — labeling a window again, or a model row whose status changed.
"""

from __future__ import annotations

from connectors.clickhouse_store import Store

DDL = {
    "label_specs": """CREATE TABLE IF NOT EXISTS label_specs (
  spec_id String, spec String, created_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = ReplacingMergeTree(created_at) ORDER BY spec_id""",
    "labels": """CREATE TABLE IF NOT EXISTS labels (
  spec_id LowCardinality(String), side LowCardinality(String), symbol LowCardinality(String),
  open_time DateTime64(3, 'UTC'), outcome LowCardinality(String),
  entry_price Float64, exit_price Float64, gross_return Float64, fee Float64, slippage Float64, funding Float64,
  net_return Float64, mae Float64, mfe Float64, bars_held Int32, minutes_to_event Int32, settlements Int32,
  labeled_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = ReplacingMergeTree(labeled_at) PARTITION BY toYYYYMM(open_time)
ORDER BY (spec_id, side, symbol, open_time)""",
    "models": """CREATE TABLE IF NOT EXISTS models (
  id String, side LowCardinality(String), created_at DateTime64(3, 'UTC'), schema_version Int32,
  label_spec_id String, label_spec String, train_start DateTime64(3, 'UTC'), train_end DateTime64(3, 'UTC'),
  symbols Array(String), fold_metrics String, metrics String, artifact_path String, sha256 String,
  status LowCardinality(String), promoted_at Nullable(DateTime64(3, 'UTC')), actor String, reason String,
  updated_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(updated_at) ORDER BY id""",
    # the artifacts' files, content-addressed (training.artifact): how a model reaches a worker of another home
    "model_artifacts": """CREATE TABLE IF NOT EXISTS model_artifacts (
  sha256 String, file LowCardinality(String), body String, size UInt64, stored_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(stored_at) ORDER BY (sha256, file)""",
    # one row per backtest run; parameters and metrics are the run's JSON documents (metrics.json as written)
    "backtest_runs": """CREATE TABLE IF NOT EXISTS backtest_runs (
  run_id String, created_at DateTime64(3, 'UTC'), parameters String, model_ids Array(String), symbols Array(String),
  data_start DateTime64(3, 'UTC'), data_end DateTime64(3, 'UTC'), metrics String, report_path String,
  recorded_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(recorded_at) ORDER BY run_id""",
}


def ensure(store: Store, *names: str) -> None:
    for name in names:
        store.command(DDL[name])


def exists(store: Store, name: str) -> bool:
    return bool(store.query_rows("SELECT count() FROM system.tables WHERE database = currentDatabase() "
                                 f"AND name = '{name}'")[0][0])
