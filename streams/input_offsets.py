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
- a gap is never skipped: while the expected offset has not come, the partition is sought back to it again every
  REFETCH_SECONDS; after MAX_REFETCHES the worker exits non-zero, saying so (its restart, or the next owner, starts
  from the committed offset). Records gone from the broker (retention) are found where they can be: a committed
  offset below the partition's first one starts there, logged and counted as lost.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import TP

from streams import metrics

log = logging.getLogger(__name__)

REFETCH_SECONDS = 3.0  # a seek back not answered by the expected offset in this long is made again...
MAX_REFETCHES = 20  # ... this many times (a minute): then the worker fails loudly rather than skip input
EXIT_INPUT_GAP = 70  # the worker's exit code then


def exit_loudly(message: str) -> None:
    """A worker that cannot get its input in order stops, non-zero: perpflow up or Kubernetes restart it, and it
    starts again from the committed offsets. Never an input skipped in silence."""
    log.critical(message)
    logging.shutdown()
    os._exit(EXIT_INPUT_GAP)


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
    earliest = await consumer.earliest_offsets(*assigned)
    for tp, offset in committed.items():
        first = earliest.get(tp) or 0
        starts[tp] = max(offset or 0, first)
        if offset and offset < first:  # not a gap to wait for: those records are no longer anywhere
            log.error("offsets %d..%d of %s[%d] are gone from the broker (retention); starting at %d", offset,
                      first - 1, tp.topic, tp.partition, first)
            metrics.AGENT_INPUT_LOST.labels("*", tp.topic).inc(first - offset)
        if starts[tp] != offset:
            await consumer.seek(tp, starts[tp])


def install(app: faust.App) -> None:
    app._perpflow_starts = {}  # partition → the offset its agents start from; empty: not known yet
    app._perpflow_inputs = {}  # agent → its ContiguousInput (where the watchdog reads each agent's position)

    async def _on_rebalance_complete(sender: Any, **kwargs: Any) -> None:
        await seek_to_start(app)

    async def _on_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        app._perpflow_starts.clear()  # until the next seek nothing is admitted

    app.on_rebalance_complete.connect(_on_rebalance_complete)
    app.on_partitions_revoked.connect(_on_revoked)
    app._perpflow_input_offsets = (_on_rebalance_complete, _on_revoked)  # signals keep weak references


@dataclass
class _Gap:
    expected: int  # the offset sought back to
    since: float  # when the gap was first seen
    sought_at: float  # when last sought back
    refetches: int = 0  # seeks made again since the first


class ContiguousInput:
    """One agent's view of its input partitions: `admit(msg)` says whether to handle the message now; `settle()`
    (awaited after a batch's messages went through `admit`, and on the agent's timer) seeks back the partitions
    where records were skipped, again while they do not come."""

    def __init__(self, app: faust.App, agent: str) -> None:
        self.app = app
        self.agent = agent
        self.next: dict[TP, int] = {}
        self.gaps: dict[TP, _Gap] = {}
        self.last_skipped: dict[TP, tuple[str, int]] = {}  # the newest message not admitted: why, its offset
        self.to_seek: dict[TP, int] = {}
        self.skipped = {reason: metrics.AGENT_INPUT_SKIPPED.labels(agent, reason)
                        for reason in ("before_start", "redelivered", "gap")}
        self.refetched = metrics.AGENT_INPUT_REFETCHES.labels(agent)
        registry = getattr(app, "_perpflow_inputs", None)
        if registry is not None:
            registry[agent] = self

    def reset(self) -> None:
        self.next.clear()
        self.gaps.clear()
        self.to_seek.clear()

    def describe(self, tp: TP) -> str:
        """This agent's view of one partition, for a stall's log line."""
        return (f"start={self.app._perpflow_starts.get(tp)} next={self.next.get(tp)} gap={self.gaps.get(tp)} "
                f"last_skipped={self.last_skipped.get(tp)}")

    def position(self, tp: TP) -> int | None:
        """The next offset this agent will handle of `tp` (None: not known yet, before the seek to the start)."""
        expected = self.next.get(tp)
        return self.app._perpflow_starts.get(tp) if expected is None else expected

    def admit(self, msg: Any) -> bool:
        tp, offset = msg.tp, msg.offset
        expected = self.next.get(tp)
        if expected is None:
            expected = self.app._perpflow_starts.get(tp)
            if expected is None:
                self.skipped["before_start"].inc()
                self.last_skipped[tp] = ("before_start", offset)
                return False
        if offset == expected:
            self.next[tp] = offset + 1
            self.gaps.pop(tp, None)
            return True
        if offset < expected:
            self.skipped["redelivered"].inc()
            self.last_skipped[tp] = ("redelivered", offset)
            return False
        self.skipped["gap"].inc()
        self.last_skipped[tp] = ("gap", offset)
        gap = self.gaps.get(tp)
        if gap is None or gap.expected != expected:
            now = time.monotonic()
            self.gaps[tp] = _Gap(expected, now, now)
            self.to_seek[tp] = expected
        return False

    async def settle(self) -> None:
        now = time.monotonic()
        for tp, gap in self.gaps.items():
            if tp in self.to_seek or now - gap.sought_at < REFETCH_SECONDS:
                continue
            if gap.refetches >= MAX_REFETCHES:
                exit_loudly(f"{self.agent}: offset {gap.expected} of {tp.topic}[{tp.partition}] did not come after "
                            f"{gap.refetches + 1} seeks back to it in {now - gap.since:.0f} s; exiting (code "
                            f"{EXIT_INPUT_GAP}) rather than go on without it")
                return
            gap.refetches += 1
            gap.sought_at = now
            self.refetched.inc()
            self.to_seek[tp] = gap.expected
        while self.to_seek:
            tp, offset = self.to_seek.popitem()
            log.info("%s: %s[%d] handed offsets past %d; seeking back to it", self.agent, tp.topic, tp.partition,
                     offset)
            try:
                await self.app.consumer.seek(tp, offset)
            except Exception as exc:  # revoked meanwhile: whoever owns it next starts from the committed offset
                log.warning("%s: could not seek %s[%d] back to %d: %s", self.agent, tp.topic, tp.partition, offset,
                            exc)
