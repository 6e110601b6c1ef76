"""ClickHouse archive tables derived from the topic catalog and the Avro schemas.

One table per archived topic (`md.klines` → `md_klines`): the record's fields, then where the
row came from (partition, offset) and when it was archived. ReplacingMergeTree sorted by a key
that ends in `event_id`, so replaying the same events leaves the same rows (read with FINAL).
Nested values (arrays, maps, records) are stored as JSON strings.

Backtests archive into tables of their own, `bt_<table>`, with a `run_id` column first in the sort key: a run
replays bars whose event ids are the live ones (and its outputs have the live event ids too), so in the live tables
they would replace live rows; with the run id in the key, runs and live rows never deduplicate into each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from schemas.catalog import Topic
from schemas.codec import default_codec

_PRIMITIVE = {
    "string": ("String", pa.string()),
    "double": ("Float64", pa.float64()),
    "float": ("Float32", pa.float32()),
    "long": ("Int64", pa.int64()),
    "int": ("Int32", pa.int32()),
    "boolean": ("Bool", pa.bool_()),
    "bytes": ("String", pa.binary()),
}
_TIMESTAMP = ("DateTime64(3, 'UTC')", pa.timestamp("ms", tz="UTC"))
_JSON = ("String", pa.string())

SOURCE_COLUMNS = (
    ("kafka_partition", "Int32", pa.int32()),
    ("kafka_offset", "Int64", pa.int64()),
)


@dataclass(frozen=True)
class Column:
    name: str
    ch_type: str
    arrow_type: pa.DataType
    nested: bool = False  # stored as a JSON string


def _column(name: str, avro_type) -> Column:
    nullable = False
    if isinstance(avro_type, list):
        branches = [b for b in avro_type if b != "null"]
        if len(branches) != 1:
            raise ValueError(f"{name}: only [null, T] unions map to a column, got {avro_type}")
        nullable, avro_type = len(branches) != len(avro_type), branches[0]
    nested = False
    if isinstance(avro_type, dict) and avro_type.get("logicalType") == "timestamp-millis":
        ch, arrow = _TIMESTAMP
    elif isinstance(avro_type, dict) and avro_type.get("type") in _PRIMITIVE:
        ch, arrow = _PRIMITIVE[avro_type["type"]]
    elif isinstance(avro_type, str) and avro_type in _PRIMITIVE:
        ch, arrow = _PRIMITIVE[avro_type]
    else:
        (ch, arrow), nested = _JSON, True
    return Column(name, f"Nullable({ch})" if nullable else ch, arrow, nested)


def columns(topic: Topic) -> list[Column]:
    schema = default_codec().schema(topic.schema)
    return [_column(f["name"], f["type"]) for f in schema["fields"]]


BACKTEST_TABLE_PREFIX = "bt_"
RUN_COLUMN = ("run_id", "LowCardinality(String)", pa.string())


def table_name(topic: Topic, backtest: bool = False) -> str:
    return BACKTEST_TABLE_PREFIX + topic.table if backtest else topic.table


def arrow_schema(topic: Topic, backtest: bool = False) -> pa.Schema:
    cols = [pa.field(RUN_COLUMN[0], RUN_COLUMN[2])] if backtest else []
    cols += [pa.field(c.name, c.arrow_type) for c in columns(topic)]
    cols += [pa.field(name, arrow) for name, _, arrow in SOURCE_COLUMNS]
    return pa.schema(cols)


def arrow_table(topic: Topic, rows: list[tuple], partitions: list[int], offsets: list[int],
                run_id: str | None = None) -> pa.Table:
    """The insert for `topic`'s table: `rows` hold the record's fields in `columns(topic)` order (nested values
    already JSON), `partitions`/`offsets` say where each came from (-1 when not from Kafka). With `run_id`: the
    insert for its backtest table."""
    schema = arrow_schema(topic, run_id is not None)
    cols = [*zip(*rows, strict=True), partitions, offsets] if rows else [[] for _ in columns(topic)] + [[], []]
    if run_id is not None:
        cols.insert(0, [run_id] * len(partitions))
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, schema, strict=True)], schema=schema)


_ARCHIVED_AT = ("archived_at", "DateTime64(3, 'UTC') DEFAULT now64(3)")


def table_columns(topic: Topic, backtest: bool = False) -> list[str]:
    """The column names of the topic's table (or its backtest table), in order."""
    return ([RUN_COLUMN[0]] * backtest + [c.name for c in columns(topic)] + [name for name, _, _ in SOURCE_COLUMNS]
            + [_ARCHIVED_AT[0]])


def create_table_sql(topic: Topic, backtest: bool = False) -> str:
    """DDL in the client's current database (the DSN's, e.g. http://…:8123/perpflow)."""
    cols = [f"`{RUN_COLUMN[0]}` {RUN_COLUMN[1]}"] * backtest + [f"`{c.name}` {c.ch_type}" for c in columns(topic)]
    cols += [f"`{name}` {ch}" for name, ch, _ in SOURCE_COLUMNS]
    cols.append(f"`{_ARCHIVED_AT[0]}` {_ARCHIVED_AT[1]}")
    return (
        f"CREATE TABLE IF NOT EXISTS `{table_name(topic, backtest)}` (\n  "
        + ",\n  ".join(cols)
        + "\n) ENGINE = ReplacingMergeTree\n"
        f"PARTITION BY toYYYYMM(event_time)\nORDER BY ({', '.join(('run_id',) * backtest + topic.order_by)})"
    )


def select_fields(topic: Topic) -> str:
    """The SELECT list that reads a table's rows back as the topic's records (field order; times in epoch ms, as
    the codec takes them; nested fields stay JSON text)."""
    return ", ".join(f"toUnixTimestamp64Milli(`{c.name}`)" if "DateTime64" in c.ch_type else f"`{c.name}`"
                     for c in columns(topic))


def to_json_if_nested(value) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), default=_bytes_hex)


def _bytes_hex(value):
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(type(value).__name__)
