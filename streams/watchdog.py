"""The worker's watchdog: the decision chain never stops silently.

Every few seconds a thread of its own (it must see a stuck event loop too) compares, for each input partition the
worker owns and each agent reading it, the partition's end offset on the broker with the next offset the agent will
handle (`ContiguousInput.position`; before the seek to the start, the group's committed offset). Input waiting while
an agent's position has not moved for PERPFLOW_WATCHDOG_SECONDS is a stall:

- `/health` answers 503 (Kubernetes' liveness probe restarts the pod; `perpflow up` restarts its worker);
- trading is HALTED (a `control` record for entity `trading`, actor `watchdog`, reason `chain_stalled`): no new
  entries until an operator starts trading again;
- a critical `risk.events` record of kind `chain_stalled` names the agent, topic, partition and offsets;
- `perpflow_worker_stalled` is 1 (alert rule WorkerChainStalled).

Idle input (nothing past an agent's position) is no stall, and a rebalance starts every clock again: the worker's
join and table recovery (its warm-up) get the same bound."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass

import faust
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from faust.types import TP

from schemas import event_ids
from schemas.catalog import topic
from schemas.codec import default_codec
from streams import metrics
from streams.app import app_id_for, catalog_name, consumer_flow, topic_prefix
from streams.broker import client_config, committed_offsets, end_offsets, producer_config
from streams.control import publish
from streams.risk.guard import HALTED, TRADING_ENTITY

log = logging.getLogger(__name__)

ACTOR = "watchdog"
REASON = "chain_stalled"
HELD = "(held)"  # a Stall's topic when an agent holds records back with nothing left to read
REBALANCE = "(rebalance)"  # ... when the worker's consumer is in a rebalance that does not end


def hold_probe(app: faust.App, agent: str, probe) -> None:
    """An agent that holds records back (risk: signals until every symbol has passed their time) says how many
    (`probe()` → (count, what holds them)): held without progress for the bound, its input all handled, is a stall
    too — the chain's output stopped although nothing waits on the broker."""
    if not hasattr(app, "_perpflow_holders"):
        app._perpflow_holders = {}
    app._perpflow_holders[agent] = probe


def check_seconds(watchdog_seconds: float) -> float:
    """How often the watchdog looks: a few times per bound, at most every 5 s."""
    return max(0.5, min(5.0, watchdog_seconds / 4))


@dataclass
class _Clock:
    position: int
    since: float  # when the position last moved, or input last ran out, or the partition was assigned
    nudged: bool = False  # sought to the position once already (half the bound)


@dataclass(frozen=True)
class Stall:
    agent: str
    topic: str  # catalog name
    partition: int
    position: int  # the next offset the agent would handle
    end: int  # the partition's end offset on the broker
    seconds: float  # without progress

    def describe(self) -> str:
        if self.topic == HELD:
            return (f"{self.agent} holds {self.end:,} records it has not released for {self.seconds:.0f} s, its input "
                    f"handled to the end")
        if self.topic == REBALANCE:
            return (f"the consumer has been in a rebalance for {self.seconds:.0f} s (joined without an assignment, or "
                    f"its recovery not done): nothing is handled")
        return (f"{self.agent} has handled nothing of {self.topic}[{self.partition}] for {self.seconds:.0f} s with "
                f"{self.end - self.position:,} records waiting (offsets {self.position}..{self.end - 1})")


