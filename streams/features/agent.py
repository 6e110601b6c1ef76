"""The features agent: md.klines (+ md.markprice, md.funding, md.openinterest) → `features`, one record per symbol
and closed 5m bar, computed by the same SymbolFeatures as the offline build.

Shape of the hot path (Faust costs ~50–80 µs per message in its stream layer): one agent reads the market-data
topics and `features.btc` in micro-batches (`streams.batch_agent.micro_batches`); each symbol's FeatureSequencer
puts its events back in event-time order and releases the bars whose context is complete; outputs of a batch are
sent together.

Exactly-once by construction on an at-least-once broker (Tansu has no transactions):
- the state (engine + held events) of a symbol is written to the `features-state` table (changelog topic) only
  after the batch's outputs are acknowledged, and a batch ends (its inputs become committable, by this agent or by
  Faust) only once those changelog records are acknowledged too. A crash replays inputs since the last commit
  against a state that is at least as new as the commit and at most as new as the outputs: bars already done are
  dropped by the engine (open_time not after the last), context already applied is applied again idempotently, and
  a re-emitted record has the same event_id (the archive deduplicates on it). Recovery restores the table from its
  changelog, so indicators continue, never restart.

BTC context on every partition: symbols live on different partitions (maybe different workers), but each bar of
ETHUSDT needs BTCUSDT's EMA50/EMA200/return of the same bar. Released BTC bars are written to *every* partition of
`features.btc` (one message per partition and micro-batch), a topic this agent also reads; co-partitioned with
md.*, it brings BTC's snapshots to the worker owning a symbol's partition, next to the symbol's bars (a worker
that owns BTC's partition too hands them over in memory at once). A bar waits for BTC's snapshot of its open_time
(or a later one: BTC has no such bar → btc fields null, as offline), for at most BTC_WAIT_SECONDS when BTC is
silent, and not at all when BTCUSDT is not among the configured symbols. Snapshots are kept in the table per
partition (key `btc:<partition>:<open_time>`) until every symbol of the partition is past them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import faust
from faust.types import TP

from schemas.catalog import SYMBOL_PARTITIONS
from schemas.codec import DecodeError, default_codec
from streams import metrics
from streams.app import catalog_name, kafka_name, raw_topic
from streams.batch_agent import (
    BATCH_EVENTS,
    commit_handled,
    forget,
    micro_batches,
    read_to_end,
    reads,
    send_dead_letter,
)
from streams.features.engine import BTC_SYMBOL, INTERVAL, BtcSnapshot, SymbolFeatures
from streams.features.sequencer import BTC_TOPIC, INPUT_TOPICS, KIND_KLINE, TOPIC_OF_KIND, FeatureSequencer
from streams.input_offsets import ContiguousInput
from streams.output import agent_output
from streams.settings import Settings

log = logging.getLogger(__name__)

OUTPUT_TOPIC = "features"
STATE_TABLE = "features-state"
STREAM_SOURCE = "stream"
# live, BTC's close arrives within a second or two of the others'; "read BTC to its end" is no signal here, as a
# live consumer always is: a bar that waited this long goes without BTC (counted), as offline would without data
BTC_WAIT_SECONDS = 10.0
TICK_SECONDS = 1.0
COMMIT_SECONDS = 1.0
KEEP_BTC_SNAPSHOTS = 2016  # a week of bars, for a partition none of whose symbols has started yet


class FeaturesAgent:
    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.codec = default_codec()
        self.schema_of = {name: self.codec.full_name(stem) for name, stem in
                          [("md.klines", "kline"), ("md.markprice", "mark_price"), ("md.funding", "funding"),
                           ("md.openinterest", "open_interest"), (BTC_TOPIC, "btc_snapshot")]}
        self.table = app.Table(STATE_TABLE, partitions=SYMBOL_PARTITIONS, key_type=bytes, value_type=bytes,
                               on_recover=self._on_recovered)
        self.reload = False
        self.inputs = raw_topic(app, *INPUT_TOPICS, BTC_TOPIC)
        self.output = agent_output(app)
        self.features_topic = kafka_name(app, OUTPUT_TOPIC)
        self.btc_topic = kafka_name(app, BTC_TOPIC)
        self.dead_letters = kafka_name(app, "deadletter")
        self.expect_btc = BTC_SYMBOL in settings.symbols
        # caches of the table, rebuilt after a rebalance
        self.sequencers: dict[str, tuple[FeatureSequencer, int]] = {}  # symbol → (sequencer, partition)
        self.btc: dict[int, dict[int, BtcSnapshot]] = {}  # partition → open_time → snapshot
        self.btc_saved: dict[int, set[int]] = {}  # partition → open_times of the snapshots in the table
        self.processed: dict[TP, int] = {}  # offset of the last message taken in, per input partition
        self.saved: dict[TP, int] = {}  # ... whose effects (outputs, state) are saved: what may be committed
        self.btc_waiting_since: dict[tuple[str, int], float] = {}
        self.lock = asyncio.Lock()  # the agent's batches and the timer's ticks take turns
        self.generation = 0  # bumped by a revocation: a batch that awaited across one drops what it was doing
        self.input = ContiguousInput(app, "features")
        self.last_commit = 0.0
        self.committed: dict[TP, int] = {}  # self.saved when last committed
        app.agent(self.inputs, name="features")(self.run)
        reads(app, "features", (*INPUT_TOPICS, BTC_TOPIC))
        app.timer(TICK_SECONDS)(self.tick)
        app.on_partitions_revoked.connect(self._on_revoked)

    async def _on_revoked(self, app: Any, revoked: Any, **kwargs: Any) -> None:
        # not under self.lock: a batch holding it may be waiting on a commit that waits for this rebalance
        self.generation += 1
        for symbol in self.sequencers:
            metrics.FEATURES_HELD_BARS.labels(symbol).set(0)  # no longer this worker's
        self.sequencers.clear()
        self.btc.clear()
        self.btc_saved.clear()
        self.processed.clear()
        self.saved.clear()
        self.committed.clear()
        self.input.reset()
        forget(self.app, "features")

    async def _on_recovered(self) -> None:
        self.reload = True  # the next tick loads every symbol of the partitions this worker now owns

    def _load_owned(self) -> None:
        """Sequencers of every symbol in the table whose partition this worker owns: bars they hold are released
        by ticks even when no new input for them ever comes (the end of a replay, a rebalance)."""
        owned = {tp.partition for tp in self.app.assignor.assigned_actives()
                 if tp.topic == kafka_name(self.app, "md.klines")}
        for key, blob in list(self.table.data.items()):
            if key.startswith(b"btc:") or key.decode() in self.sequencers:
                continue
            state = json.loads(blob)
            if state["partition"] in owned:
                seq = FeatureSequencer.from_state(state["sequencer"])
                self.sequencers[key.decode()] = (seq, state["partition"])
                log.debug("%s restored on partition %d: last bar %s, %d bars held", key.decode(), state["partition"],
                          seq.engine.last_open_time, seq.pending())

    async def run(self, stream: faust.StreamT) -> None:
        busy = metrics.AGENT_BUSY.labels("features")
        async for events in micro_batches(stream, BATCH_EVENTS):
            async with self.lock:
                started = time.perf_counter()
                touched, new_btc = self._intake(events)
                await self.input.settle()
                await self._release(touched, new_btc)
                busy.inc(time.perf_counter() - started)

    async def tick(self) -> None:
        """Bars held while no input arrives (waiting for a silent BTC, at the end of a replay) are released by
        time, not only by the next message."""
        if self.app.in_recovery:
            return
        async with self.lock:
            if self.input.gaps:  # sought back to again even when nothing more is handed
                await self.input.settle()
            if self.reload:
                self.reload = False
                self._load_owned()
            if any(seq.pending() for seq, _ in self.sequencers.values()):
                await self._release(set(), {})
            else:
                await self._commit()  # the last batch's offsets, when no batch follows it

    # -- one micro-batch --------------------------------------------------------------------------------------------
    def _intake(self, events: list[faust.EventT]) -> tuple[set[str], dict[int, list[int]]]:
        """Decode and hold the batch's events; bad ones go to the dead-letter topic."""
        touched: set[str] = set()
        new_btc: dict[int, list[int]] = {}
        for event in events:
            msg = event.message
            if not self.input.admit(msg):
                continue
            self.processed[msg.tp] = msg.offset
            source = catalog_name(self.app, msg.topic)
            try:
                name, record = self.codec.decode(msg.value)
                if name != self.schema_of[source]:
                    raise DecodeError("wrong_schema", f"{name} on a topic of {self.schema_of[source]}")
                if source == BTC_TOPIC:
                    snaps = self._btc(msg.partition)
                    for bar in record["bars"]:
                        snaps[bar["open_time"]] = BtcSnapshot(bar["open_time"], bar["ema_50"], bar["ema_200"],
                                                              bar["r_1"])
                        new_btc.setdefault(msg.partition, []).append(bar["open_time"])
                    continue
                kind = INPUT_TOPICS[source]
                if kind == KIND_KLINE:
                    if record["interval"] != INTERVAL:
                        continue  # other intervals are not this agent's input
                    SymbolFeatures.check_bar(record)
            except (DecodeError, ValueError) as exc:
                if not isinstance(exc, DecodeError):
                    exc = DecodeError("invalid_value", str(exc))
                send_dead_letter(self.output, self.dead_letters, self.codec, msg, exc)
                continue
            symbol = record["symbol"]
            self._sequencer(symbol, msg.partition).add(kind, record)
            touched.add(symbol)
        return touched, new_btc

    async def _release(self, touched: set[str], new_btc: dict[int, list[int]]) -> None:
        """Release what can be, send it, and once it is acknowledged save the state of what changed."""
        generation = self.generation
        released: set[str] = set()
        # BTC first: its snapshots reach this worker's other symbols in the same batch (the copies arriving later
        # through features.btc change nothing); other workers get them from the topic
        for symbol, (seq, partition) in sorted(self.sequencers.items(), key=lambda kv: not kv[1][0].engine.is_btc):
            if not seq.pending() and symbol not in touched:
                continue
            dropped = seq.engine.dropped
            records = seq.release(lambda kind, p=partition: self._context_complete(kind, p),
                                  lambda ot, s=symbol, p=partition: self._btc_lookup(s, p, ot))
            metrics.FEATURES_HELD_BARS.labels(symbol).set(seq.pending())
            if seq.engine.dropped > dropped:
                metrics.FEATURES_DROPPED_BARS.labels(symbol).inc(seq.engine.dropped - dropped)
            if not records:
                continue
            released.add(symbol)
            key, send, encode = symbol.encode(), self.output.send, self.codec.encode
            for r in records:
                send(self.features_topic, key, encode("features", r), partition)
            if seq.engine.is_btc:
                self._broadcast_btc(records)
                for p in {p for _, p in self.sequencers.values()}:
                    snaps = self._btc(p)
                    snaps.update((r["open_time"], BtcSnapshot(r["open_time"], r["ema_50"], r["ema_200"], r["r_1"]))
                                 for r in records)
            metrics.FEATURES_EMITTED.labels(symbol).inc(len(records))
            metrics.FEATURES_GAP_BARS.labels(symbol).inc(sum(r["gap_bars"] for r in records))
            metrics.FEATURES_LAST_CLOSE.labels(symbol).set(records[-1]["close_time"] / 1000)
        await self.output.delivered()  # outputs acknowledged before the state says they were made
        if generation != self.generation:
            # revoked meanwhile: the symbols' state is the next owner's, restored from the changelog, and these
            # inputs are handled again from the committed offsets (the records just sent come again, same ids)
            return
        for symbol in touched | released:
            seq, partition = self.sequencers[symbol]
            state = {"partition": partition, "sequencer": seq.to_state()}
            self.output.save(self.table, partition, symbol.encode(), json.dumps(state).encode())
        for partition, open_times in new_btc.items():
            self._save_btc(partition, open_times)
        # the changelog acknowledged before any commit can cover this batch's inputs: a commit that overtook them
        # lost the state a SIGKILL came before
        await self.output.delivered()
        # only now are this batch's inputs covered by saved state: a batch cancelled midway (a rebalance) must
        # not have its offsets committed by a later tick
        self.saved.update(self.processed)
        await self._commit()

    async def _commit(self) -> None:
        """Commit what was handled, once a second, after the state that covers it is flushed."""
        if time.monotonic() - self.last_commit < COMMIT_SECONDS or self.saved == self.committed:
            return
        self.last_commit = time.monotonic()
        snapshot = dict(self.saved)
        if await commit_handled(self.app, "features", snapshot):
            self.committed = snapshot  # a failed commit is retried by the next tick

    # -- inputs ----------------------------------------------------------------------------------------------------
    def _sequencer(self, symbol: str, partition: int) -> FeatureSequencer:
        cached = self.sequencers.get(symbol)
        if cached is not None:
            return cached[0]
        blob = self.table.data.get(symbol.encode())
        if blob is not None:
            seq = FeatureSequencer.from_state(json.loads(blob)["sequencer"])
        else:
            seq = FeatureSequencer(SymbolFeatures(symbol, STREAM_SOURCE))
        self.sequencers[symbol] = (seq, partition)
        return seq

    def _context_complete(self, kind: int, partition: int) -> bool:
        return self._read_to_end(TP(kafka_name(self.app, TOPIC_OF_KIND[kind]), partition))

    def _read_to_end(self, tp: TP) -> bool:
        return read_to_end(self.app, tp, self.processed.get(tp))

    def _btc(self, partition: int) -> dict[int, BtcSnapshot]:
        snaps = self.btc.get(partition)
        if snaps is None:
            snaps = self.btc[partition] = {}
            prefix = f"btc:{partition}:".encode()
            saved = self.btc_saved[partition] = set()
            for key, blob in self.table.data.items():
                if key.startswith(prefix):
                    ot = int(key[len(prefix):])
                    snaps[ot] = BtcSnapshot(*json.loads(blob))
                    saved.add(ot)
        return snaps

    def _btc_lookup(self, symbol: str, partition: int, open_time: int) -> tuple[bool, BtcSnapshot | None]:
        if not self.expect_btc:
            return True, None
        snaps = self._btc(partition)
        snap = snaps.get(open_time)
        if snap is not None or (snaps and max(snaps) > open_time):
            self.btc_waiting_since.pop((symbol, open_time), None)
            return True, snap
        since = self.btc_waiting_since.setdefault((symbol, open_time), time.monotonic())
        if time.monotonic() - since < BTC_WAIT_SECONDS:
            return False, None
        del self.btc_waiting_since[(symbol, open_time)]
        metrics.FEATURES_BTC_TIMEOUTS.labels(symbol).inc()
        log.warning("%s bar %d: no BTCUSDT snapshot after %.0f s; btc features null", symbol, open_time,
                    BTC_WAIT_SECONDS)
        return True, None

    # -- outputs and state -------------------------------------------------------------------------------------------
    def _broadcast_btc(self, records: list[dict]) -> None:
        value = self.codec.encode("btc_snapshot", {"event_time": records[-1]["event_time"], "bars": [
            {"open_time": r["open_time"], "ema_50": r["ema_50"], "ema_200": r["ema_200"], "r_1": r["r_1"]}
            for r in records]})
        key = BTC_SYMBOL.encode()
        for p in range(SYMBOL_PARTITIONS):
            self.output.send(self.btc_topic, key, value, p)

    def _save_btc(self, partition: int, open_times: list[int]) -> None:
        """Keep the snapshots that arrived in the table, unless every symbol of the partition is past them."""
        snaps = self._btc(partition)
        saved = self.btc_saved.setdefault(partition, set())
        starts = [seq.engine.last_open_time for seq, p in self.sequencers.values()
                  if p == partition and not seq.engine.is_btc]
        if starts and None not in starts:
            past = min(starts)  # type: ignore[type-var]
        else:
            past = sorted(snaps)[-KEEP_BTC_SNAPSHOTS - 1] if len(snaps) > KEEP_BTC_SNAPSHOTS else -1
        for ot in open_times:
            if ot > past and ot in snaps and ot not in saved:
                self.output.save(self.table, partition, f"btc:{partition}:{ot}".encode(),
                                 json.dumps(list(snaps[ot])).encode())
                saved.add(ot)
        for ot in [ot for ot in snaps if ot <= past]:
            del snaps[ot]
            if ot in saved:
                saved.discard(ot)
                self.output.save(self.table, partition, f"btc:{partition}:{ot}".encode(), None)


def register(app: faust.App, settings: Settings) -> FeaturesAgent:
    return FeaturesAgent(app, settings)
