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
REPLAYED = ("md_klines", "md_markprice", "md_funding", "system.parts", "user_events", "risk_verdicts")  # with rows
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
    training room's too), the two user events and the two verdicts above."""
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
