"""Delivery reports of the confluent-kafka producers outside the agents (the Binance connectors' publisher, the
replays, the sink's dead letters): nothing they produce is dropped silently.

librdkafka already retries a produce request until `message.timeout.ms`; a record it then gives up on comes back
here. A transient failure (the broker unreachable or timing out) is produced again, a bounded number of times; a
permanent one (too large, unknown topic), or a transient one past its retries, is surfaced: counted in
`perpflow_produce_failures_total{topic,reason}`, logged as an error, and reported by `flush()` with what is still
queued, so the owner can fail loudly (the replay exits non-zero). Only failures call back
(`delivery.report.only.error`): a delivered record costs no Python call."""

from __future__ import annotations

import logging
import time
from functools import partial

from confluent_kafka import KafkaError, Producer

from streams import metrics

log = logging.getLogger(__name__)

RESENDS = 2
LOGGED = 10  # failures logged one by one; after that one line per LOG_EVERY (a broker outage fails thousands)
LOG_EVERY = 1000
_TRANSIENT = frozenset({
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.NETWORK_EXCEPTION,
})


def transient(err: KafkaError) -> bool:
    return err.code() in _TRANSIENT or err.retriable()


def reason_of(err: KafkaError) -> str:
    return err.name().strip("_").lower()


class DeliveryReports:
    """The failure callback of one producer: pass `config()` into its configuration."""

    def __init__(self, component: str, resends: int = RESENDS) -> None:
        self.component = component
        self.resends = resends
        self.failed = 0  # records given up on, since the start
        self.resent = 0
        self.first_failure = ""
        self._again: list[tuple[str, bytes | None, bytes | None, int]] = []  # (topic, key, value, attempt)

    def config(self) -> dict:
        return {"on_delivery": self.report, "delivery.report.only.error": True}

    def report(self, err: KafkaError | None, msg, attempt: int = 0) -> None:
        if err is None:
            return
        if attempt < self.resends and transient(err):
            self.resent += 1
            if self.resent <= LOGGED or self.resent % LOG_EVERY == 0:
                log.warning("%s: a record for %s was not delivered (%s); producing it again (%d of %d; %d so far)",
                            self.component, msg.topic(), err.str(), attempt + 1, self.resends, self.resent)
            self._again.append((msg.topic(), msg.key(), msg.value(), attempt + 1))
            return
        self.surface(msg.topic(), reason_of(err), err.str())

    def surface(self, topic: str, reason: str, detail: str) -> None:
        """A record that will not reach the broker: counted, logged, remembered for `flush()`."""
        self.failed += 1
        metrics.PRODUCE_FAILURES.labels(topic, reason).inc()
        if self.failed <= LOGGED or self.failed % LOG_EVERY == 0:
            log.error("%s: a record for %s was not delivered and is given up: %s (%s; %d so far)", self.component,
                      topic, reason, detail, self.failed)
        if not self.first_failure:
            self.first_failure = f"{topic}: {reason} ({detail})"

    @property
    def resends_waiting(self) -> bool:
        return bool(self._again)

    def resend(self, producer: Producer) -> None:
        """Produce again what failed transiently (call after `poll`; `flush` does)."""
        again, self._again = self._again, []
        for topic, key, value, attempt in again:
            try:
                producer.produce(topic, value, key, on_delivery=partial(self.report, attempt=attempt))
            except BufferError:
                self._again.append((topic, key, value, attempt))  # the queue is full: next time
            except Exception as exc:  # e.g. the topic vanished meanwhile
                self.surface(topic, "produce_refused", str(exc))

    def flush(self, producer: Producer, timeout: float) -> int:
        """Wait for every record queued (and produced again) to be delivered or given up; returns how many were not
        delivered: still queued at the timeout plus given up since the start."""
        deadline = time.monotonic() + timeout
        while True:
            left = producer.flush(max(deadline - time.monotonic(), 0))
            if not self._again or time.monotonic() >= deadline:
                return left + len(self._again) + self.failed
            self.resend(producer)
