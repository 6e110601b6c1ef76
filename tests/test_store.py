"""The store's user queries are read-only per query, and that never leaks into perpflow's own writes
(chDB keeps settings in one session per process)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from schemas.catalog import topic
from schemas.tables import arrow_schema
from streams.errors import PerpflowError


def funding_row(i: int) -> pa.Table:
    schema = arrow_schema(topic("md.funding"))
    row = {"event_id": f"f{i}", "event_time": 1_704_067_200_000 + i, "symbol": "BTCUSDT",
           "funding_time": 1_704_067_200_000 + i, "funding_rate": 1e-4, "mark_price": None, "source": "t",
           "kafka_partition": 0, "kafka_offset": i}
    return pa.Table.from_pylist([row], schema=schema)


@pytest.mark.parametrize("sql", [
    "DROP TABLE md_funding",
    "DROP TABLE md_funding -- a trailing comment must not hide the guard",
    "INSERT INTO md_funding (event_id) VALUES ('x')",
    "TRUNCATE TABLE md_funding;",
    "ALTER TABLE md_funding DELETE WHERE 1",
    "CREATE TABLE x (a Int8) ENGINE = Memory",
    "SET readonly = 0",
])
def test_user_queries_cannot_write(store, sql):
    store.insert_arrow("md_funding", funding_row(1))
    with pytest.raises(PerpflowError):
        store.query_text(sql, "tsv")
    assert store.query_rows("SELECT count() FROM md_funding") == [(1,)]


def test_read_only_queries_do_not_stop_later_inserts(store):
    store.insert_arrow("md_funding", funding_row(1))
    assert store.query_text("SELECT count() FROM md_funding", "tsv") == "1\n"
    assert store.query_text("SELECT count() FROM md_funding SETTINGS max_threads = 1", "tsv") == "1\n"
    assert "md_funding" in store.query_text("SHOW TABLES", "tsv").split()
    store.insert_arrow("md_funding", funding_row(2))  # would raise READONLY if the setting leaked
    assert store.query_rows("SELECT count() FROM md_funding") == [(2,)]


def test_sql_names_the_process_that_holds_the_embedded_store(store, home):
    from tests.conftest import run_cli

    result = run_cli(home, "sql", "SELECT 1")  # this test process holds the store, with no API to go through
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and "held by pid" in line and "one process per store" in line


PLACEHOLDER = "CREATE TABLE features (event_id String, event_time DateTime64(3, 'UTC'), symbol String) " \
    "ENGINE = ReplacingMergeTree ORDER BY (symbol, event_id)"


def test_an_empty_table_of_an_older_layout_is_recreated_a_filled_one_refused(store):
    from schemas.tables import table_columns

    layout = "SELECT name FROM system.columns WHERE table = 'features' ORDER BY position"
    store.command("DROP TABLE features")
    store.command(PLACEHOLDER)
    store.ensure_tables([topic("features")])  # empty: recreated with the current layout
    assert [r[0] for r in store.query_rows(layout)] == table_columns(topic("features"))
    store.ensure_tables([topic("features")])  # current layout: left as it is
    assert [r[0] for r in store.query_rows(layout)] == table_columns(topic("features"))
    store.command("DROP TABLE features")
    store.command(PLACEHOLDER)
    store.command("INSERT INTO features VALUES ('a', 0, 'BTCUSDT')")
    with pytest.raises(PerpflowError, match="another layout"):
        store.ensure_tables([topic("features")])
    assert store.query_rows("SELECT count() FROM features") == [(1,)], "a filled table is never dropped"
