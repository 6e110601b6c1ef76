"""The shape shared by the decision-chain agents after features (predict, policy, risk): micro-batches
(`micro_batches`) of one or more input topics, Avro decoding with dead letters (each topic's schema from the
catalog), one call per batch, outputs sent to the input's partition (same key, so per-symbol order holds down the
chain), offsets committed by the agent itself after the outputs are acknowledged (see `commit_handled`).

Predict and policy are stateless between records, so at-least-once is enough: a replayed input gives the same
output with the same deterministic event_id, which the archive deduplicates on. An agent with state (risk) saves it
in `save`, which runs before every commit (so at most once a second), after the outputs are acknowledged."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import faust
from confluent_kafka import KafkaException
from faust.types import TP

from schemas import event_ids
from schemas.catalog import topic
from schemas.codec import DecodeError, default_codec
from schemas.dead_letters import dead_letter
from streams import metrics
from streams.app import catalog_name, kafka_name, raw_topic
from streams.input_offsets import ContiguousInput
from streams.output import AgentOutput, agent_output

log = logging.getLogger(__name__)

BATCH_EVENTS = 2000
COMMIT_SECONDS = 1.0
BACKLOG_EVENTS = 16  # a batch this big when the stream runs dry is a backlog arriving fetch by fetch...
REFILL_SECONDS = 0.03  # ... whose next fetch lands within this


async def micro_batches(stream: faust.StreamT, max_events: int) -> AsyncIterator[list[faust.EventT]]:
    """The stream's events in batches of what has arrived: a batch closes when the stream has nothing more
    buffered (or at `max_events`). Live, a bar's record is handled as soon as it comes, not after a batch window
    (Faust's `take_events` holds every batch for its `within` when it is not full: it was most of the chain's
    latency). On a backlog, what piles up while a batch is handled makes the next batch, and a big batch that runs
    dry waits a moment for the next fetch, so batches grow with the load and per-batch costs (a model call, a
    flush, a state save) are shared by many records."""
    queue = stream.channel.queue  # where Faust's fetcher puts this agent's events
    batch: list[faust.EventT] = []
    async for event in stream.events():
        batch.append(event)
        if len(batch) >= BACKLOG_EVENTS and len(batch) < max_events and queue.empty():
            await asyncio.sleep(REFILL_SECONDS)
        if len(batch) >= max_events or queue.empty():
            yield batch
            batch = []


class _Handled:
    """Per app: which agents read each topic, and the last offset each agent handled per partition."""

    def __init__(self) -> None:
        self.readers: dict[str, set[str]] = {}
        self.offsets: dict[str, dict[TP, int]] = {}


def _handled(app: faust.App) -> _Handled:
    if not hasattr(app, "_perpflow_handled"):
        app._perpflow_handled = _Handled()
    return app._perpflow_handled


def reads(app: faust.App, agent: str, topics: Iterable[str]) -> None:
    """Declare an agent's input topics: agents of one app share the consumer group, so a topic two of them read
    (md.klines: features and risk) has one committed offset, which must not pass either of them."""
    for name in topics:  # keyed as committed: by the Kafka name (a backtest's are prefixed)
        _handled(app).readers.setdefault(kafka_name(app, name), set()).add(agent)


def forget(app: faust.App, agent: str) -> None:
    """After a revocation: what the agent handled is no longer its to commit."""
    _handled(app).offsets.pop(agent, None)


async def commit_handled(app: faust.App, agent: str, processed: dict[TP, int]) -> bool:
    """Commit the offsets after the last messages handled; for a topic other agents read too, the lowest offset any
    of them handled (none handled yet: not committed).

    The caller must have awaited the delivery of every effect of those messages (outputs, dead letters and changelog
    records, all sent through `streams.output`: its `delivered()`).

    Faust's own ack-based commits can stall after a restart (messages handed before its seek to the committed
    offsets leave holes in its acked lists: seen on Tansu, a restarted worker processed everything and kept
    committing the old offset). Every message of a batch is handled in order before this runs, so the offsets to
    commit are simply the last ones handled."""
    shared = _handled(app)
    shared.offsets[agent] = dict(processed)
    offsets = {}
    for tp in processed:
        handled = [shared.offsets.get(a, {}).get(tp) for a in shared.readers.get(tp.topic, {agent})]
        if None not in handled:
            offsets[tp] = min(handled) + 1
    if not offsets:
        return True
    if not await app.consumer._commit(offsets):
        return False
    committed = app.consumer._committed_offset  # keep Faust from committing older offsets later
    for tp, offset in offsets.items():
        committed[tp] = max(committed[tp] or 0, offset)
    return True


def read_to_end(app: faust.App, tp: TP, done: int | None) -> bool:
    """True when an input partition has nothing more to give now: handled (`done`: the last offset an agent
    handled of it, None or -1 for none) up to the high-watermark of the consumer's last fetch."""
    consumer = app.consumer
    try:
        high = consumer.highwater(tp)
    except Exception:  # not assigned (yet): unknown
        return False
    if high is None:
        return False
    handed = consumer._read_offset.get(tp)  # last offset the consumer handed to streams (a seek sets next)
    if done is not None and done >= 0:
        return done + 1 >= high and (handed is None or handed <= done)
    # nothing of it handled in this process: complete when a seek put it at its end, or it is empty
    return (handed is None and high == 0) or (handed is not None and handed >= high)


