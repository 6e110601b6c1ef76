"""The three perpflow dashboards: topic health, trading, models. `python -m grafana` writes their JSON
to grafana/dashboards/, which Grafana provisions; tests check the files equal what this module builds.

Metric names come from streams/metrics.py; the decision-chain ones (DECISION_CHAIN_METRICS there) are not
exported yet, so those panels stay empty until the agents land. ClickHouse tables are the archive tables of
schemas/tables.py (topic name with `.` → `_`)."""

from __future__ import annotations

from grafana.model import Dashboard, Panel, PromQuery, Row, SqlQuery

RATE = "$__rate_interval"


def _by_symbol_over_time(table: str, value: str) -> SqlQuery:
    """Records per symbol and time bucket of an archive table."""
    return SqlQuery(f"SELECT $__timeInterval(event_time) AS time, symbol, count() AS {value}\n"
                    f"FROM {table} FINAL WHERE $__timeFilter(event_time)\nGROUP BY time, symbol ORDER BY time",
                    ("time", "symbol", value), time_series=True)


def _quantiles(metric: str) -> tuple[PromQuery, ...]:
    """p50 and p99 of a histogram."""
    return tuple(PromQuery(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[{RATE}])))", f"p{int(q * 100)}")
                 for q in (0.5, 0.99))


TOPIC_HEALTH = Dashboard(
    uid="perpflow-topic-health",
    title="perpflow / Topic health",
    description="Produce and consume rates, consumer lag, event-time lag, dead letters, ClickHouse sink.",
    time_from="now-1h",
    rows=(
        Row("Throughput", (
            Panel("Produced messages/s by topic", (PromQuery(
                f"sum by (topic) (rate(perpflow_messages_produced_total[{RATE}]))", "{{topic}}"),), unit="mps",
                description="Counted by the producing perpflow process (replay, connectors, agents)."),
            Panel("Topic growth, messages/s (broker end offsets)", (PromQuery(
                "sum by (topic) (perpflow_topic_messages_per_second)", "{{topic}}"),), unit="mps",
                description="From the partitions' high-watermarks over the last minute: counts every producer."),
            Panel("Consumed messages/s by group and topic", (PromQuery(
                f"sum by (group, topic) (rate(perpflow_messages_consumed_total[{RATE}]))", "{{group}} {{topic}}"),),
                unit="mps"),
            Panel("Consumed bytes/s by group", (PromQuery(
                f"sum by (group) (rate(perpflow_bytes_consumed_total[{RATE}]))", "{{group}}"),), unit="Bps"),
        )),
        Row("Lag", (
            Panel("Consumer lag by group and partition (fetch high-watermark)", (PromQuery(
                "sum by (group, topic, partition) (perpflow_consumer_lag)", "{{group}} {{topic}}/{{partition}}"),)),
            Panel("Committed lag by group and topic", (PromQuery(
                "sum by (group, topic) (perpflow_group_lag)", "{{group}} {{topic}}"),),
                description="End offset minus the group's committed offset, from the topic-health sampler."),
            Panel("Event-time lag by group and topic", (PromQuery(
                "max by (group, topic) (perpflow_event_time_lag_seconds)", "{{group}} {{topic}}"),), unit="s",
                description="Wall clock minus the newest event time consumed; a replay of history shows its age."),
            Panel("Archive delay p99 (archived_at - event_time), md.klines", (SqlQuery(
                "SELECT $__timeInterval(event_time) AS time,\n"
                "  quantile(0.99)(dateDiff('millisecond', event_time, archived_at)) / 1000 AS archive_delay_p99\n"
                "FROM md_klines WHERE $__timeFilter(event_time) GROUP BY time ORDER BY time",
                ("time", "archive_delay_p99"), time_series=True),), unit="s"),
        )),
        Row("ClickHouse sink", (
            Panel("Rows archived/s by table", (PromQuery(
                f"sum by (table) (rate(perpflow_sink_rows_total[{RATE}]))", "{{table}}"),), unit="rowsps"),
            Panel("Insert latency", _quantiles("perpflow_sink_insert_seconds"), unit="s"),
            Panel("Insert failures (retried) by table", (PromQuery(
                "sum by (table) (increase(perpflow_sink_insert_failures_total[5m]))", "{{table}}"),)),
            Panel("Batches committed/s", (PromQuery(
                f"sum(rate(perpflow_sink_batches_total[{RATE}]))", "batches"),), unit="ops"),
            Panel("Rows stored by table", (SqlQuery(
                "SELECT table, sum(rows) AS rows, sum(bytes_on_disk) AS bytes\nFROM system.parts\n"
                "WHERE active AND database = currentDatabase()\nGROUP BY table ORDER BY table",
                ("table", "rows", "bytes")),), kind="table",
                description="Active parts, before ReplacingMergeTree merges drop duplicates."),
            Panel("Closed bars archived per symbol", (_by_symbol_over_time("md_klines", "bars"),)),
        )),
        Row("Features agent", (
            Panel("features records/s by symbol", (PromQuery(
                f"sum by (symbol) (rate(perpflow_features_emitted_total[{RATE}]))", "{{symbol}}"),), unit="ops"),
            Panel("Bars held for their context", (PromQuery(
                "max by (symbol) (perpflow_features_held_bars)", "{{symbol}}"),),
                description="Bars waiting until nothing stamped before their close can still arrive (marks, "
                            "funding, open interest, BTC's snapshot). Growing = a context feed is behind."),
            Panel("Dropped, missing and BTC-less bars (1 h)", (
                PromQuery("sum by (symbol) (increase(perpflow_features_dropped_bars_total[1h]))",
                          "{{symbol}} duplicate/out of order"),
                PromQuery("sum by (symbol) (increase(perpflow_features_gap_bars_total[1h]))", "{{symbol}} missing"),
                PromQuery("sum by (symbol) (increase(perpflow_features_btc_timeouts_total[1h]))",
                          "{{symbol}} without BTC")),),
            Panel("Age of the newest features record", (PromQuery(
                "time() - max by (symbol) (perpflow_features_last_close_seconds)", "{{symbol}}"),), unit="s",
                description="Wall clock minus the close of the newest bar the agent emitted; a replay shows its age."),
        )),
        Row("Dead letters and connections", (
            Panel("Dead letters by source topic and reason", (PromQuery(
                "sum by (source_topic, reason) (increase(perpflow_dead_letters_total[5m]))",
                "{{source_topic}} {{reason}}"),)),
            Panel("Newest dead letters", (SqlQuery(
                "SELECT event_time, source_topic, reason, error\nFROM deadletter FINAL\n"
                "WHERE $__timeFilter(event_time)\nORDER BY event_time DESC LIMIT 100",
                ("event_time", "source_topic", "reason", "error")),), kind="table"),
            Panel("Newest closed bar per symbol", (SqlQuery(
                "SELECT symbol, max(close_time) AS last_close, dateDiff('second', max(close_time), now64(3)) AS age_s\n"
                "FROM md_klines WHERE $__timeFilter(event_time)\nGROUP BY symbol ORDER BY symbol",
                ("symbol", "last_close", "age_s")),), kind="table"),
            Panel("Connector reconnects (1 h) and connection state", (
                PromQuery("sum by (connector) (increase(perpflow_connector_reconnects_total[1h]))",
                          "{{connector}} reconnects"),
                PromQuery("min by (connector) (perpflow_connector_connected)", "{{connector}} connected")),),
            Panel("Scrape targets up", (PromQuery('up{job=~"perpflow.*"}', "{{job}} {{instance}}"),), kind="stat"),
        )),
    ),
)

