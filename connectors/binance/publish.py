"""The Kafka side of the Binance connectors: check a market-data record's values (`connectors.validation`), encode
it, produce it keyed by symbol, count it; input that cannot be turned into a valid record goes to `deadletter`
with the reason instead. A record the broker does not take is produced again or surfaced (`streams.delivery`),
never dropped silently."""

from __future__ import annotations

import json
import logging

from confluent_kafka import KafkaException, Producer

from connectors import validation
from schemas.catalog import topic as catalog_topic
from schemas.codec import Codec, default_codec
from schemas.dead_letters import dead_letter
from streams import metrics
from streams.broker import producer_config
from streams.delivery import DeliveryReports, reason_of

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, bootstrap: str, prefix: str = "", codec: Codec | None = None,
                 message_timeout_s: float | None = None):
        self.reports = DeliveryReports("binance publisher")
        extra = {"linger.ms": 1, **self.reports.config()}  # a closed bar leaves at once
        if message_timeout_s is not None:  # how long librdkafka retries one record before reporting it failed
            extra["message.timeout.ms"] = int(message_timeout_s * 1000)
        self.producer = Producer(producer_config(bootstrap, **extra))
        self.prefix = prefix
        self.codec = codec or default_codec()
        self.published: dict[str, int] = {}

    def publish(self, topic: str, record: dict, key: str | None = None) -> bool:
        """Produce `record` to `topic` (a catalog name); False when it went to the dead letters instead."""
        found = validation.problem(topic, record)
        if found is not None:
            self.dead_letter(self.prefix + topic, json.dumps(record, default=str).encode(), *found)
            return False
        value = self.codec.encode(catalog_topic(topic).schema, record)
        name = self.prefix + topic
        key_bytes = (key if key is not None else record["symbol"]).encode()
        while True:
            try:
                self.producer.produce(name, value, key_bytes)
                break
            except BufferError:  # the local queue is full: let the broker catch up
                self.producer.poll(0.05)
            except KafkaException as exc:  # refused before it left, e.g. larger than message.max.bytes
                err = exc.args[0]
                self.reports.surface(name, reason_of(err), err.str())
                if topic != "deadletter":
                    self.dead_letter(name, value, "not_produced", f"{reason_of(err)}: {err.str()}", key_bytes)
                return False
        self.producer.poll(0)
        if self.reports.resends_waiting:
            self.reports.resend(self.producer)
        self.published[topic] = self.published.get(topic, 0) + 1
        metrics.MESSAGES_PRODUCED.labels(name).inc()
        metrics.BYTES_PRODUCED.labels(name).inc(len(value))
        return True

    def dead_letter(self, source: str, payload: bytes, reason: str, error: str, key: bytes | None = None) -> None:
        log.warning("dead letter from %s: %s (%s)", source, reason, error[:200])
        metrics.DEAD_LETTERS.labels(source, reason).inc()
        self.publish("deadletter", dead_letter(source, -1, -1, key, payload, reason, error), key=source)

    @property
    def failed(self) -> int:
        """Records given up on since the start (counted in perpflow_produce_failures_total too)."""
        return self.reports.failed

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for the deliveries; returns how many records were not delivered (still queued, or given up since
        the start)."""
        undelivered = self.reports.flush(self.producer, timeout)
        if undelivered:
            log.error("%d record(s) not delivered to the broker (first failure: %s)", undelivered,
                      self.reports.first_failure or f"still queued after {timeout:.0f} s")
        return undelivered