def injected_stall(agent: str) -> int | None:
    """Tests only: PERPFLOW_TEST_STALL_AGENT=<agent>:<n> makes that agent stop taking input once it has handled
    n offsets (summed over its partitions), its handler waiting for ever: a chain that stops silently, for the
    watchdog to find (tests/test_watchdog.py)."""
    name, _, after = os.environ.get("PERPFLOW_TEST_STALL_AGENT", "").partition(":")
    return int(after or 0) if name == agent else None


def send_dead_letter(output: AgentOutput, topic: str, codec: Any, msg: Any, exc: DecodeError) -> None:
    record = dead_letter(msg.topic, msg.partition, msg.offset, msg.key, msg.value, exc.reason, exc.detail)
    metrics.DEAD_LETTERS.labels(msg.topic, exc.reason).inc()
    log.warning("dead letter from %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, exc)
    output.send(topic, msg.topic.encode(), codec.encode("dead_letter", record))


def send_handler_dead_letter(output: AgentOutput, topic: str, codec: Any, agent: str, msg: Any,
                             exc: Exception) -> None:
    """A record that decoded but made the agent's handler raise: the reason `handler_error`, the exception."""
    error = f"{agent}: {type(exc).__name__}: {exc}"
    record = dead_letter(msg.topic, msg.partition, msg.offset, msg.key, msg.value, "handler_error", error,
                         event_ids.dead_letter(msg.topic, msg.partition, msg.offset, f"handler:{agent}"))
    metrics.DEAD_LETTERS.labels(msg.topic, "handler_error").inc()
    log.error("dead letter from %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, error)
    output.send(topic, msg.topic.encode(), codec.encode("dead_letter", record))


class BatchAgent:
    """Subclasses name their topics and implement `handle`: decoded records (topic, partition, key, record) →
    output records (topic, partition or None, key, record), in any number."""

    name: str
    input_topics: tuple[str, ...]
    output_topics: tuple[str, ...]
    read_along: frozenset[str] = frozenset()  # inputs another agent owns (and dead-letters), e.g. md.klines for risk
    # `handle` keeps nothing between records (predict): after a batch raised, its records are handled again one by one
    # and those that still raise are dead-lettered (`handler_error`) instead of the worker crash-looping on them. A
    # stateful agent (risk) leaves it off: the records before the failing one would be applied twice.
    isolates_failing_records: bool = False

    def __init__(self, app: faust.App) -> None:
        self.app = app
        self.codec = default_codec()
        self.input_names = {t: self.codec.full_name(topic(t).schema) for t in self.input_topics}
        self.outputs = {t: (kafka_name(app, t), topic(t).schema) for t in self.output_topics}
        self.output = agent_output(app)
        self.dead_letters = kafka_name(app, "deadletter")
        self.processed: dict[TP, int] = {}
        self.handing: dict[TP, int] = {}  # the last offsets of the batch being handled
        self.last_commit = 0.0
        self.committed: dict[TP, int] = {}
        self.lock = asyncio.Lock()  # batches and the commit timer take turns
        self.input = ContiguousInput(app, self.name)
        app.agent(raw_topic(app, *self.input_topics), name=self.name)(self.run)
        reads(app, self.name, self.input_topics)
        app.timer(COMMIT_SECONDS)(self.tick)
        app.on_partitions_revoked.connect(self._on_revoked)

    async def tick(self) -> None:
        """The last batch before a pause is committed by time, not by the next batch; a gap still open is sought
        back to again even when nothing more is handed."""
        if self.app.in_recovery:
            return
        if self.input.gaps:
            async with self.lock:
                await self.input.settle()
        if self.processed != self.committed:
            async with self.lock:
                await self._commit()

    async def _commit(self) -> None:
        self.last_commit = time.monotonic()
        self.save()  # the state of every batch handled so far, before their offsets are committed
        await self.output.delivered()
        snapshot = dict(self.processed)
        if await commit_handled(self.app, self.name, snapshot):
            self.committed = snapshot

    async def _on_revoked(self, app: Any, revoked: Any, **kwargs: Any) -> None:
        self.processed.clear()
        self.committed.clear()
        self.input.reset()
        forget(self.app, self.name)

    async def run(self, stream: faust.StreamT) -> None:
        busy = metrics.AGENT_BUSY.labels(self.name)
        stall_after = injected_stall(self.name)
        async for events in micro_batches(stream, BATCH_EVENTS):
            if stall_after is not None and len(self.input.next) and sum(self.input.next.values()) >= stall_after:
                log.warning("%s: stalling as PERPFLOW_TEST_STALL_AGENT asks", self.name)
                await asyncio.Event().wait()  # for ever, holding nothing: the watchdog's test
            async with self.lock:
                started = time.perf_counter()
                await self.batch(events)  # includes waiting for the broker's acks: an upper bound of its CPU
                busy.inc(time.perf_counter() - started)

    async def batch(self, events: list[faust.EventT]) -> None:
        inputs: list[tuple[str, int, bytes, dict]] = []
        messages: list[Any] = []  # the message of each input
        offsets: dict[TP, int] = {}
        for event in events:
            msg = event.message
            if not self.input.admit(msg):
                continue
            offsets[msg.tp] = msg.offset
            source = catalog_name(self.app, msg.topic)  # handlers dispatch on catalog names, whatever the prefix
            try:
                name, record = self.codec.decode(msg.value)
                if name != self.input_names[source]:
                    raise DecodeError("wrong_schema", f"{name} on a topic of {self.input_names[source]}")
            except DecodeError as exc:
                if source not in self.read_along:  # a topic another agent owns dead-letters its bad input
                    send_dead_letter(self.output, self.dead_letters, self.codec, msg, exc)
                continue
            inputs.append((source, msg.partition, msg.key, record))
            messages.append(msg)
        await self.input.settle()
        self.handing = offsets
        if inputs and self.isolates_failing_records:
            await self._handle_isolating(inputs, messages)
        elif inputs:
            self.send(await self.handle(inputs))
        await self.output.delivered()
        self.processed.update(offsets)  # only once the outputs are acknowledged: a cancelled batch is not committed
        if time.monotonic() - self.last_commit >= COMMIT_SECONDS:
            await self._commit()

    async def _handle_isolating(self, inputs: list[tuple[str, int, bytes, dict]], messages: list[Any]) -> None:
        """Handle and send the batch; when that raises (the handler, or encoding what it made), each record again
        alone, dead-lettering those that raise. Broker and I/O errors are not the records' fault: they propagate."""
        try:
            self.send(await self.handle(inputs))
            return
        except (KafkaException, OSError):
            raise
        except Exception as exc:
            if len(inputs) == 1:
                send_handler_dead_letter(self.output, self.dead_letters, self.codec, self.name, messages[0], exc)
                return
            log.error("%s: a batch of %d records raised %s: %s; handling them one by one", self.name, len(inputs),
                      type(exc).__name__, exc)
        for item, msg in zip(inputs, messages, strict=True):
            try:
                self.send(await self.handle([item]))
            except (KafkaException, OSError):
                raise
            except Exception as exc:
                send_handler_dead_letter(self.output, self.dead_letters, self.codec, self.name, msg, exc)

    def send(self, outputs: list[tuple[str, int | None, bytes, dict]]) -> None:
        """Encode, then send (acknowledged by `self.output.delivered()`): an output that cannot be encoded raises
        before any of the batch's left."""
        encode, outputs_of = self.codec.encode, self.outputs
        encoded = []
        for name, partition, key, record in outputs:
            out, schema = outputs_of[name]
            encoded.append((out, key, encode(schema, record), partition))
        send = self.output.send
        for out, key, value, partition in encoded:
            send(out, key, value, partition)

    def save(self) -> None:
        """Write the state (`self.output.save`) before offsets are committed, once the batches' outputs are
        acknowledged; a stateless agent writes nothing."""

    async def handle(self, inputs: list[tuple[str, int, bytes, dict]]) -> list[tuple[str, int | None, bytes, dict]]:
        raise NotImplementedError
