"""The shape shared by the decision-chain agents that map one input record to one output record (predict, policy):
micro-batches (`take_events`), Avro decoding with dead letters, one vectorized call per batch, outputs sent to the
input's partition (same key, so per-symbol order holds down the chain), offsets committed by the agent itself
after the outputs are acknowledged (see `commit_handled`).

Stateless between records, so at-least-once is enough: a replayed input gives the same output with the same
deterministic event_id, which the archive deduplicates on."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust
from faust.types import TP

from schemas.codec import DecodeError, dead_letter_record, default_codec
from streams import metrics

log = logging.getLogger(__name__)

BATCH_EVENTS = 2000
BATCH_SECONDS = 0.05  # a hop's added latency live: the batch closes after this (or BATCH_EVENTS)
COMMIT_SECONDS = 1.0


async def commit_handled(app: faust.App, processed: dict[TP, int]) -> bool:
    """Commit the offsets after the last messages handled.

    The caller must have awaited the delivery of every effect of those messages (outputs, changelog records):
    `app.producer.flush()` is no guarantee, as Faust's send buffer stops flushing when no record left it for 0.1 s
    and does not wait for the record being handed to the client.

    Faust's own ack-based commits can stall after a restart (messages handed before its seek to the committed
    offsets leave holes in its acked lists: seen on Tansu, a restarted worker processed everything and kept
    committing the old offset). Every message of a batch is handled in order before this runs, so the offsets to
    commit are simply the last ones handled."""
    await app.producer.flush()  # what else was sent on its way (best effort, see above)
    offsets = {tp: offset + 1 for tp, offset in processed.items()}
    if not await app.consumer._commit(offsets):
        return False
    committed = app.consumer._committed_offset  # keep Faust from committing older offsets later
    for tp, offset in offsets.items():
        committed[tp] = max(committed[tp] or 0, offset)
    return True


def send_dead_letter(topic: Any, codec: Any, msg: Any, exc: DecodeError) -> Any:
    record = dead_letter_record(msg.topic, msg.partition, msg.offset, msg.key, msg.value, exc)
    metrics.DEAD_LETTERS.labels(msg.topic, exc.reason).inc()
    log.warning("dead letter from %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, exc)
    return topic.send_soon(key=msg.topic.encode(), value=codec.encode("dead_letter", record))


class BatchAgent:
    """Subclasses say their topics and schemas and implement `handle`: decoded records (with their partition and
    key) → output records, in any number."""

    name: str
    input_topic: str
    input_schema: str  # schema file stem
    output_topic: str
    output_schema: str

    def __init__(self, app: faust.App) -> None:
        self.app = app
        self.codec = default_codec()
        self.input_name = self.codec.full_name(self.input_schema)
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        self.output = app.topic(self.output_topic, **raw)
        self.dead_letters = app.topic("deadletter", **raw)
        self.processed: dict[TP, int] = {}
        self.last_commit = 0.0
        self.committed: dict[TP, int] = {}
        self.lock = asyncio.Lock()  # batches and the commit timer take turns
        app.agent(app.topic(self.input_topic, **raw), name=self.name)(self.run)
        app.timer(COMMIT_SECONDS)(self.tick)
        app.on_partitions_revoked.connect(self._on_revoked)

    async def tick(self) -> None:
        """The last batch before a pause is committed by time, not by the next batch."""
        if self.processed != self.committed and not self.app.in_recovery:
            async with self.lock:
                await self._commit()

    async def _commit(self) -> None:
        self.last_commit = time.monotonic()
        snapshot = dict(self.processed)
        if await commit_handled(self.app, snapshot):
            self.committed = snapshot

    async def _on_revoked(self, app: Any, revoked: Any, **kwargs: Any) -> None:
        self.processed.clear()
        self.committed.clear()

    async def run(self, stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH_EVENTS, within=BATCH_SECONDS):
            async with self.lock:
                await self.batch(events)

    async def batch(self, events: list[faust.EventT]) -> None:
        pending: list[Any] = []
        inputs: list[tuple[int, bytes, dict]] = []
        offsets: dict[TP, int] = {}
        for event in events:
            msg = event.message
            offsets[msg.tp] = msg.offset
            try:
                name, record = self.codec.decode(msg.value)
                if name != self.input_name:
                    raise DecodeError("wrong_schema", f"{name} on a topic of {self.input_name}")
            except DecodeError as exc:
                pending.append(send_dead_letter(self.dead_letters, self.codec, msg, exc))
                continue
            inputs.append((msg.partition, msg.key, record))
        if inputs:
            send, encode, stem = self.output.send_soon, self.codec.encode, self.output_schema
            pending.extend(send(key=key, value=encode(stem, out), partition=partition)
                           for partition, key, out in await self.handle(inputs))
        if pending:
            await asyncio.gather(*pending)
        self.processed.update(offsets)  # only once the outputs are acknowledged: a cancelled batch is not committed
        if time.monotonic() - self.last_commit >= COMMIT_SECONDS:
            await self._commit()

    async def handle(self, inputs: list[tuple[int, bytes, dict]]) -> list[tuple[int, bytes, dict]]:
        raise NotImplementedError