class Watchdog:
    def __init__(self, app: faust.App, bootstrap: str, bound_seconds: float, token: str) -> None:
        self.app = app
        self.bootstrap = bootstrap
        self.bound = bound_seconds
        self.token = token
        self.prefix = topic_prefix(app)
        self.group = app_id_for(self.prefix)
        self.assigned: frozenset[TP] = frozenset()  # the worker's input partitions (not the tables' changelogs)
        self.clocks: dict[tuple[str, TP], _Clock] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stalls: list[Stall] = []  # what the last look found; empty: healthy
        self.episode: set[tuple[str, TP]] = set()  # stalls already announced (HALT, risk event) and not cleared
        self.rebalancing_since: float | None = None  # when the consumer's current rebalance began (as first seen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._admin: AdminClient | None = None
        app.on_partitions_assigned.connect(self._on_assigned)
        app.on_partitions_revoked.connect(self._on_revoked)
        self._receivers = (self._on_assigned, self._on_revoked)  # signals keep weak references

    # -- the event loop's side: the assignment ----------------------------------------------------------------------
    async def _on_assigned(self, sender: object, assigned: set[TP], **kwargs: object) -> None:
        self.loop = asyncio.get_running_loop()  # where the thread's seeks run
        changelogs = set(self.app.tables.changelog_topics)
        self.assigned = frozenset(tp for tp in assigned if tp.topic not in changelogs)
        self.clocks = {}  # every clock starts again with the new assignment

    async def _on_revoked(self, sender: object, revoked: set[TP], **kwargs: object) -> None:
        self.assigned = frozenset()
        self.clocks = {}

    # -- the thread -------------------------------------------------------------------------------------------------
    def start(self) -> Watchdog:
        if self.bound > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def healthy(self) -> tuple[bool, dict]:
        """For /health: False (and what stalled) while a stall lasts."""
        stalls = self.stalls
        if not stalls:
            return True, {"status": "ok"}
        return False, {"status": "stalled", "reason": REASON, "stalls": [s.describe() for s in stalls]}

    def _run(self) -> None:
        every = check_seconds(self.bound)
        while not self._stop.wait(every):
            try:
                self.look(time.monotonic())
            except Exception:  # the broker away for a moment: the next look tries again
                log.warning("watchdog: could not look at the agents' input", exc_info=True)

    def look(self, now: float) -> list[Stall]:
        assigned = self.assigned
        readers = self.app._perpflow_handled.readers if hasattr(self.app, "_perpflow_handled") else {}
        inputs = getattr(self.app, "_perpflow_inputs", {})
        rebalance = self._rebalance_stall(now)
        if not assigned:
            self._update(rebalance)
            return rebalance
        ends = end_offsets(self.bootstrap, sorted({tp.topic for tp in assigned}))
        committed: dict[tuple[str, int], int] | None = None
        clocks = self.clocks
        stalls = []
        for tp in sorted(assigned):
            end = ends.get((tp.topic, tp.partition))
            if end is None:
                continue
            for agent in sorted(readers.get(tp.topic, ())):
                contiguous = inputs.get(agent)
                position = contiguous.position(tp) if contiguous is not None else None
                known = position is not None  # the agent's own position (not the group's, before the seek)
                if position is None:  # not sought to its start yet: where the group stands
                    if committed is None:
                        committed = self._committed()
                    position = committed.get((tp.topic, tp.partition), 0)
                clock = clocks.get((agent, tp))
                if clock is None or clock.position != position or position >= end:
                    clocks[(agent, tp)] = _Clock(position, now)
                elif (now - clock.since >= self.bound / 2 and not clock.nudged and known
                      and self.app.consumer.flow_active and not self.app.in_recovery):
                    clock.nudged = True
                    self._nudge(agent, tp, position, end, now - clock.since)
                elif now - clock.since >= self.bound:
                    stalls.append(Stall(agent, catalog_name(self.app, tp.topic), tp.partition, position, end,
                                        now - clock.since))
        stalls += self._held_stalls(now, assigned, inputs) + rebalance
        self._update(stalls)
        return stalls

    def _rebalance_stall(self, now: float) -> list[Stall]:
        """A rebalance that lasts the bound is a stall: seen in the rebalance soak (seed 11, every run), the last
        worker re-joining the group every 8 s at one generation and never assigned anything while the input waited —
        no partition is assigned, so the input clocks never see it. Faust's `rebalancing` is set when
        partitions are revoked and cleared once the new assignment's recovery is done."""
        if not self.app.rebalancing:
            self.rebalancing_since = None
            return []
        if self.rebalancing_since is None:
            self.rebalancing_since = now
        seconds = now - self.rebalancing_since
        return [Stall("consumer", REBALANCE, 0, 0, 0, seconds)] if seconds >= self.bound else []

    def _nudge(self, agent: str, tp: TP, position: int, end: int, seconds: float) -> None:
        """Half the bound without progress: seek the partition to the agent's position once, before calling it a
        stall. Seen in the rebalance soak (~1 run in 10 after a hand-over): a sparse partition (md.funding) whose
        records the consumer never hands again after the rebalance's seek, nothing skipped, no gap open; a seek
        starts its fetch again. Counted (perpflow_agent_input_refetches_total{agent="watchdog"})."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        log.warning("watchdog: %s[%d] handed nothing to %s for %.0f s with %d records waiting; seeking it to %d "
                    "(consumer: %s)", tp.topic, tp.partition, agent, seconds, end - position, position,
                    consumer_flow(self.app, tp))
        metrics.AGENT_INPUT_REFETCHES.labels(ACTOR).inc()
        asyncio.run_coroutine_threadsafe(self._seek(tp, position), loop)

    async def _seek(self, tp: TP, position: int) -> None:
        try:
            await self.app.consumer.seek(tp, position)
        except Exception as exc:  # revoked meanwhile: its next owner starts from the committed offset
            log.warning("watchdog: could not seek %s[%d] to %d: %s", tp.topic, tp.partition, position, exc)

    def _held_stalls(self, now: float, assigned: frozenset[TP], inputs: dict) -> list[Stall]:
        stalls = []
        for agent, probe in getattr(self.app, "_perpflow_holders", {}).items():
            try:
                held, _ = probe()
            except RuntimeError:  # the agent changed what it holds while this thread counted: the next look
                continue
            contiguous = inputs.get(agent)
            positions = tuple(contiguous.position(tp) for tp in sorted(assigned)) if contiguous else ()
            progress = hash((held, positions))
            key = (agent, TP(HELD, 0))
            clock = self.clocks.get(key)
            if held == 0 or clock is None or clock.position != progress:
                self.clocks[key] = _Clock(progress, now)
            elif now - clock.since >= self.bound:
                stalls.append(Stall(agent, HELD, 0, 0, held, now - clock.since))
        return stalls

    def _committed(self) -> dict[tuple[str, int], int]:
        if self._admin is None:
            self._admin = AdminClient(client_config(self.bootstrap))
        return committed_offsets(self._admin, self.group)

    def _update(self, stalls: list[Stall]) -> None:
        self.stalls = stalls
        metrics.WORKER_STALLED.set(1 if stalls else 0)
        keys = {(s.agent, TP(s.topic, s.partition)) for s in stalls}
        if not stalls:
            if self.episode:
                log.warning("watchdog: the agents take their input again (trading stays HALTED until an operator "
                            "starts it)")
            self.episode = set()
            return
        new = [s for s in stalls if (s.agent, TP(s.topic, s.partition)) not in self.episode]
        if not new:
            return
        for s in new:
            if s.topic == HELD:
                _, holding = self.app._perpflow_holders[s.agent]()
                log.critical("watchdog: %s; /health fails, trading HALTED (%s)", s.describe(), holding)
                continue
            if s.topic == REBALANCE:
                log.critical("watchdog: %s; /health fails, trading HALTED (generation %s)", s.describe(),
                             self.app.consumer_generation_id)
                continue
            tp = TP(self.prefix + s.topic, s.partition)
            contiguous = getattr(self.app, "_perpflow_inputs", {}).get(s.agent)
            log.critical("watchdog: %s; /health fails, trading HALTED (consumer: %s; agent: %s)", s.describe(),
                         consumer_flow(self.app, tp), contiguous.describe(tp) if contiguous else "?")
        self._announce(new)
        self.episode |= keys

    def _announce(self, stalls: list[Stall]) -> None:
        """HALT trading and say why, on `control` and `risk.events`."""
        now_ms = int(time.time() * 1000)
        try:
            publish(self.bootstrap, TRADING_ENTITY, "trading_state", {"state": HALTED, "flatten": False,
                    "reason": REASON}, ACTOR, now_ms, token=self.token, prefix=self.prefix)
        except Exception:
            log.exception("watchdog: could not publish the HALT on control")
        risk_events = topic("risk.events")
        codec = default_codec()
        producer = Producer(producer_config(self.bootstrap, **{"linger.ms": 0}))
        for s in stalls:
            record = {"event_id": event_ids.risk_event(REASON, "", now_ms, s.agent, s.topic, s.partition),
                      "event_time": now_ms, "symbol": "", "kind": REASON, "severity": "critical",
                      "detail": json.dumps({"agent": s.agent, "topic": s.topic, "partition": s.partition,
                                            "position": s.position, "end": s.end, "waiting": s.end - s.position,
                                            "seconds": round(s.seconds, 1)}, sort_keys=True),
                      "source": ACTOR}
            producer.produce(self.prefix + risk_events.name, codec.encode(risk_events.schema, record), REASON.encode())
        if producer.flush(15):
            log.error("watchdog: the chain_stalled risk events were not acknowledged by the broker")
