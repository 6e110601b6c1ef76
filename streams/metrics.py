"""Prometheus metrics every perpflow process exports (one registry, the default one).

Names are part of the contract with deploy/prometheus rules and grafana dashboards."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_PRODUCED = Counter("perpflow_messages_produced", "Messages produced", ["topic"])
BYTES_PRODUCED = Counter("perpflow_bytes_produced", "Bytes of message values produced", ["topic"])
MESSAGES_CONSUMED = Counter("perpflow_messages_consumed", "Messages consumed", ["group", "topic"])
BYTES_CONSUMED = Counter("perpflow_bytes_consumed", "Bytes of message values consumed", ["group", "topic"])
CONSUMER_LAG = Gauge(
    "perpflow_consumer_lag",
    "Messages behind the partition's high-watermark (from fetch responses, not ListOffsets)",
    ["group", "topic", "partition"],
)
EVENT_TIME_LAG = Gauge(
    "perpflow_event_time_lag_seconds", "Wall clock minus the newest event_time consumed", ["group", "topic"]
)
DEAD_LETTERS = Counter("perpflow_dead_letters", "Messages sent to the dead-letter topic", ["source_topic", "reason"])
PRODUCE_FAILURES = Counter("perpflow_produce_failures", "Records a producer outside the agents gave up delivering "
                           "(after librdkafka's retries and its own resends)", ["topic", "reason"])

SINK_ROWS = Counter("perpflow_sink_rows", "Rows inserted into ClickHouse", ["table"])
RISK_EVENT_LAST = Gauge("perpflow_risk_event_last_seconds", "Event time of the newest record on the live risk.events "
                        "topic per kind, severity and symbol, as the sink archives it (what the alerts fire on)",
                        ["kind", "severity", "symbol"])
SINK_BATCHES = Counter("perpflow_sink_batches", "Insert batches committed (insert + offset commit)")
SINK_INSERT_SECONDS = Histogram(
    "perpflow_sink_insert_seconds", "Time of one ClickHouse insert", ["table"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SINK_INSERT_FAILURES = Counter("perpflow_sink_insert_failures", "Failed ClickHouse inserts (retried)", ["table"])

TOPIC_END_OFFSET = Gauge("perpflow_topic_end_offset", "High-watermark of a partition", ["topic", "partition"])
TOPIC_RATE = Gauge("perpflow_topic_messages_per_second", "Messages/s over the last minute", ["topic"])
GROUP_LAG = Gauge("perpflow_group_lag", "Committed-offset lag of a consumer group", ["group", "topic"])

REPLAY_EVENTS = Counter("perpflow_replay_events", "Events published by the replay source", ["topic"])
REPLAY_SKIPPED_ROWS = Counter("perpflow_replay_skipped_rows", "Input rows skipped by the replay", ["reason"])

FEATURES_EMITTED = Counter("perpflow_features_emitted", "features records emitted by the agent", ["symbol"])
FEATURES_DROPPED_BARS = Counter("perpflow_features_dropped_bars", "Duplicate or out-of-order bars dropped", ["symbol"])
FEATURES_GAP_BARS = Counter("perpflow_features_gap_bars", "Bars missing before a received bar (gaps)", ["symbol"])
FEATURES_HELD_BARS = Gauge("perpflow_features_held_bars", "Bars held until their context is complete", ["symbol"])
FEATURES_BTC_TIMEOUTS = Counter(
    "perpflow_features_btc_timeouts", "Bars released without BTCUSDT's snapshot after waiting for it", ["symbol"])
FEATURES_LAST_CLOSE = Gauge("perpflow_features_last_close_seconds", "close_time of the newest features record",
                            ["symbol"])
AGENT_BUSY = Counter("perpflow_agent_busy_seconds", "Time an agent spent handling its micro-batches (its share of the "
                     "worker's core)", ["agent"])
AGENT_INPUT_SKIPPED = Counter("perpflow_agent_input_skipped", "Input messages an agent did not handle when handed: "
                              "before its start position, redelivered, or past a gap (handed again later)",
                              ["agent", "reason"])
AGENT_INPUT_LOST = Counter("perpflow_agent_input_lost", "Input offsets gone from the broker (retention) below the "
                           "group's committed offset: the agents started after them", ["agent", "topic"])
AGENT_INPUT_REFETCHES = Counter("perpflow_agent_input_refetches", "Seeks back to a gap made again because the "
                                "expected offset had not come (after MAX_REFETCHES the worker exits)", ["agent"])
WORKER_STALLED = Gauge("perpflow_worker_stalled", "1 while the worker's watchdog finds an agent with input "
                       "available that has handled nothing of it for PERPFLOW_WATCHDOG_SECONDS (/health fails)")
CONTROL_REJECTED = Counter("perpflow_control_rejected", "`control` records ignored: HMAC missing or wrong "
                           "(not signed with this deployment's control token)", ["entity"])
WORKER_RESTARTS = Counter("perpflow_worker_restarts", "Faust worker processes restarted by perpflow up")

# Metrics named before whoever exports them exists: the alert rules (deploy/prometheus/rules) and the dashboards
# (grafana/) may query a name listed here before it is built. Whoever builds it exports it under exactly this name
# (series name as PromQL sees it: a Counter "perpflow_x" is "perpflow_x_total", a Histogram's is
# "perpflow_x_bucket") and removes it from this list; tests/test_observability.py fails while a listed name is
# exported, or an unlisted queried one is not. Empty: every queried metric is built.
DECISION_CHAIN_METRICS: dict[str, str] = {}

# decision chain: the risk agent (streams/risk): account, trading state, verdicts
TRADING_STATE = Gauge("perpflow_trading_state", "1 for the current trading state (RUNNING, REDUCE_ONLY, HALTED)",
                      ["state"])
ACCOUNT_EQUITY = Gauge("perpflow_account_equity_usdt", "Account equity: wallet balance + unrealized PnL, USDT")
ACCOUNT_DRAWDOWN = Gauge("perpflow_account_drawdown_ratio", "1 - equity / peak equity")
DAILY_PNL = Gauge("perpflow_daily_pnl_ratio", "Today's (UTC) PnL / equity at the day's start; a loss is negative")
DAILY_LOSS_LIMIT = Gauge("perpflow_daily_loss_limit_ratio", "The daily loss that halts trading (0.02 = 2 %)")
LIQ_DISTANCE = Gauge("perpflow_position_liq_distance_atr", "Distance of an open position to its liquidation, in ATRs",
                     ["symbol", "side"])
RISK_VERDICTS = Counter("perpflow_risk_verdicts", "Verdicts; a rejection counts once per violated rule",
                        ["verdict", "reason"])
E2E_LATENCY = Histogram("perpflow_e2e_latency_seconds", "Live bars: the bar's close to its verdict (and order)",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))

# decision chain: the predict agent and the policy it runs (streams/predict, streams/policy)
SIGNALS = Counter("perpflow_signals", "Signals by decision (LONG / SHORT / FLAT)", ["decision"])
SIGNAL_EV = Histogram("perpflow_signal_ev", "EV of the signals per side, net of costs (return per unit notional)",
                      ["side"], buckets=(-0.02, -0.01, -0.005, -0.002, -0.001, 0.0, 0.001, 0.002, 0.005, 0.01, 0.02))
MODEL_INFO = Gauge("perpflow_model_info", "1 for the model each side predicts with", ["side", "model_id"])
PREDICTION_P_TP = Histogram("perpflow_prediction_p_tp", "Predicted P(TP)", ["side"],
                            buckets=tuple(i / 10 for i in range(1, 10)))
PREDICTIONS = Counter("perpflow_predictions", "predictions emitted", ["symbol"])
MODEL_REFUSED = Counter("perpflow_model_refused_total", "Promotions a worker refused: artifact missing everywhere, "
                        "failing its sha256, or of another feature schema (the side keeps its model)", ["side"])
MODEL_AGE = Gauge("perpflow_model_age_seconds", "Seconds since the end of the training data of the model each side "
                  "predicts with (computed at each scrape)", ["side"])
# live calibration of the promoted models (streams/calibration.py, in `perpflow up`, which owns the store): no series
# for a side until enough of its predictions have a known outcome
MODEL_CALIBRATION_ERROR = Gauge("perpflow_model_calibration_error", "|mean predicted P(TP) - realized TP rate| over "
                                "the promoted model's latest predictions whose outcome is known (labels' rules)",
                                ["side"])
MODEL_CALIBRATION_PREDICTIONS = Gauge("perpflow_model_calibration_predictions", "Predictions with a known outcome "
                                      "that perpflow_model_calibration_error is computed over", ["side"])
RISK_HELD_SIGNALS = Gauge("perpflow_risk_held_signals", "Signals the risk agent holds until every symbol has passed "
                          "their time")
PREDICT_SKIPPED = Counter("perpflow_predict_skipped", "features records not predicted (not_ready, no_model)",
                          ["reason"])

# Binance connectors (connectors/binance): connector = binance-market | binance-user | binance-execution (the
# execution connector's own watch of the account when it runs alone). The first four names are
# the ones the alert rules and dashboards query (deploy/prometheus/rules, grafana/boards.py).
CONNECTOR_CONNECTED = Gauge("perpflow_connector_connected", "1 while the connector's stream is connected, else 0",
                            ["connector"])
CONNECTOR_RECONNECTS = Counter("perpflow_connector_reconnects", "Stream reconnects (the reason is logged)",
                               ["connector"])
LAST_CLOSED_BAR = Gauge("perpflow_last_closed_bar_seconds", "Close time (unix s) of the newest closed bar published",
                        ["symbol", "interval"])
POSITION_UNPROTECTED = Gauge("perpflow_position_unprotected",
                             "1 while a position is open without its stop-loss and take-profit orders", ["symbol"])
BINANCE_MESSAGES = Counter("perpflow_binance_messages", "WebSocket messages received", ["connector", "event"])
BINANCE_LATENCY = Histogram(
    "perpflow_binance_latency_seconds", "Receive time minus the event time Binance stamped (E)", ["connector"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BINANCE_GAPS = Counter("perpflow_binance_kline_gaps", "Gaps of closed klines detected", ["symbol", "interval"])
BINANCE_BACKFILLED = Counter("perpflow_binance_backfilled", "Records backfilled from REST", ["topic"])
BINANCE_REST_ERRORS = Counter("perpflow_binance_rest_errors", "REST errors by path and code", ["path", "code"])
BINANCE_USED_WEIGHT = Gauge("perpflow_binance_used_weight_1m", "X-MBX-USED-WEIGHT-1M of the last response")
BINANCE_ORDERS = Counter("perpflow_binance_orders", "Execution outcomes", ["outcome"])
EXECUTION_TRANSITIONS = Counter("perpflow_execution_transitions", "Order-intent lifecycle transitions by the state "
                                "entered (connectors/binance/execution.py)", ["state"])
