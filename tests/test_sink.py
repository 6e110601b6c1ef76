"""The ClickHouse sink against the real broker and a real chDB store: batches land once,
replays leave the same rows, a ClickHouse outage is retried without committing, and
undecodable messages become dead letters with their reason."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from connectors.clickhouse_sink import ClickHouseSink
from connectors.clickhouse_store import BACKGROUND_NICE, Store
from schemas import event_ids
from schemas.catalog import archived, topic
from schemas.codec import default_codec
from streams.broker import consumer_config, end_offsets, ensure_topics, producer_config

T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


def kline(symbol: str, i: int) -> dict:
    open_time = T0 + i * 300_000
    return {"event_id": event_ids.kline(symbol, "5m", open_time), "event_time": open_time + 299_999,
            "symbol": symbol, "interval": "5m", "open_time": open_time, "close_time": open_time + 299_999,
            "open": 100.0 + i, "high": 101.0 + i, "low": 99.0 + i, "close": 100.5 + i, "volume": 10.0 * i,
            "quote_volume": None, "trades": i, "taker_buy_volume": None, "taker_buy_quote_volume": None,
            "is_closed": True, "source": "test"}


@pytest.fixture
def topics(broker):
    ensure_topics(broker.bootstrap)
    return broker.bootstrap


def produce(bootstrap: str, messages: list[tuple[str, str, bytes]]) -> None:
    p = Producer(producer_config(bootstrap))
    for name, key, value in messages:
        p.produce(name, value, key.encode())
    assert p.flush(30) == 0


def wait_caught_up(sink: ClickHouseSink, bootstrap: str, timeout: float = 60) -> None:
    """Until the sink has archived everything in the archived topics, including what it produced itself on the way
    (its dead letters, archived from `deadletter` in turn): caught up with end offsets that no longer move."""
    deadline = time.monotonic() + timeout
    targets = None
    while True:
        now = end_offsets(bootstrap, [x.name for x in archived()])
        if now == targets:
            return
        targets = now
        while not sink.caught_up(targets):
            assert time.monotonic() < deadline, f"sink did not catch up: {sink.committed} vs {targets}"
            time.sleep(0.1)


def run_until_caught_up(sink: ClickHouseSink, bootstrap: str, timeout: float = 60) -> None:
    t = threading.Thread(target=sink.run, daemon=True)
    t.start()
    wait_caught_up(sink, bootstrap, timeout)
    sink.stop()
    t.join(30)


def test_archives_once_and_replays_are_idempotent(topics, store):
    codec = default_codec()
    msgs = [("md.klines", s, codec.encode("kline", kline(s, i))) for i in range(500) for s in ("BTCUSDT", "ETHUSDT")]
    produce(topics, msgs)
    run_until_caught_up(ClickHouseSink(topics, store, batch_rows=300), topics)
    rows = store.query_rows("SELECT symbol, count(), sum(close), min(open_time) FROM md_klines FINAL "
                            "GROUP BY symbol ORDER BY symbol")
    expected_close = sum(100.5 + i for i in range(500))
    assert [(r[0], r[1], r[2]) for r in rows] == [("BTCUSDT", 500, expected_close), ("ETHUSDT", 500, expected_close)]
    # the same events again (a replay, or a redelivery after a crash): still one row per event
    produce(topics, msgs)
    run_until_caught_up(ClickHouseSink(topics, store), topics)
    assert store.query_rows("SELECT count() FROM md_klines FINAL")[0][0] == 1000
    assert store.query_rows("SELECT count(DISTINCT event_id) FROM md_klines")[0][0] == 1000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice per thread is Linux's")
def test_the_sink_runs_below_the_decision_chain(topics, store):
    """The archive's inserts yield the CPU to the broker and the agents: the sink's thread (and what chDB starts
    from it) runs at a lower priority; the process's other threads keep theirs."""
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    sink = ClickHouseSink(topics, store)
    t = threading.Thread(target=sink.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while os.getpriority(os.PRIO_PROCESS, t.native_id) != max(mine, BACKGROUND_NICE):
            assert time.monotonic() < deadline, "the sink's thread kept the normal priority"
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    finally:
        sink.stop()
        t.join(30)


def test_undecodable_messages_become_dead_letters(topics, store):
    codec = default_codec()
    good = codec.encode("kline", kline("BTCUSDT", 1))
    wrong_topic = codec.encode("funding", {"event_id": "f", "event_time": T0, "symbol": "BTCUSDT",
                                           "funding_time": T0, "funding_rate": 1e-4, "mark_price": None,
                                           "source": "t"})
    unknown = b"\xc3\x01" + bytes(8) + good[10:]  # a writer schema nobody registered
    produce(topics, [("md.klines", "BTCUSDT", good), ("md.klines", "BTCUSDT", b'{"not": "avro"}'),
                     ("md.klines", "BTCUSDT", wrong_topic), ("md.klines", "BTCUSDT", good[:-4]),
                     ("md.klines", "BTCUSDT", unknown)])
    sink = ClickHouseSink(topics, store)
    run_until_caught_up(sink, topics)
    assert sink.dead_letters == 4
    assert store.query_rows("SELECT count() FROM md_klines FINAL")[0][0] == 1
    reasons = store.query_rows("SELECT reason, source_topic, length(payload) FROM deadletter FINAL ORDER BY offset")
    assert reasons == [("bad_magic", "md.klines", 15), ("wrong_schema", "md.klines", len(wrong_topic)),
                       ("corrupt_body", "md.klines", len(good) - 4), ("unknown_fingerprint", "md.klines", len(good))]
    # the dead letter keeps the original bytes, so nothing is lost
    payload = store.query_rows("SELECT hex(payload) FROM deadletter FINAL WHERE reason = 'unknown_fingerprint'")
    assert payload == [(unknown.hex().upper(),)]


class FlakyStore:
    """The real store behind an outage: the first `failures` inserts raise like a down server."""

    def __init__(self, real: Store, failures: int):
        self.real, self.failures, self.attempts = real, failures, 0

    def insert_arrow(self, table, data):
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionError("ClickHouse is unavailable")
        self.real.insert_arrow(table, data)


def test_outage_is_retried_and_offsets_wait_for_the_insert(topics, store):
    codec = default_codec()
    produce(topics, [("md.klines", "BTCUSDT", codec.encode("kline", kline("BTCUSDT", i))) for i in range(50)])
    flaky = FlakyStore(store, failures=2)
    sink = ClickHouseSink(topics, flaky)
    t = threading.Thread(target=sink.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while flaky.attempts < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # while ClickHouse is down nothing is committed
    probe = Consumer(consumer_config(topics, "perpflow-sink"))
    parts = [TopicPartition("md.klines", p) for p in range(topic("md.klines").partitions)]
    assert all(tp.offset < 0 for tp in probe.committed(parts, timeout=10))
    wait_caught_up(sink, topics)  # the running sink eventually succeeds
    sink.stop()
    t.join(30)
    assert flaky.attempts == 3
    assert store.query_rows("SELECT count() FROM md_klines FINAL")[0][0] == 50
    committed = sum(tp.offset for tp in probe.committed(parts, timeout=10) if tp.offset > 0)
    probe.close()
    assert committed == 50
