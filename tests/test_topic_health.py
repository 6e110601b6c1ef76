"""Topic health against the real embedded broker: end offsets from fetch high-watermarks (Tansu's
ListOffsets under-reports them when batches hold several records), group lag, rates."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from streams.broker import client_config, consumer_config, end_offsets, ensure_topics, producer_config
from streams.topic_health import TopicHealth


def fill(bootstrap: str, n: int, partition: int = 0) -> None:
    p = Producer(producer_config(bootstrap, **{"linger.ms": 50}))
    for _ in range(n):
        p.produce("md.klines", b"x" * 100, b"BTCUSDT", partition=partition)
    assert p.flush(30) == 0


def test_end_offsets_are_exact_where_list_offsets_is_not(broker):
    ensure_topics(broker.bootstrap)
    fill(broker.bootstrap, 5000)
    assert end_offsets(broker.bootstrap, ["md.klines"])[("md.klines", 0)] == 5000
    assert end_offsets(broker.bootstrap, ["md.klines"])[("md.klines", 1)] == 0  # an empty partition
    probe = Consumer(client_config(broker.bootstrap, **{"group.id": "probe"}))
    _, listed = probe.get_watermark_offsets(TopicPartition("md.klines", 0), timeout=5, cached=False)
    probe.close()
    assert listed <= 5000  # ListOffsets is at best a lower bound here (the reason end_offsets fetches)


def test_group_lag_and_rates(broker):
    ensure_topics(broker.bootstrap)
    fill(broker.bootstrap, 300)
    consumer = Consumer(consumer_config(broker.bootstrap, "lagging-group"))
    consumer.commit(offsets=[TopicPartition("md.klines", 0, 120)], asynchronous=False)
    consumer.close()
    health = TopicHealth(broker.bootstrap)
    first = health.sample()
    row = next(t for t in first.topics if t.topic == "md.klines")
    assert (row.partitions, row.end_offset, row.msgs_per_s) == (4, 300, None)  # no rate from one sample
    lag = [g for g in first.groups if g.group == "lagging-group"]
    assert [(g.topic, g.partition, g.committed, g.end_offset, g.lag) for g in lag] == [("md.klines", 0, 120, 300, 180)]
    time.sleep(1.0)
    fill(broker.bootstrap, 100)
    second = health.sample()
    rate = next(t for t in second.topics if t.topic == "md.klines").msgs_per_s
    assert rate == pytest.approx(100 / (second.taken_at - first.taken_at))
