"""The three perpflow dashboards: topic health, trading, models. `python -m grafana` writes their JSON
to grafana/dashboards/, which Grafana provisions; tests check the files equal what this module builds.

Metric names come from streams/metrics.py. ClickHouse tables are the archive tables of schemas/tables.py (topic
name with `.` → `_`) and the training room's tables of training/tables.py (models, labels, backtest_runs)."""

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
# is an ACCOUNT_UPDATE with reason FUNDING_FEE whose balance changes carry the amount (USDT-margined; the nested
# `balances` is a JSON string column).
_FUNDING = ("arraySum(arrayMap(b -> JSONExtractFloat(b, 'balance_change'), JSONExtractArrayRaw(balances)))")
_FILLS = "event_type = 'ORDER_TRADE_UPDATE' AND execution_type = 'TRADE'"


def _counted_over_time(table: str, label: str, value: str, where: str = "") -> SqlQuery:
    """Records per time bucket and `label` of a table: a column, or `expression AS name`."""
    expr, name = label, label.split(" AS ")[-1]
    return SqlQuery(f"SELECT $__timeInterval(event_time) AS time, {expr}, count() AS {value}\n"
                    f"FROM {table} FINAL WHERE $__timeFilter(event_time){where}\n"
                    f"GROUP BY time, {name} ORDER BY time", ("time", name, value), time_series=True)


# a rejection lists every rule it violates: one row per (verdict, violated rule)
_REJECTIONS = SqlQuery(
    "SELECT $__timeInterval(event_time) AS time, arrayJoin(JSONExtract(violations, 'Array(String)')) AS reason,\n"
    "  count() AS rejections\nFROM risk_verdicts FINAL\n"
    "WHERE $__timeFilter(event_time) AND verdict = 'REJECTED'\nGROUP BY time, reason ORDER BY time",
    ("time", "reason", "rejections"), time_series=True)

