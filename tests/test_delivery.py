"""Nothing lost on the way out, against the real broker and a real chDB store: a record the broker never takes is
produced again, then surfaced (counted, logged, reported by flush) instead of dropped; a record larger than the
producer's limit goes to the dead letters; the sink splits a batch the store refuses, dead-letters the refused row
and lands the others; a message over the broker's default limit is dead-lettered with a bounded prefix and its
size and hash, and the sink goes on."""

from __future__ import annotations

import hashlib
import logging
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY

from connectors.binance.publish import Publisher
from connectors.clickhouse_sink import ClickHouseSink
from connectors.replay import ReplaySource
from schemas.catalog import topic
from schemas.codec import default_codec
from schemas.dead_letters import PAYLOAD_PREFIX_BYTES
from streams.broker import consumer_config, ensure_topics, producer_config
from streams.delivery import RESENDS
from streams.errors import PerpflowError
from tests.conftest import SAMPLE, read_topic
from tests.test_sink import kline, produce, run_until_caught_up


def failures(topic_name: str, reason: str) -> float:
    return REGISTRY.get_sample_value("perpflow_produce_failures_total", {"topic": topic_name, "reason": reason}) or 0


def test_a_record_the_broker_never_takes_is_produced_again_then_surfaced(broker, caplog):
    ensure_topics(broker.bootstrap)
    publisher = Publisher(broker.bootstrap, message_timeout_s=1.0)
    assert publisher.publish("md.klines", kline("BTCUSDT", 0))
    assert publisher.flush(10) == 0
    # (on a loaded machine the first record may itself time out once, on a broker still electing its leaders, and
    # be delivered when produced again: only this record's resends are counted below)
    resent_before = publisher.reports.resent
    before = failures("md.klines", "msg_timed_out")
    broker.stop()  # the broker goes away with a record on its way
    caplog.set_level(logging.WARNING, logger="streams.delivery")
    assert publisher.publish("md.klines", kline("BTCUSDT", 1))
    started = time.monotonic()
    assert publisher.flush(30) == 1  # reported, not silently gone
    assert time.monotonic() - started < 20
    assert publisher.failed == 1
    assert failures("md.klines", "msg_timed_out") == before + 1
    assert publisher.reports.resent - resent_before == RESENDS  # this record, produced again exactly that often
    # the log says so (another test's producer, its broker gone too, may log beside it: counted by its own reports)
    again = [r for r in caplog.records if "producing it again" in r.getMessage()]
    given_up = [r for r in caplog.records if r.levelno == logging.ERROR and "given up" in r.getMessage()]
    assert len(again) >= RESENDS and len(given_up) >= 1


def test_a_record_over_the_producers_limit_goes_to_the_dead_letters(broker):
    ensure_topics(broker.bootstrap)
    publisher = Publisher(broker.bootstrap)
    huge = {**kline("BTCUSDT", 2), "source": "x" * 2_000_000}  # librdkafka's message.max.bytes is 1 MB
    before = failures("md.klines", "msg_size_too_large")
    assert not publisher.publish("md.klines", huge)
    assert publisher.publish("md.klines", kline("BTCUSDT", 3))
    assert publisher.flush(10) == 1  # the refused one counts as not delivered
    assert failures("md.klines", "msg_size_too_large") == before + 1
    assert [r["open_time"] for r in read_topic(broker.bootstrap, "md.klines")] == [kline("BTCUSDT", 3)["open_time"]]
    [letter] = read_topic(broker.bootstrap, "deadletter")
    encoded = default_codec().encode("kline", huge)
    assert (letter["reason"], letter["source_topic"], letter["key"]) == ("not_produced", "md.klines", "BTCUSDT")
    assert letter["payload_size"] == len(encoded) and len(letter["payload"]) == PAYLOAD_PREFIX_BYTES
    assert letter["payload_sha256"] == hashlib.sha256(encoded).hexdigest()
    assert letter["payload"] == encoded[:PAYLOAD_PREFIX_BYTES]


def committed(bootstrap: str) -> int:
    """Offsets of md.klines the sink's group committed, summed over the partitions."""
    probe = Consumer(consumer_config(bootstrap, "perpflow-sink"))
    parts = [TopicPartition("md.klines", p) for p in range(topic("md.klines").partitions)]
    try:
        return sum(tp.offset for tp in probe.committed(parts, timeout=10) if tp.offset > 0)
    finally:
        probe.close()