# user.events in Binance user-data shapes: fills are ORDER_TRADE_UPDATE with execution type TRADE, funding
# is an ACCOUNT_UPDATE with reason FUNDING_FEE whose balance changes carry the amount (USDT-margined).
_FUNDING = ("arraySum(arrayMap(b -> JSONExtractFloat(b, 'balance_change'), JSONExtractArrayRaw(balances)))")

TRADING = Dashboard(
    uid="perpflow-trading",
    title="perpflow / Trading",
    description="Equity and drawdown, positions, PnL split, signals, risk verdicts, orders and fills.",
    rows=(
        Row("Account", (
            Panel("Trading state", (PromQuery("max by (state) (perpflow_trading_state) == 1", "{{state}}"),),
                  kind="stat", width=6),
            Panel("Today's PnL vs the daily-loss limit", (
                PromQuery("perpflow_daily_pnl_ratio", "today's PnL / equity"),
                PromQuery("-perpflow_daily_loss_limit_ratio", "loss limit")), unit="percentunit", width=6),
            Panel("Equity", (PromQuery("perpflow_account_equity_usdt", "equity"),), unit="currencyUSD", width=6),
            Panel("Drawdown from peak", (PromQuery("perpflow_account_drawdown_ratio", "drawdown"),),
                  unit="percentunit", width=6),
            Panel("PnL split: gross, fees, funding", (SqlQuery(
                "SELECT $__timeInterval(event_time) AS time,\n"
                "  sumIf(realized_profit, event_type = 'ORDER_TRADE_UPDATE') AS gross,\n"
                "  -sumIf(commission, event_type = 'ORDER_TRADE_UPDATE') AS fees,\n"
                f"  sumIf({_FUNDING}, event_type = 'ACCOUNT_UPDATE' AND reason = 'FUNDING_FEE') AS funding\n"
                "FROM user_events FINAL WHERE $__timeFilter(event_time)\nGROUP BY time ORDER BY time",
                ("time", "gross", "fees", "funding"), time_series=True),), unit="currencyUSD"),
            Panel("Open positions: liquidation distance", (PromQuery(
                "perpflow_position_liq_distance_atr", "{{symbol}} {{side}}"),), kind="bargauge", unit="none",
                description="In ATRs; the risk monitor force-closes below 2."),
            Panel("Positions without SL and TP", (PromQuery("sum(perpflow_position_unprotected)", "unprotected"),),
                  kind="stat", width=6),
        )),
        Row("Decisions", (
            Panel("Signals by decision (1 h)", (PromQuery(
                "sum by (decision) (increase(perpflow_signals_total[1h]))", "{{decision}}"),)),
            Panel("EV distribution of signals (1 h)", (PromQuery(
                "sum by (le) (increase(perpflow_signal_ev_bucket[1h]))", "{{le}}", heatmap=True),), kind="bargauge"),
            Panel("Risk verdicts by verdict and reason (1 h)", (PromQuery(
                "sum by (verdict, reason) (increase(perpflow_risk_verdicts_total[1h]))", "{{verdict}} {{reason}}"),)),
            Panel("End-to-end latency, kline to order", _quantiles("perpflow_e2e_latency_seconds"), unit="s"),
            Panel("Chain balance per symbol: signals, verdicts, orders", (SqlQuery(
                "SELECT symbol, countIf(kind = 'signal') AS signals, countIf(kind = 'verdict') AS verdicts,\n"
                "  countIf(kind = 'order') AS orders\nFROM (\n"
                "  SELECT symbol, 'signal' AS kind FROM signals FINAL WHERE $__timeFilter(event_time)\n"
                "  UNION ALL SELECT symbol, 'verdict' FROM risk_verdicts FINAL WHERE $__timeFilter(event_time)\n"
                "  UNION ALL SELECT symbol, 'order' FROM orders FINAL WHERE $__timeFilter(event_time))\n"
                "GROUP BY symbol ORDER BY symbol", ("symbol", "signals", "verdicts", "orders")),), kind="table",
                description="Every signal gets exactly one verdict: the first two columns must be equal."),
            Panel("Signals per symbol", (_by_symbol_over_time("signals", "signals"),)),
        )),
        Row("Orders, fills, risk events", (
            Panel("Orders per symbol", (_by_symbol_over_time("orders", "orders"),)),
            Panel("Order updates by status", (SqlQuery(
                "SELECT $__timeInterval(event_time) AS time, order_status, count() AS updates\n"
                "FROM user_events FINAL\nWHERE $__timeFilter(event_time) AND event_type = 'ORDER_TRADE_UPDATE'\n"
                "GROUP BY time, order_status ORDER BY time", ("time", "order_status", "updates"),
                time_series=True),)),
            Panel("Newest fills", (SqlQuery(
                "SELECT event_time, symbol, side, last_filled_qty AS qty, last_filled_price AS price, commission,\n"
                "  realized_profit, client_order_id\nFROM user_events FINAL\n"
                "WHERE $__timeFilter(event_time) AND execution_type = 'TRADE'\nORDER BY event_time DESC LIMIT 100",
                ("event_time", "symbol", "side", "qty", "price", "commission", "realized_profit", "client_order_id")),),
                kind="table", width=24),
            Panel("Risk events per symbol", (_by_symbol_over_time("risk_events", "events"),)),
            Panel("Newest risk events", (SqlQuery(
                "SELECT event_time, symbol, source\nFROM risk_events FINAL\nWHERE $__timeFilter(event_time)\n"
                "ORDER BY event_time DESC LIMIT 100", ("event_time", "symbol", "source")),), kind="table"),
        )),
    ),
)

