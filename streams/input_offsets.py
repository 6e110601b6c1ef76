"""Every input message handed to an agent once, in offset order, from where the group's committed offset says.

Faust seeks the stream partitions to their committed offsets only after a rebalance's table recovery has resumed
them, and records fetched before that seek are still handed afterwards: they pass Faust's own check, which only
drops offsets *below* the last one read. Measured on a worker restarted after a SIGKILL: the features agent was
handed md.klines[2] from offset 819 while the committed offset was 347, and the bars in between were lost for good
(the engine drops bars older than its last one). So:

- `seek_to_start` (connected to `on_rebalance_complete`, which Faust sends before it resumes the partitions) seeks
  every assigned input partition to its committed offset, or to its start for a group that never committed there,
  and records that position as where each agent must begin;
- `ContiguousInput` admits, per agent and input partition, only the next offset it expects. Older offsets were
  handled already (a redelivery after a seek: dropped). A newer one means records were skipped: the partition is
  sought back to the expected offset and the message dropped, to be handed again in its turn. Before the start
  position is known (between a revocation and the seek) nothing is admitted.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
from faust.types import TP

from streams import metrics

log = logging.getLogger(__name__)

# a gap that a seek back did not fill in this long is taken as records gone from the broker (retention): accepted,
# logged and counted, rather than stalling the partition for ever
GAP_PATIENCE_SECONDS = 10.0


async def seek_to_start(app: faust.App) -> None:
    """Seek the assigned stream partitions (not the tables' changelogs) to their committed offsets, or to their
    first offset when the group has none there, and record those as the agents' start positions."""
    consumer, starts = app.consumer, app._perpflow_starts
    starts.clear()
    changelogs = set(app.tables.changelog_topics)
    assigned = {tp for tp in consumer.assignment() if tp.topic not in changelogs}
    if not assigned:
        return
    await consumer.perform_seek()  # to the committed offsets, which Faust records in _committed_offset
    committed = {tp: consumer._committed_offset.get(tp) for tp in assigned}
    fresh = [tp for tp, offset in committed.items() if not offset]
    earliest = await consumer.earliest_offsets(*fresh) if fresh else {}
    for tp, offset in committed.items():
        starts[tp] = offset or earliest.get(tp) or 0
        if not offset:
            await consumer.seek(tp, starts[tp])


def install(app: faust.App) -> None:
    app._perpflow_starts = {}  # partition → the offset its agents start from; empty: not known yet

    async def _on_rebalance_complete(sender: Any, **kwargs: Any) -> None:
        await seek_to_start(app)

    async def _on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        app._perpflow_starts.clear()  # until the next seek nothing is admitted

    app.on_rebalance_complete.connect(_on_rebalance_complete)
    app.on_partitions_revoked.connect(_on_revoked)
    app._perpflow_input_offsets = (_on_rebalance_complete, _on_revoked)  # signals keep weak references


class ContiguousInput:
    """One agent's view of its input partitions: `admit(msg)` says whether to handle the message now; `settle()`
    (awaited after a batch's messages went through `admit`) seeks back the partitions where records were skipped."""

    def __init__(self, app: faust.App, agent: str) -> None:
        self.app = app
        self.agent = agent
        self.next: dict[TP, int] = {}
        self.gaps: dict[TP, tuple[int, float]] = {}  # partition → (offset sought back to, when first seen)
        self.to_seek: dict[TP, int] = {}
        self.skipped = {reason: metrics.AGENT_INPUT_SKIPPED.labels(agent, reason)
                        for reason in ("before_start", "redelivered", "gap")}

    def reset(self) -> None:
        self.next.clear()
        self.gaps.clear()
        self.to_seek.clear()

    def admit(self, msg: Any) -> bool:
        tp, offset = msg.tp, msg.offset
        expected = self.next.get(tp)
        if expected is None:
            expected = self.app._perpflow_starts.get(tp)
            if expected is None:
                self.skipped["before_start"].inc()
                return False
        if offset == expected:
            self.next[tp] = offset + 1
            self.gaps.pop(tp, None)
            return True
        if offset < expected:
            self.skipped["redelivered"].inc()
            return False
        self.skipped["gap"].inc()
        first = self.gaps.get(tp)
        if first is None or first[0] != expected:
            self.gaps[tp] = (expected, time.monotonic())
            self.to_seek[tp] = expected
            return False
        if time.monotonic() - first[1] < GAP_PATIENCE_SECONDS:
            return False
        log.error("%s: offsets %d..%d of %s[%d] never came back after a seek; going on from %d", self.agent,
                  expected, offset - 1, tp.topic, tp.partition, offset)
        metrics.AGENT_INPUT_LOST.labels(self.agent, tp.topic).inc(offset - expected)
        self.next[tp] = offset + 1
        self.gaps.pop(tp, None)
        return True

    async def settle(self) -> None:
        while self.to_seek:
            tp, offset = self.to_seek.popitem()
            log.info("%s: %s[%d] handed offsets past %d; seeking back to it", self.agent, tp.topic, tp.partition,
                     offset)
            try:
                await self.app.consumer.seek(tp, offset)
            except Exception as exc:  # revoked meanwhile: whoever owns it next starts from the committed offset
                log.warning("%s: could not seek %s[%d] back to %d: %s", self.agent, tp.topic, tp.partition, offset,
                            exc)
