"""How the agents' records leave the worker: one confluent-kafka (librdkafka) producer per worker process.

Faust's own send path (`topic.send_soon` → its producer buffer → aiokafka) costs ~50 µs of Python per record, a
future and a task each, on the event loop that also runs the agents: measured on the decision chain it was about a
fifth of the worker's CPU. librdkafka queues a record in a few µs from C and batches on its own thread.

At-least-once holds as before: an agent sends a batch's records, then awaits `delivered()` — every record queued
so far acknowledged by the broker (acks=all, idempotent) — before it saves state or commits the inputs. That waits
for what other agents queued meanwhile too, which only errs on the safe side. Records go to the partition the
agent names (co-partitioning), or by librdkafka's murmur2 key hash, the same as aiokafka's and the Java client's.
Table writes go the same way (`save`): Faust still restores its tables from those changelog topics."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import faust
from confluent_kafka import KafkaException, Producer

from streams.broker import producer_config

DELIVERY_TIMEOUT_S = 60.0
# the risk agent's book with the paper desk's held bars (up to two weeks per symbol) is one record of a few MB;
# also the cap of the Faust app's own producer (streams.app)
MAX_RECORD_BYTES = 16 * 1024 * 1024


class AgentOutput:
    def __init__(self, bootstrap: str) -> None:
        # linger 1 ms: a live bar's records leave at once; at full speed a batch's records still share requests
        self.producer = Producer(producer_config(bootstrap, **{
            "linger.ms": 1, "delivery.report.only.error": True, "queue.buffering.max.messages": 1_000_000,
            "message.max.bytes": MAX_RECORD_BYTES}))
        self.failures: list[str] = []
        self.flusher = ThreadPoolExecutor(1, thread_name_prefix="agent-output")  # flush blocks: off the loop

    def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        kwargs = {} if partition is None else {"partition": partition}
        while True:
            try:
                self.producer.produce(topic, value, key, on_delivery=self._failed, **kwargs)
                return
            except BufferError:  # librdkafka's queue is full: let it drain (a stalled broker stalls the agent)
                self.producer.poll(0.1)

    def _failed(self, err, msg) -> None:  # only called for failed deliveries (delivery.report.only.error)
        if err is not None:
            self.failures.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    async def delivered(self) -> None:
        """Every record sent so far acknowledged by the broker; raises when one failed or the broker is gone."""
        if not len(self.producer) and not self.failures:  # nothing in flight, no failure report left to serve
            return
        left = await asyncio.get_running_loop().run_in_executor(self.flusher, self.producer.flush, DELIVERY_TIMEOUT_S)
        if self.failures:
            failures, self.failures = self.failures, []
            raise KafkaException(f"{len(failures)} record(s) not delivered, first: {failures[0]}")
        if left:
            raise KafkaException(f"{left} record(s) not acknowledged by the broker within {DELIVERY_TIMEOUT_S:.0f} s")

    def save(self, table: faust.types.TableT, partition: int, key: bytes, value: bytes | None) -> None:
        """A table write (None deletes): in memory now, and to the table's changelog partition with the agent's
        records, acknowledged by `delivered()`. (Faust's `send_changelog` takes the send path this producer
        replaces; with the in-memory store its delivery callback records nothing.)"""
        if value is None:
            table.data.pop(key, None)
        else:
            table.data[key] = value
        self.send(table.changelog_topic.get_topic_name(), key, value, partition)


def agent_output(app: faust.App) -> AgentOutput:
    """The worker's one producer for agent records (made on first use, for the app's broker)."""
    output = getattr(app, "_perpflow_output", None)
    if output is None:
        bootstrap = ",".join(f"{url.host}:{url.port}" for url in app.conf.broker)
        output = app._perpflow_output = AgentOutput(bootstrap)
    return output