TRADING = Dashboard(
    uid="perpflow-trading",
    title="perpflow / Trading",
    description="Equity and drawdown, positions, PnL split, signals, risk verdicts, orders and fills, risk events.",
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
            Panel("Trading state at the verdicts (event time)", (_counted_over_time(
                "risk_verdicts", "trading_state", "verdicts"),),
                description="RUNNING, REDUCE_ONLY or HALTED when each signal was judged."),
            Panel("Equity at the verdicts (event time)", (SqlQuery(
                "SELECT $__timeInterval(event_time) AS time, argMax(equity, event_time) AS equity_usdt\n"
                "FROM risk_verdicts FINAL WHERE $__timeFilter(event_time) AND equity > 0\n"
                "GROUP BY time ORDER BY time", ("time", "equity_usdt"), time_series=True),), unit="currencyUSD",
                description="The equity the risk guard saw at each verdict: the account's history in event time, "
                            "a replay included (the gauges above show only the present)."),
            Panel("Drawdown and today's PnL at the verdicts (event time)", (SqlQuery(
                "SELECT $__timeInterval(event_time) AS time, max(drawdown_ratio) AS drawdown,\n"
                "  argMax(daily_pnl_ratio, event_time) AS daily_pnl, max(margin_usage) AS max_margin_usage\n"
                "FROM risk_verdicts FINAL WHERE $__timeFilter(event_time)\nGROUP BY time ORDER BY time",
                ("time", "drawdown", "daily_pnl", "max_margin_usage"), time_series=True),), unit="percentunit"),
            Panel("PnL split: gross, fees, funding", (SqlQuery(
                "SELECT $__timeInterval(event_time) AS time,\n"
                f"  sumIf(realized_profit, {_FILLS}) AS gross,\n"
                f"  -sumIf(commission, {_FILLS}) AS fees,\n"
                f"  sumIf({_FUNDING}, event_type = 'ACCOUNT_UPDATE' AND reason = 'FUNDING_FEE') AS funding\n"
                "FROM user_events FINAL WHERE $__timeFilter(event_time)\nGROUP BY time ORDER BY time",
                ("time", "gross", "fees", "funding"), time_series=True),), unit="currencyUSD",
                description="From the fills' realized profit and commission and the FUNDING_FEE balance changes."),
            Panel("PnL split over the range", (SqlQuery(
                f"SELECT sumIf(realized_profit, {_FILLS}) AS gross, -sumIf(commission, {_FILLS}) AS fees,\n"
                f"  sumIf({_FUNDING}, event_type = 'ACCOUNT_UPDATE' AND reason = 'FUNDING_FEE') AS funding,\n"
                "  gross + fees + funding AS net\nFROM user_events FINAL WHERE $__timeFilter(event_time)",
                ("gross", "fees", "funding", "net")),), kind="stat", unit="currencyUSD"),
            Panel("Open positions: liquidation distance", (PromQuery(
                "perpflow_position_liq_distance_atr", "{{symbol}} {{side}}"),), kind="bargauge", unit="none",
                description="In ATRs; the risk monitor force-closes below 2."),
            Panel("Positions without SL and TP", (PromQuery("sum(perpflow_position_unprotected)", "unprotected"),),
                  kind="stat", width=6),
        )),
        Row("Decisions", (
            Panel("Signals by decision (1 h)", (PromQuery(
                "sum by (decision) (increase(perpflow_signals_total[1h]))", "{{decision}}"),)),
            Panel("Signals by decision (archive)", (_counted_over_time("signals", "decision", "signals"),)),
            Panel("EV distribution of signals (1 h)", (PromQuery(
                "sum by (le) (increase(perpflow_signal_ev_bucket[1h]))", "{{le}}", heatmap=True),), kind="bargauge"),
            Panel("EV distribution of signals (archive)", (SqlQuery(
                "SELECT floor(greatest(ev_long, ev_short) * 1000) / 1000 AS ev, decision, count() AS signals\n"
                "FROM signals FINAL WHERE $__timeFilter(event_time)\nGROUP BY ev, decision ORDER BY ev, decision",
                ("ev", "decision", "signals")),), kind="table",
                description="The better side's EV (net of costs, per unit of notional) in 0.1 % buckets."),
            Panel("Why FLAT", (_counted_over_time("signals", "flat_reason", "signals", " AND decision = 'FLAT'"),),
                  description="flat_reason of the FLAT signals: below the EV or P(win) threshold, below the "
                              "minimum notional, …"),
            Panel("Risk verdicts by verdict and reason (1 h)", (PromQuery(
                "sum by (verdict, reason) (increase(perpflow_risk_verdicts_total[1h]))", "{{verdict}} {{reason}}"),)),
            Panel("Verdicts by verdict and action (archive)", (_counted_over_time(
                "risk_verdicts", "concat(verdict, ' ', action) AS outcome", "verdicts"),)),
            Panel("Rejections by violated rule", (_REJECTIONS,),
                  description="A rejection counts once per rule it violates (`violations`)."),
            Panel("Newest rejections", (SqlQuery(
                "SELECT event_time, symbol, decision, violations, trading_state, margin_usage, daily_pnl_ratio,\n"
                "  drawdown_ratio, detail\nFROM risk_verdicts FINAL\n"
                "WHERE $__timeFilter(event_time) AND verdict = 'REJECTED'\nORDER BY event_time DESC LIMIT 100",
                ("event_time", "symbol", "decision", "violations", "trading_state", "margin_usage",
                 "daily_pnl_ratio", "drawdown_ratio", "detail")),), kind="table"),
            Panel("End-to-end latency, kline to order", _quantiles("perpflow_e2e_latency_seconds"), unit="s"),
            Panel("Signals held for the other symbols", (PromQuery("perpflow_risk_held_signals", "held"),),
                  description="The risk agent decides every symbol's bars in event-time order: a signal waits "
                              "until every symbol has passed its time. Growing = one symbol's chain is behind."),
            Panel("Chain balance per symbol: signals, verdicts, orders", (SqlQuery(
                "SELECT symbol, countIf(kind = 'signal') AS signals, countIf(kind = 'verdict') AS verdicts,\n"
                "  countIf(kind = 'order') AS orders\nFROM (\n"
                "  SELECT symbol, 'signal' AS kind FROM signals FINAL WHERE $__timeFilter(event_time)\n"
                "  UNION ALL SELECT symbol, 'verdict' FROM risk_verdicts FINAL WHERE $__timeFilter(event_time)\n"
                "  UNION ALL SELECT symbol, 'order' FROM orders FINAL WHERE $__timeFilter(event_time))\n"
                "GROUP BY symbol ORDER BY symbol", ("symbol", "signals", "verdicts", "orders")),), kind="table",
                description="Every signal gets exactly one verdict: the first two columns must be equal."),
        )),
        Row("Orders and fills", (
            Panel("Orders by action and side", (_counted_over_time(
                "orders", "concat(action, ' ', side) AS order", "orders"),)),
            Panel("Fills per symbol", (_counted_over_time("user_events", "symbol", "fills", f" AND {_FILLS}"),)),
            Panel("Order updates by status", (_counted_over_time(
                "user_events", "order_status", "updates", " AND event_type = 'ORDER_TRADE_UPDATE'"),)),
            Panel("Newest orders", (SqlQuery(
                "SELECT event_time, symbol, action, side, quantity, stop_loss, take_profit, leverage, reason,\n"
                "  intent_id\nFROM orders FINAL\nWHERE $__timeFilter(event_time)\nORDER BY event_time DESC LIMIT 100",
                ("event_time", "symbol", "action", "side", "quantity", "stop_loss", "take_profit", "leverage",
                 "reason", "intent_id")),), kind="table"),
            Panel("Newest fills", (SqlQuery(
                "SELECT event_time, symbol, side, last_filled_qty AS qty, last_filled_price AS price, commission,\n"
                "  realized_profit, reduce_only, client_order_id\nFROM user_events FINAL\n"
                f"WHERE $__timeFilter(event_time) AND {_FILLS}\nORDER BY event_time DESC LIMIT 100",
                ("event_time", "symbol", "side", "qty", "price", "commission", "realized_profit", "reduce_only",
                 "client_order_id")),), kind="table", width=24),
        )),
        Row("Risk events", (
            Panel("Risk events by kind", (_counted_over_time("risk_events", "kind", "events"),)),
            Panel("Risk events by severity", (_counted_over_time("risk_events", "severity", "events"),)),
            Panel("Newest risk events", (SqlQuery(
                "SELECT event_time, symbol, severity, kind, detail, source\nFROM risk_events FINAL\n"
                "WHERE $__timeFilter(event_time)\nORDER BY event_time DESC LIMIT 100",
                ("event_time", "symbol", "severity", "kind", "detail", "source")),), kind="table", width=24),
        )),
    ),
)

