"""The Grafana dashboards: the JSON in the repository is what grafana/boards.py builds, and every
ClickHouse panel query runs against the real schema (chDB) after a short replay, its Grafana macros
expanded as the ClickHouse data source expands them, and returns the columns the panel reads."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
import yaml

from grafana.__main__ import OUT, render
from grafana.boards import DASHBOARDS
from grafana.model import CLICKHOUSE, PROMETHEUS, SqlQuery
from tests.conftest import ROOT, SAMPLE, run_cli

FROM, TO = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC)
INTERVAL_S = 300
REPLAYED = ("md_klines", "md_markprice", "md_funding", "system.parts", "user_events", "risk_verdicts", "predictions",
            "models", "backtest_runs")  # tables with rows
NOON_MS = int(FROM.timestamp() * 1000) + 12 * 3_600_000
# Until the paper exchange writes user.events, two events in Binance's user-data shapes stand for it:
# a fill with its realized profit and fee, and a funding payment.
USER_EVENTS = (
    {"event_id": "fill-1", "event_type": "ORDER_TRADE_UPDATE", "execution_type": "TRADE", "side": "SELL",
     "order_status": "FILLED", "client_order_id": "pf-1", "last_filled_qty": 0.01, "last_filled_price": 42_000.0,
     "commission_asset": "USDT", "commission": 0.4, "realized_profit": 12.5},
    {"event_id": "funding-1", "event_type": "ACCOUNT_UPDATE", "reason": "FUNDING_FEE",
     "balances": [{"asset": "USDT", "wallet_balance": 1000.0, "cross_wallet_balance": 1000.0,
                   "balance_change": -0.3}]},
)


def write_user_events(store) -> None:
    from schemas.catalog import topic
    from schemas.tables import arrow_table, columns, to_json_if_nested

    t = topic("user.events")
    rows = []
    for event in USER_EVENTS:
        record = {"event_time": NOON_MS, "symbol": "BTCUSDT", "source": "test", "balances": [], "positions": [],
                  **event}
        rows.append(tuple(to_json_if_nested(record.get(c.name)) if c.nested else record.get(c.name)
                          for c in columns(t)))
    store.insert_arrow(t.table, arrow_table(t, rows, [-1] * len(rows), [-1] * len(rows)))


# a rejection that violates two rules, and an approved FLAT signal's verdict
VERDICTS = (
    {"event_id": "verdict-1", "verdict": "REJECTED", "decision": "LONG", "violations": ["margin_usage", "fat_finger"]},
    {"event_id": "verdict-2", "verdict": "APPROVED", "decision": "FLAT", "violations": []},
)


def write_verdicts(store) -> None:
    from schemas.catalog import topic
    from schemas.tables import arrow_table, columns, to_json_if_nested

    t = topic("risk.verdicts")
    rows = []
    for v in VERDICTS:
        record = {"event_time": NOON_MS, "open_time": NOON_MS - 300_000, "symbol": "BTCUSDT", "source": "test",
                  "interval": "5m", "signal_id": "", "action": "NONE", "intent_id": None, "trading_state": "RUNNING",
                  "equity": 1000.0, "margin_usage": 0.1, "daily_pnl_ratio": 0.0, "drawdown_ratio": 0.0,
                  "detail": "{}", **v}
        rows.append(tuple(to_json_if_nested(record.get(c.name)) if c.nested else record.get(c.name)
                          for c in columns(t)))
    store.insert_arrow(t.table, arrow_table(t, rows, [-1] * len(rows), [-1] * len(rows)))


# a long model, two of its predictions (P(TP) 0.62 and 0.66) and their labels under its spec (TP, then SL), and a
# backtest run: what the Models dashboard's registry, reliability, top-features and backtest panels read
MODEL_ID, SPEC_ID = "long-20240101T000000-abcdef12", "spec-1"


def write_model_records(store) -> None:
    import pyarrow as pa

    from schemas.catalog import topic
    from schemas.tables import arrow_schema
    from training import registry
    from training.backtest import runs

    day = int(FROM.timestamp() * 1000)
    registry.write(store, {"id": MODEL_ID, "side": "long", "created_at": day, "schema_version": 1,
                           "label_spec_id": SPEC_ID, "label_spec": "{}", "train_start": day - 86_400_000,
                           "train_end": day, "symbols": ["BTCUSDT"], "fold_metrics": "[]",
                           "metrics": '{"auc": 0.61, "brier": 0.2, "ece": 0.02}', "artifact_path": "/m",
                           "sha256": "00", "status": registry.PROMOTED, "promoted_at": day, "actor": "test",
                           "reason": ""})
    opens = (NOON_MS - 300_000, NOON_MS)
    predictions = [{"event_id": f"p{i}", "event_time": t + 300_000, "symbol": "BTCUSDT", "source": "test",
                    "interval": "5m", "open_time": t, "close": 42_000.0, "k_tp": 2.0, "k_sl": 1.0,
                    "model_id_long": MODEL_ID, "p_tp_long": p, "p_sl_long": 0.2, "p_timeout_long": 0.8 - p,
                    "hold_bars_long": 10.0, "mae_long": -0.01, "model_id_short": "", "p_tp_short": 0.0,
                    "p_sl_short": 0.0, "p_timeout_short": 0.0, "hold_bars_short": 0.0, "mae_short": 0.0,
                    "top_features_long": '[{"feature":"rsi_14","value":0.3},{"feature":"vol_z","value":-0.1}]',
                    "top_features_short": "[]", "kafka_partition": -1, "kafka_offset": -1}
                   for i, (t, p) in enumerate(zip(opens, (0.62, 0.66), strict=True))]
    store.insert_arrow("predictions", pa.Table.from_pylist(predictions, schema=arrow_schema(topic("predictions"))))
    ts = pa.timestamp("ms", tz="UTC")
    store.insert_arrow("labels", pa.table({
        "spec_id": [SPEC_ID] * 2, "side": ["long"] * 2, "symbol": ["BTCUSDT"] * 2,
        "open_time": pa.array(list(opens), type=ts), "outcome": ["TP", "SL"],
        **{c: [0.0] * 2 for c in ("entry_price", "exit_price", "gross_return", "fee", "slippage", "funding",
                                  "net_return", "mae", "mfe")},
        **{c: pa.array([1, 1], type=pa.int32()) for c in ("bars_held", "minutes_to_event", "settlements")}}))
    runs.record(store, "run-1", created_at=day, parameters={}, model_ids=[MODEL_ID], symbols=["BTCUSDT"],
                data_start=day, data_end=day + 86_400_000, metrics={"trades": 3, "net_pnl": 1.5}, report_path="/r")


def expand_macros(sql: str, start: datetime = FROM, end: datetime = TO, interval_s: int = INTERVAL_S) -> str:
    """The grafana-clickhouse-datasource macros perpflow's panels use, with concrete values."""
    f, t = int(start.timestamp()), int(end.timestamp())
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", rf"\1 >= toDateTime({f}) AND \1 <= toDateTime({t})", sql)
    sql = re.sub(r"\$__timeInterval\(([^)]+)\)", rf"toStartOfInterval(toDateTime(\1), INTERVAL {interval_s} second)",
                 sql)
    sql = sql.replace("$__fromTime", f"toDateTime({f})").replace("$__toTime", f"toDateTime({t})")
    assert "$" not in sql, f"a macro the tests do not expand: {sql}"
    return sql