# Inputs whose drift the Models dashboard follows: a volatility, a momentum, a volume, a funding and a cross-
# asset feature (names from streams/features/registry.py, columns of the features table).
DRIFT_FEATURES = ("atr_pct", "rsi_14", "vol_z", "funding_rate", "btc_corr_60")

MODELS = Dashboard(
    uid="perpflow-models",
    title="perpflow / Models",
    description="Promoted models, predictions, live calibration and feature drift.",
    time_from="now-7d",
    rows=(
        Row("Promoted models", (
            Panel("Promoted model per side", (PromQuery("max by (side, model_id) (perpflow_model_info) == 1",
                                                        "{{side}} {{model_id}}"),), kind="table"),
            Panel("Model age", (PromQuery("perpflow_model_age_seconds", "{{side}}"),), kind="stat", unit="s"),
            Panel("Live calibration error |mean P(TP) - realized TP rate|", (PromQuery(
                "perpflow_model_calibration_error", "{{side}}"),), unit="percentunit"),
            Panel("Predicted P(TP) distribution (1 h)", (PromQuery(
                "sum by (le) (increase(perpflow_prediction_p_tp_bucket[1h]))", "{{le}}", heatmap=True),),
                kind="bargauge"),
        )),
        Row("Predictions and features", (
            Panel("Predictions per symbol", (_by_symbol_over_time("predictions", "predictions"),)),
            Panel("Feature rows per symbol", (_by_symbol_over_time("features", "rows"),)),
            Panel("Feature drift: daily mean of key inputs (ready rows)", (SqlQuery(
                "SELECT toStartOfDay(event_time) AS time, "
                + ", ".join(f"avg({f}) AS {f}" for f in DRIFT_FEATURES)
                + "\nFROM features FINAL\nWHERE $__timeFilter(event_time) AND ready\nGROUP BY time ORDER BY time",
                ("time", *DRIFT_FEATURES), time_series=True),), width=24),
        )),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (TOPIC_HEALTH, TRADING, MODELS)