# Inputs whose drift the Models dashboard follows: a volatility, a momentum, a volume, a funding and a cross-
# asset feature (names from streams/features/registry.py, columns of the features table); the panel beside it
# shows which features actually move the predictions.
DRIFT_FEATURES = ("atr_pct", "rsi_14", "vol_z", "funding_rate", "btc_corr_60")


def _per_side(select: str, where: str = "") -> str:
    """`select` over the predictions of both sides, `{s}` standing for the side ('long', 'short')."""
    return "\n  UNION ALL ".join(
        f"SELECT '{s}' AS side, " + select.format(s=s)
        + f" FROM predictions FINAL WHERE $__timeFilter(event_time) AND model_id_{s} != ''{where}"
        for s in ("long", "short"))


# predicted P(TP) against the outcome `perpflow label` gave the same bar under the model's own label spec
_RELIABILITY = SqlQuery(
    "SELECT side, floor(p_tp * 10) / 10 AS bucket, avg(p_tp) AS predicted, avg(outcome = 'TP') AS realized,\n"
    "  count() AS predictions\nFROM (\n  "
    + _per_side("symbol, open_time, p_tp_{s} AS p_tp, model_id_{s} AS model_id")
    + "\n) AS p\nINNER JOIN (SELECT id AS model_id, label_spec_id FROM models FINAL) AS m USING (model_id)\n"
    "INNER JOIN (SELECT spec_id AS label_spec_id, toString(side) AS side, toString(symbol) AS symbol, open_time,\n"
    "  outcome FROM labels FINAL) AS l USING (label_spec_id, side, symbol, open_time)\n"
    "GROUP BY side, bucket ORDER BY side, bucket",
    ("side", "bucket", "predicted", "realized", "predictions"))