def sql_panels():
    return [pytest.param(q, id=f"{d.uid}/{p.title}/{i}") for d in DASHBOARDS for p in d.panels()
            for i, q in enumerate(p.queries) if isinstance(q, SqlQuery)]


@pytest.mark.parametrize("board", DASHBOARDS, ids=lambda d: d.uid)
def test_dashboard_json_is_what_the_code_builds(board):
    path = OUT / f"{board.uid}.json"
    assert path.exists() and path.read_text() == render(board), f"{path} is stale: run `python -m grafana`"


def test_no_stray_dashboard_files():
    assert {p.name for p in OUT.glob("*.json")} == {f"{d.uid}.json" for d in DASHBOARDS}


def test_panels_have_unique_ids_and_fit_the_grid():
    for board in DASHBOARDS:
        panels = board.to_json()["panels"]
        assert len({p["id"] for p in panels}) == len(panels)
        assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)
        assert json.loads(json.dumps(board.to_json())) == board.to_json()


def test_provisioning_serves_what_the_dashboards_use():
    provisioning = ROOT / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "perpflow.yml").read_text())["datasources"]
    assert {(d["type"], d["uid"]) for d in sources} == {(s["type"], s["uid"]) for s in (PROMETHEUS, CLICKHOUSE)}
    provider = yaml.safe_load((provisioning / "dashboards" / "perpflow.yml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in compose
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in compose


@pytest.fixture(scope="module")
def replayed_store(tmp_path_factory):
    """One day of BTCUSDT replayed through the real broker into a real chDB store, every table created (the
    training room's too), the two user events, the two verdicts and the model's records above."""
    from connectors.clickhouse_store import Store
    from schemas.catalog import archived
    from streams.settings import Settings

    home = tmp_path_factory.mktemp("dashboards") / "home"
    result = run_cli(home, "up", "--source", "replay", "--data", str(SAMPLE), "--symbols", "BTCUSDT",
                     "--start", FROM.date().isoformat(), "--end", TO.date().isoformat(), "--speed", "max",
                     "--until-drained", PERPFLOW_RUN_WORKER="false")
    assert result.returncode == 0, result.stderr
    store = Store(Settings(home=home, clickhouse_url=""))
    from training import tables

    store.ensure_tables(archived())
    tables.ensure(store, *tables.DDL)  # models, labels, backtest_runs: what the Models dashboard reads
    write_user_events(store)
    write_verdicts(store)
    write_model_records(store)
    yield store
    store.close()


@pytest.mark.e2e
@pytest.mark.parametrize("query", sql_panels())
def test_clickhouse_panel_query_runs_on_the_real_schema(replayed_store, query):
    sql = expand_macros(query.sql)
    result = replayed_store.client.query(sql)
    # DESCRIBE names the result columns even when there are no rows (tables the decision chain fills)
    described = replayed_store.query_rows(f"DESCRIBE ({sql})")
    assert tuple(name for name, *_ in described) == query.columns
    if query.time_series:
        assert query.columns[0] == "time" and described[0][1].startswith("DateTime")
    if any(t in query.sql for t in REPLAYED):
        assert result.result_rows, "the replayed day shows in the panel"


@pytest.mark.e2e
def test_pnl_split_adds_up_fills_fees_and_funding(replayed_store):
    query = next(q for d in DASHBOARDS for p in d.panels() if p.title == "PnL split: gross, fees, funding"
                 for q in p.queries)
    rows = replayed_store.query_rows(expand_macros(query.sql))
    assert [tuple(r[1:]) for r in rows] == [(12.5, -0.4, -0.3)]


@pytest.mark.e2e
def test_rejections_count_once_per_violated_rule(replayed_store):
    query = next(q for d in DASHBOARDS for p in d.panels() if p.title == "Rejections by violated rule"
                 for q in p.queries)
    rows = replayed_store.query_rows(expand_macros(query.sql))
    assert sorted((r[1], r[2]) for r in rows) == [("fat_finger", 1), ("margin_usage", 1)]


def panel_rows(store, title: str) -> list[tuple]:
    query = next(q for d in DASHBOARDS for p in d.panels() if p.title == title for q in p.queries)
    return store.query_rows(expand_macros(query.sql))


@pytest.mark.e2e
def test_reliability_pairs_predictions_with_their_labels(replayed_store):
    rows = panel_rows(replayed_store, "Reliability: predicted P(TP) vs realized TP rate (labels)")
    assert [(r[0], r[1], round(r[2], 6), r[3], r[4]) for r in rows] == [("long", 0.6, 0.64, 0.5, 2)]


@pytest.mark.e2e
def test_top_features_and_backtest_runs_read_their_json(replayed_store):
    rows = panel_rows(replayed_store, "Features that moved P(TP) most")
    assert [(r[0], r[1], r[2]) for r in rows] == [("long", "rsi_14", 2), ("long", "vol_z", 2)]
    (run,) = panel_rows(replayed_store, "Backtest runs")
    assert (run[0], run[2], run[6], run[7]) == ("run-1", MODEL_ID, 3, 1.5)
