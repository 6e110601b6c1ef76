"""The Kafka side of the Binance connectors: encode a record, produce it keyed by symbol, count it; input that
cannot be turned into a record goes to `deadletter` with the reason instead."""

from __future__ import annotations

import logging
import time

from confluent_kafka import Producer

from schemas import event_ids
from schemas.catalog import topic as catalog_topic
from schemas.codec import Codec, default_codec
from streams import metrics
from streams.broker import producer_config

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, bootstrap: str, prefix: str = "", codec: Codec | None = None):
        self.producer = Producer(producer_config(bootstrap, **{"linger.ms": 1}))  # a closed bar leaves at once
        self.prefix = prefix
        self.codec = codec or default_codec()
        self.published: dict[str, int] = {}

    def publish(self, topic: str, record: dict, key: str | None = None) -> None:
        value = self.codec.encode(catalog_topic(topic).schema, record)
        name = self.prefix + topic
        while True:
            try:
                self.producer.produce(name, value, (key if key is not None else record["symbol"]).encode())
                break
            except BufferError:  # the local queue is full: let the broker catch up
                self.producer.poll(0.05)
        self.producer.poll(0)
        self.published[topic] = self.published.get(topic, 0) + 1
        metrics.MESSAGES_PRODUCED.labels(name).inc()
        metrics.BYTES_PRODUCED.labels(name).inc(len(value))

    def dead_letter(self, source: str, payload: bytes, reason: str, error: str) -> None:
        log.warning("dead letter from %s: %s (%s)", source, reason, error[:200])
        metrics.DEAD_LETTERS.labels(source, reason).inc()
        self.publish("deadletter", {
            "event_id": event_ids.dead_letter_payload(source, payload), "event_time": int(time.time() * 1000),
            "source_topic": source, "partition": -1, "offset": -1, "key": None, "reason": reason,
            "error": error[:2000], "payload": payload,
        }, key=source)

    def flush(self, timeout: float = 30.0) -> int:
        return self.producer.flush(timeout)