def test_a_replay_that_cannot_deliver_fails_with_one_line_and_counts_what_it_lost(broker):
    ensure_topics(broker.bootstrap)
    broker.stop()
    day = 86_400_000
    start = 1_702_080_000_000  # 2023-12-09 UTC
    replay = ReplaySource(broker.bootstrap, str(SAMPLE), ["BTCUSDT"], start, start + day, message_timeout_s=1.0)
    before = sum(failures(t, "msg_timed_out") for t in ("md.klines", "md.markprice", "md.funding"))
    with pytest.raises(PerpflowError, match=r"the replay could not deliver 579 record\(s\)") as info:
        replay.run()
    assert "\n" not in str(info.value) and "msg_timed_out" in str(info.value)
    after = sum(failures(t, "msg_timed_out") for t in ("md.klines", "md.markprice", "md.funding"))
    assert after - before == 579  # 288 bars, their 288 marks, 3 settlements: each counted once


def _insert_failures(table: str) -> float:
    return REGISTRY.get_sample_value("perpflow_sink_insert_failures_total", {"table": table}) or 0


def test_the_sink_lands_the_good_rows_and_dead_letters_the_row_the_store_refuses(broker, store):
    ensure_topics(broker.bootstrap)
    # a real refusal by the store: a constraint the poison row violates (the sink itself builds nothing wrong)
    store.command("ALTER TABLE md_klines ADD CONSTRAINT volume_not_negative CHECK volume >= 0")
    codec = default_codec()
    rows = [kline("BTCUSDT", i) for i in range(300)]
    rows[137]["volume"] = -5.0
    produce(broker.bootstrap, [("md.klines", "BTCUSDT", codec.encode("kline", r)) for r in rows])
    before = _insert_failures("md_klines")
    sink = ClickHouseSink(broker.bootstrap, store)
    run_until_caught_up(sink, broker.bootstrap)
    assert store.query_rows("SELECT count() FROM md_klines FINAL")[0][0] == 299
    assert store.query_rows("SELECT count() FROM md_klines FINAL WHERE volume < 0")[0][0] == 0
    assert sink.rows_rejected == 1 and sink.dead_letters == 1
    refused = _insert_failures("md_klines") - before
    assert 1 <= refused <= 2 * 9 + 1  # one refused row among 300: at most two halves per level of a 9-level split
    [(reason, source, key, error, offset, size)] = store.query_rows(
        "SELECT reason, source_topic, key, error, offset, payload_size FROM deadletter FINAL")
    assert (reason, source, key) == ("store_rejected", "md.klines", "BTCUSDT")
    assert "volume_not_negative" in error
    assert size == len(codec.encode("kline", rows[137]))
    assert offset >= 0
    assert committed(broker.bootstrap) == 300  # every offset: nothing redelivered for ever, nothing skipped


def test_a_batch_too_wide_for_one_insert_is_split_and_lands_whole(broker, store):
    """ClickHouse refuses an insert block spanning more than 100 months (partitions): the halves pass."""
    codec = default_codec()
    ensure_topics(broker.bootstrap)
    rows = []
    for i in range(150):
        r = kline("ETHUSDT", i)
        r["event_time"] = r["close_time"] = r["open_time"] + i * 31 * 86_400_000
        rows.append(r)
    produce(broker.bootstrap, [("md.klines", "ETHUSDT", codec.encode("kline", r)) for r in rows])
    sink = ClickHouseSink(broker.bootstrap, store)
    run_until_caught_up(sink, broker.bootstrap)
    assert store.query_rows("SELECT count() FROM md_klines FINAL")[0][0] == 150
    assert sink.rows_rejected == 0 and sink.dead_letters == 0


def test_a_message_over_the_brokers_limit_is_dead_lettered_bounded_and_the_sink_goes_on(broker, store):
    """A 2 MB message (larger than Kafka's default 1 MB limit, and than the sink's own producer takes) that is
    not a record: its dead letter holds a 4 KiB prefix, the size and the sha256, so it is delivered, and the sink
    commits past it instead of failing on every restart."""
    ensure_topics(broker.bootstrap)
    codec = default_codec()
    big = b"\x00not avro" + bytes(range(256)) * 8_000
    wide = Producer(producer_config(broker.bootstrap, **{"message.max.bytes": 16 * 1024 * 1024}))
    wide.produce("md.klines", big, b"BTCUSDT")
    assert wide.flush(30) == 0
    produce(broker.bootstrap, [("md.klines", "BTCUSDT", codec.encode("kline", kline("BTCUSDT", i))) for i in range(5)])
    sink = ClickHouseSink(broker.bootstrap, store)
    run_until_caught_up(sink, broker.bootstrap)
    assert sink.dead_letters == 1
    assert store.query_rows("SELECT count() FROM md_klines FINAL")[0][0] == 5
    [(reason, size, sha, prefix)] = store.query_rows(
        "SELECT reason, payload_size, payload_sha256, length(payload) FROM deadletter FINAL")
    assert (reason, size, sha, prefix) == ("bad_magic", len(big), hashlib.sha256(big).hexdigest(),
                                           PAYLOAD_PREFIX_BYTES)
    assert committed(broker.bootstrap) == 6  # past the big one: a restarted sink does not meet it again
