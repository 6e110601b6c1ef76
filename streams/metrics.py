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

SINK_ROWS = Counter("perpflow_sink_rows", "Rows inserted into ClickHouse", ["table"])
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

# Binance connectors (connectors/binance): stream = market | user
BINANCE_CONNECTED = Gauge("perpflow_binance_connected", "1 while the stream's WebSocket is connected", ["stream"])
BINANCE_RECONNECTS = Counter("perpflow_binance_reconnects", "WebSocket reconnects by reason", ["stream", "reason"])
BINANCE_MESSAGES = Counter("perpflow_binance_messages", "WebSocket messages received", ["stream", "event"])
BINANCE_LATENCY = Histogram(
    "perpflow_binance_latency_seconds", "Receive time minus the event time Binance stamped (E)", ["stream"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BINANCE_GAPS = Counter("perpflow_binance_kline_gaps", "Gaps of closed klines detected", ["symbol", "interval"])
BINANCE_BACKFILLED = Counter("perpflow_binance_backfilled", "Records backfilled from REST", ["topic"])
BINANCE_REST_ERRORS = Counter("perpflow_binance_rest_errors", "REST errors by path and code", ["path", "code"])
BINANCE_USED_WEIGHT = Gauge("perpflow_binance_used_weight_1m", "X-MBX-USED-WEIGHT-1M of the last response")
BINANCE_ORDERS = Counter("perpflow_binance_orders", "Execution outcomes", ["outcome"])
