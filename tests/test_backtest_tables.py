"""A backtest's names and tables: run-namespaced topics and groups, and `bt_` tables where runs and live rows with
the same event ids do not replace each other (real chDB)."""

from __future__ import annotations

from schemas.catalog import topic
from schemas.tables import arrow_table, columns, create_table_sql, table_columns
from streams.app import APP_ID, app_id_for, catalog_name, create_app, kafka_name


def test_a_prefixed_app_has_its_own_group_and_names_its_topics():
    assert app_id_for("") == APP_ID
    assert app_id_for("bt.r1.") == "perpflow-bt.r1"
    live, run = create_app("127.0.0.1:1"), create_app("127.0.0.1:1", prefix="bt.r1.")
    assert live.conf.id == APP_ID and run.conf.id == "perpflow-bt.r1"  # consumer group and changelog topic stem
    assert kafka_name(live, "md.klines") == "md.klines"
    assert kafka_name(run, "md.klines") == "bt.r1.md.klines"
    assert catalog_name(run, "bt.r1.md.klines") == "md.klines"


def test_backtest_table_has_the_run_first_in_its_key():
    t = topic("signals")
    ddl = create_table_sql(t, backtest=True)
    assert "CREATE TABLE IF NOT EXISTS `bt_signals`" in ddl
    assert "ORDER BY (run_id, symbol, event_id)" in ddl
    assert table_columns(t, backtest=True)[0] == "run_id"
    assert table_columns(t, backtest=True)[1:] == table_columns(t)


def _row(t, value: float) -> tuple:
    rec = {c.name: None for c in columns(t)}
    rec.update({"event_id": "kline:BTCUSDT:5m:0", "event_time": 299_999, "symbol": "BTCUSDT", "interval": "5m",
                "open_time": 0, "close_time": 299_999, "open": value, "high": value, "low": value, "close": value,
                "volume": 1.0, "is_closed": True, "source": "replay"})
    return tuple(rec[c.name] for c in columns(t))


def test_runs_and_live_rows_with_one_event_id_stay_apart(store):
    from schemas.catalog import archived

    t = topic("md.klines")
    store.ensure_tables(archived(), backtest=True)
    store.insert_arrow("md_klines", arrow_table(t, [_row(t, 1.0)], [0], [0]))
    store.insert_arrow("bt_md_klines", arrow_table(t, [_row(t, 2.0)], [0], [0], run_id="r1"))
    store.insert_arrow("bt_md_klines", arrow_table(t, [_row(t, 3.0)], [0], [0], run_id="r2"))
    store.insert_arrow("bt_md_klines", arrow_table(t, [_row(t, 3.0)], [0], [1], run_id="r2"))  # at-least-once
    assert store.query_rows("SELECT close FROM md_klines FINAL") == [(1.0,)]
    assert store.query_rows("SELECT run_id, close FROM bt_md_klines FINAL ORDER BY run_id") == [("r1", 2.0),
                                                                                                ("r2", 3.0)]