MODELS = Dashboard(
    uid="perpflow-models",
    title="perpflow / Models",
    description="Promoted models, predictions, live calibration, feature drift and backtest runs.",
    time_from="now-7d",
    rows=(
        Row("Promoted models", (
            Panel("Promoted model per side", (PromQuery("max by (side, model_id) (perpflow_model_info) == 1",
                                                        "{{side}} {{model_id}}"),), kind="table"),
            Panel("Model age", (PromQuery("perpflow_model_age_seconds", "{{side}}"),), kind="stat", unit="s"),
            Panel("Model registry", (SqlQuery(
                "SELECT id, side, status, train_start, train_end, promoted_at, label_spec_id,\n"
                "  JSONExtractFloat(metrics, 'auc') AS auc, JSONExtractFloat(metrics, 'brier') AS brier,\n"
                "  JSONExtractFloat(metrics, 'ece') AS ece, actor, reason\n"
                "FROM models FINAL ORDER BY created_at DESC LIMIT 50",
                ("id", "side", "status", "train_start", "train_end", "promoted_at", "label_spec_id", "auc", "brier",
                 "ece", "actor", "reason")),), kind="table", width=24,
                description="Out-of-fold metrics of each model as `perpflow train` recorded them."),
        )),
        Row("Predictions and calibration", (
            Panel("Live calibration error |mean P(TP) - realized TP rate|", (PromQuery(
                "perpflow_model_calibration_error", "{{side}}"),), unit="percentunit",
                description="Over the last predictions of the promoted model whose horizon has passed, outcomes "
                            "by the labels' rules on the archived bars (computed by `perpflow up`). The "
                            "ModelCalibrationDrift alert fires above 0.1 for an hour."),
            Panel("Predicted P(TP) distribution (1 h)", (PromQuery(
                "sum by (le) (increase(perpflow_prediction_p_tp_bucket[1h]))", "{{le}}", heatmap=True),),
                kind="bargauge"),
            Panel("Reliability: predicted P(TP) vs realized TP rate (labels)", (_RELIABILITY,), kind="table",
                  description="Predictions joined with the labels `perpflow label` computed for the same bar under "
                              "the model's label spec; a calibrated model has predicted ≈ realized in each bucket."),
            Panel("Predicted P(TP) distribution (archive)", (SqlQuery(
                "SELECT side, floor(p_tp * 20) / 20 AS bucket, count() AS predictions\nFROM (\n  "
                + _per_side("p_tp_{s} AS p_tp") + "\n)\nGROUP BY side, bucket ORDER BY side, bucket",
                ("side", "bucket", "predictions")),), kind="table"),
            Panel("Mean predicted P(TP) per side", (SqlQuery(
                "SELECT $__timeInterval(event_time) AS time, side, avg(p_tp) AS p_tp\nFROM (\n  "
                + _per_side("event_time, p_tp_{s} AS p_tp") + "\n)\nGROUP BY time, side ORDER BY time",
                ("time", "side", "p_tp"), time_series=True),), unit="percentunit"),
            Panel("Predictions per symbol", (_by_symbol_over_time("predictions", "predictions"),)),
        )),
        Row("Features", (
            Panel("Features that moved P(TP) most", (SqlQuery(
                "SELECT side, feature, count() AS predictions, avg(abs(contribution)) AS mean_abs_contribution\n"
                "FROM (\n  "
                + _per_side("arrayJoin(JSONExtract(top_features_{s}, 'Array(Tuple(feature String, value Float64))')) "
                            "AS c, c.1 AS feature, c.2 AS contribution")
                + "\n)\nGROUP BY side, feature\n"
                "ORDER BY side, predictions DESC, mean_abs_contribution DESC LIMIT 10 BY side",
                ("side", "feature", "predictions", "mean_abs_contribution")),), kind="table",
                description="How often each feature was among a prediction's five largest contributions."),
            Panel("Influence of the top features over time", (SqlQuery(
                "SELECT toStartOfDay(event_time) AS time, feature, avg(abs(contribution)) AS mean_abs_contribution\n"
                "FROM (\n  "
                + _per_side("event_time, arrayJoin(JSONExtract(top_features_{s}, "
                            "'Array(Tuple(feature String, value Float64))')) AS c, c.1 AS feature, c.2 AS contribution")
                + "\n)\nGROUP BY time, feature ORDER BY time",
                ("time", "feature", "mean_abs_contribution"), time_series=True),),
                description="Daily mean |contribution| to P(TP) of each feature when among a prediction's top five: "
                            "a model leaning on other inputs than it used to shows here."),
            Panel("Feature rows per symbol", (_by_symbol_over_time("features", "rows"),)),
            Panel("Feature drift: daily mean of key inputs (ready rows)", (SqlQuery(
                "SELECT toStartOfDay(event_time) AS time, "
                + ", ".join(f"avg({f}) AS {f}" for f in DRIFT_FEATURES)
                + "\nFROM features FINAL\nWHERE $__timeFilter(event_time) AND ready\nGROUP BY time ORDER BY time",
                ("time", *DRIFT_FEATURES), time_series=True),), width=24),
        )),
        Row("Backtests", (
            Panel("Backtest runs", (SqlQuery(
                "SELECT run_id, created_at, arrayStringConcat(model_ids, ', ') AS models,\n"
                "  arrayStringConcat(symbols, ', ') AS symbols, data_start, data_end,\n"
                "  JSONExtractInt(metrics, 'trades') AS trades, JSONExtractFloat(metrics, 'net_pnl') AS net_pnl,\n"
                "  JSONExtractFloat(metrics, 'total_return') AS total_return,\n"
                "  JSONExtractFloat(metrics, 'max_drawdown') AS max_drawdown, JSONExtractFloat(metrics, 'sharpe') AS "
                "sharpe,\n  JSONExtractFloat(metrics, 'win_rate') AS win_rate, report_path\n"
                "FROM backtest_runs FINAL ORDER BY created_at DESC LIMIT 50",
                ("run_id", "created_at", "models", "symbols", "data_start", "data_end", "trades", "net_pnl",
                 "total_return", "max_drawdown", "sharpe", "win_rate", "report_path")),), kind="table", width=24,
                description="One row per `perpflow backtest` run (its metrics.json); the report is at report_path."),
        )),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (TOPIC_HEALTH, TRADING, MODELS)
