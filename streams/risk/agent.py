"""The risk agent: `signals` (+ `user.events`, the connectors' `risk.events`, operator commands on `control`) →
exactly one `risk.verdicts` record per signal, `orders` for approved entries and forced closes, the guard's own
`risk.events`, and its trading-state changes on `control`. The rules are `streams.risk.guard`; this is the wiring.

Paper trading (the default; `PERPFLOW_PAPER_TRADING=false` when an execution connector trades an account) runs the
paper exchange's engine here (`streams.risk.paper_desk`): the agent also reads `md.klines` and `md.funding` and
holds the signals until every symbol has passed their time (`streams.risk.event_order`); then, time by time, it
applies every symbol's bars of that time to the engine (fills of earlier orders, stops, targets, funding), decides
that time's signals in symbol order and hands their orders to the engine — the event-time order a live account
has, whatever the replay speed and however the symbols' messages interleave, so a backtest fills as live and the
same backtest gives the same verdicts every time. The engine's events go to `user.events`.

State: the guard's whole book (account, positions, trading state), the paper engine and the held signals are
saved before every offset commit, in the `risk-state` table (changelog topic), under the key of the last partition
handled with a sequence number, and each signals partition's held signals under that partition's own key; a
restarted worker takes the newest snapshot of its table and the held signals of the partitions it owns, then reads
`control` to its end and applies the operator commands newer than the book's. The account is one book per
worker: the embedded default runs one worker, which owns every partition (with several workers, each guards the
symbols it owns and sees the account through their events; run the risk agent on one worker when account-wide limits
must be exact).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import faust
from faust.types import TP

from connectors.binance.rules import leverage_brackets
from connectors.paper.engine import PaperConfig
from schemas.catalog import SYMBOL_PARTITIONS
from schemas.codec import DecodeError
from streams import metrics
from streams.app import kafka_name, topic_prefix
from streams.batch_agent import BatchAgent, read_to_end
from streams.broker import key_partition, read_messages
from streams.control import ControlReader, control_record, control_token
from streams.features.engine import SymbolFeatures
from streams.risk.book_copy import ACCOUNT, BookCopy, newest_snapshot
from streams.risk.event_order import EventTimeOrder
from streams.risk.guard import STATES, TRADING_ENTITY, Book, Limits, RiskGuard
from streams.risk.paper_desk import INTERVAL, PaperDesk
from streams.settings import Settings
from streams.watchdog import hold_probe

log = logging.getLogger(__name__)

STATE_TABLE = "risk-state"
BOOK_KEY, WAITING_KEY = b"book:", b"waiting:"  # the state table's keys: the book (+ partition), held signals of one
ANSWERED_TAIL = 1000  # records read back on `signals` per partition after a rebalance (a bar time per symbol each)
CONTROL_POLL_SECONDS = 0.5


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_margin_usage=settings.risk_max_margin_usage, daily_loss=settings.risk_daily_loss,
        max_drawdown=settings.risk_max_drawdown, min_liq_distance_atr=settings.risk_min_liq_distance_atr,
        max_funding_rate=settings.risk_max_funding_rate, max_symbol_exposure=settings.risk_max_symbol_exposure,
        fat_finger_multiple=settings.risk_fat_finger_multiple,
        max_orders_per_minute=settings.risk_max_orders_per_minute,
        live_stale_ms=int(settings.risk_stale_seconds * 1000), allow_pyramiding=settings.risk_allow_pyramiding,
        initial_equity=settings.paper_balance, close_retry_ms=int(settings.risk_close_retry_seconds * 1000))


def paper_config(settings: Settings) -> PaperConfig:
    return PaperConfig(settings.paper_taker_fee, settings.paper_slippage_bps, settings.paper_leverage,
                       settings.paper_balance)


class RiskAgent(BatchAgent):
    name = "risk"
    input_topics = ("signals", "user.events", "risk.events")
    output_topics = ("risk.verdicts", "orders", "risk.events", "control", "user.events", "risk.book")

    def __init__(self, app: Any, settings: Settings) -> None:
        self.paper = settings.paper_trading
        if self.paper:
            self.input_topics = (*self.input_topics, "md.klines", "md.funding")
            self.read_along = frozenset({"md.klines", "md.funding"})  # the features agent's inputs
        self.paper_config = paper_config(settings)
        self.brackets = leverage_brackets(settings.home_dir)  # the policy's table: bundled, overlaid by imports
        self.desk: PaperDesk | None = PaperDesk(self.paper_config, brackets=self.brackets) if self.paper else None
        self.waiting: dict[str, list[tuple[int, dict]]] = {}  # symbol → signals held until their time is decided
        # signals partitions whose held signals changed since the last save: each partition's are also saved under
        # its own key, on its own changelog partition, so the worker a partition is handed to holds them (the book
        # it keeps may be another worker's, whose `waiting` never had them: verdicts went missing in the soak)
        self.waiting_changed: set[int] = set()
        self.order = EventTimeOrder()
        self.partition_of: dict[str, int] = {}
        self.paper_events: list[dict] = []
        self.fed = 0  # orders of the guard's current outputs already handed to the paper engine
        super().__init__(app)
        self.bootstrap = settings.kafka_bootstrap  # run_worker sets the worker's own
        self.limits = limits_from(settings)
        self.guard = RiskGuard(self.limits, brackets=self.brackets)
        self.table = app.Table(STATE_TABLE, partitions=SYMBOL_PARTITIONS, key_type=bytes, value_type=bytes,
                               on_recover=self._on_recovered)
        self.seq = 0
        self.book_copy = BookCopy()  # the book's durable copy, through the archive (the embedded broker forgets)
        self.dirty: int | None = None  # the partition to save the book under after this batch
        self.restore = True
        self.clocks_unchecked = False  # a restored book's event-time clocks not yet told what the group handled
        self.control: ControlReader | None = None
        self.token = control_token(settings)  # operators' commands are verified with it, the guard's own signed
        self.liq_shown: set[tuple[str, str]] = set()
        self.latest: dict[str, dict] = {}  # symbol → its newest verdict, for GET /signals/latest
        self.snapshot: dict = {}  # what the control API shows; replaced whole, read from the API's threads
        for state in STATES:
            metrics.TRADING_STATE.labels(state)
        for verdict, reason in (("approved", "flat"), ("approved", "entry")):
            metrics.RISK_VERDICTS.labels(verdict, reason)  # series from the start, not from the first verdict
        self._export()
        metrics.DAILY_LOSS_LIMIT.set(self.limits.daily_loss)
        app.timer(CONTROL_POLL_SECONDS)(self.poll_control)
        hold_probe(app, self.name, self._holding)
        app.on_before_shutdown.connect(self._last_copy)

    async def _last_copy(self, app: Any, **kwargs: Any) -> None:
        """Stopping: the book's last change, which the timer has not sent yet, to `risk.book`."""
        late = self.book_copy.due(float("inf"))
        if late is not None:
            self.send([("risk.book", None, ACCOUNT.encode(), late)])
            await self.output.delivered()

    async def _on_recovered(self) -> None:
        self.restore = True

    def _restore(self, copy: dict | None = None) -> None:
        """The newest book in the table (its snapshots carry a sequence number), or `copy`, from `risk.book`."""
        self.restore = False
        newest: dict | None = copy
        for key, blob in self.table.data.items():
            if not key.startswith(BOOK_KEY):
                continue
            snap = json.loads(blob)
            if newest is None or snap["seq"] > newest["seq"]:
                newest = snap
        if newest is not None and newest["seq"] > self.seq:
            self.seq = newest["seq"]
            self.guard = RiskGuard(self.limits, Book.loads(newest["book"]), self.brackets)
            if self.paper:
                self.desk = PaperDesk(self.paper_config, newest.get("desk"), self.brackets)
            self.waiting = {s: [(p, r) for p, r in held] for s, held in newest.get("waiting", {}).items()}
            self.order = EventTimeOrder(newest.get("order"))
            self.fed = 0
            log.info("risk: book restored (trading %s, %d positions)", self.guard.book.state,
                     len(self.guard.book.positions))
        self._held_of_owned_partitions()

    def _held_of_owned_partitions(self) -> None:
        """The held signals of each signals partition this worker owns are the ones its partition's key holds (saved
        by whoever owned it last, before committing past them); those of a partition handed away are its new
        owner's to decide."""
        name = kafka_name(self.app, "signals")
        owned = {tp.partition for tp in self.app.consumer.assignment() if tp.topic == name}
        if not owned:
            return  # not assigned yet (a first start): nothing to tell apart
        held: dict[str, list[tuple[int, dict]]] = {}
        # a partition's own key wins; the book's `waiting` stands for a partition without one (a snapshot of an
        # older version, or the archived copy `risk.book` gives an embedded `up` started again)
        for symbol, entries in self.waiting.items():
            kept = [(p, r) for p, r in entries if p in owned and WAITING_KEY + str(p).encode() not in self.table.data]
            if kept:
                held[symbol] = kept
        for p in sorted(owned):
            blob = self.table.data.get(WAITING_KEY + str(p).encode())
            for record in json.loads(blob) if blob else ():
                held.setdefault(record["symbol"], []).append((p, record))
        for entries in held.values():
            entries.sort(key=lambda e: e[1]["open_time"])
        before = sum(len(e) for e in self.waiting.values())
        self.waiting = held
        after = sum(len(e) for e in held.values())
        if before or after:
            log.info("risk: held signals after the hand-over: %d (%d before)", after, before)

    async def _ready(self) -> None:
        if self.restore:
            copy = None
            if self.seq == 0 and not any(k.startswith(BOOK_KEY) for k in self.table.data):
                # a broker that kept nothing (embedded `up` restarted)
                copy = await asyncio.get_running_loop().run_in_executor(None, newest_snapshot, self.bootstrap,
                                                                        topic_prefix(self.app))
            self._restore(copy)
            self.clocks_unchecked = True
        if self.clocks_unchecked:
            await self._answered_by_the_group()
        if self.control is None:
            self.control = ControlReader(self.bootstrap, "perpflow-risk-control", self.token, topic_prefix(self.app))
            records = await asyncio.get_running_loop().run_in_executor(None, self.control.catch_up)
            self._apply_control(records)

    async def _answered_by_the_group(self) -> None:
        """After a rebalance: the signals the group has handled up to its committed offsets on `signals` (maybe on
        another worker, while the book this worker took over waited for them) will not come here again, and the bars
        they answered are answered. Without this, a bar pending in a book taken over held the cursor, and so every
        symbol's verdicts, for good (seen in the rebalance soak: every signal after the hand-over held back)."""
        name = kafka_name(self.app, "signals")
        starts = {tp.partition: self.app._perpflow_starts.get(tp) for tp in self.app.consumer.assignment()
                  if tp.topic == name}
        if not starts or None in starts.values():
            return  # not sought to the start yet: the first batch does it
        self.clocks_unchecked = False
        ranges = {p: (max(start - ANSWERED_TAIL, 0), start) for p, start in starts.items() if start > 0}
        if not ranges:
            return
        newest = await asyncio.get_running_loop().run_in_executor(None, self._newest_signals, ranges)
        for symbol, open_time in newest.items():
            self.order.signal(symbol, open_time)
        if newest:
            log.info("risk: signals the group handled before this worker's start: %s", newest)

    def _newest_signals(self, ranges: dict[int, tuple[int, int]]) -> dict[str, int]:
        newest: dict[str, int] = {}
        messages = read_messages(self.bootstrap, kafka_name(self.app, "signals"),
                                 starts={p: a for p, (a, _) in ranges.items()},
                                 ends={p: b for p, (_, b) in ranges.items()}, timeout=30)
        for msg in messages:
            try:
                _, record = self.codec.decode(msg.value())
            except DecodeError:  # dead-lettered when it was handled
                continue
            newest[record["symbol"]] = max(newest.get(record["symbol"], record["open_time"]), record["open_time"])
        return newest

    def _owned(self, symbol: str) -> bool:
        """Whether this worker has the symbol's partition now."""
        partition = self.partition_of.get(symbol)
        if partition is None:
            partition = key_partition(symbol.encode(), SYMBOL_PARTITIONS)
        assigned = self.app.consumer.assignment()
        return not assigned or TP(kafka_name(self.app, "signals"), partition) in assigned  # none: unknown yet

    def _apply_control(self, records: list[dict]) -> bool:
        applied = False
        for record in records:
            if record["entity"] == TRADING_ENTITY and self.guard.control(record):
                log.warning("risk: trading %s by %s (%s)", self.guard.book.state, record["actor"],
                            self.guard.book.state_reason)
                applied = True
        return applied

    async def poll_control(self) -> None:
        """Operator commands; held signals that a symbol's feed going quiet now lets through; and, trading an
        account, the closes due again (the guard's clock is the wall clock there; paper's is event time, on signals)."""
        if self.app.in_recovery:
            return
        if self.control is None:  # no input yet: the book restored all the same, so /status shows it
            if self.app.assignor.assigned_actives():
                async with self.lock:
                    await self._ready()
                    self._export()
            return
        late = self.book_copy.due(time.monotonic())  # the last change of a burst of saves
        if late is not None:
            async with self.lock:
                self.send([("risk.book", None, ACCOUNT.encode(), late)])
                await self.output.delivered()
        records = self.control.poll()
        live = self.desk is None
        due = live and self.guard.close_due(int(time.time() * 1000))
        if not records and not any(self.waiting.values()) and not due:
            return
        async with self.lock:
            now = int(time.time() * 1000)
            decided = self._decide(now)
            retried = live and self.guard.tick(now)
            if self._apply_control(records) or decided or retried:
                self.send(self._outputs())
                self.dirty = 0 if self.dirty is None else self.dirty
                await self.output.delivered()  # the outputs before the state that made them
                self.save()
                await self.output.delivered()

    async def handle(self, inputs: list[tuple[str, int, bytes, dict]]) -> list[tuple[str, int | None, bytes, dict]]:
        await self._ready()
        guard, now = self.guard, int(time.time() * 1000)
        if self.desk is None:  # trading an account: the guard's clock is the wall clock, before anything is timed
            guard.tick(now)
        for name, partition, _, record in inputs:
            self.dirty = partition
            if name in ("signals", "md.klines", "md.funding"):
                symbol = record["symbol"]
                self.partition_of[symbol] = partition
                if name == "signals":
                    self.waiting.setdefault(symbol, []).append((partition, record))
                    self.waiting_changed.add(partition)
                    self.order.signal(symbol, record["open_time"])
                elif name == "md.klines":
                    if record["interval"] == INTERVAL and _answered(record):
                        self.order.bar(symbol, record["open_time"])
                    self._paper(self.desk.kline(record))
                else:
                    self.desk.funding(record)
            elif name == "user.events":
                if self.desk is None or record["source"] != "paper":  # the paper engine's are handled already
                    guard.user_event(record)
            elif record["source"] != "risk":  # risk.events: the connectors' (our own come back too)
                guard.connector_event(record)
        self._decide(now)
        return self._outputs()

    def _decide(self, now: int) -> int:
        """Give the held signals their verdicts; how many. Live (no paper desk) each as it comes. Paper: those up
        to the time every symbol has passed, time by time: every symbol's bars up to that time to the paper engine,
        then that time's signals in symbol order, each verdict's orders to the engine before the next verdict."""
        decided = 0
        if self.desk is None:
            for symbol, held in self.waiting.items():
                while held:
                    decided += self._verdict(symbol, now)
            return decided
        cursor = self.order.cursor(self._idle, self._owned)
        times = sorted({s["open_time"] for held in self.waiting.values() for _, s in held if s["open_time"] <= cursor})
        for t in times:
            # (a signal older than t is one delivered again after a restart: its verdict is repeated at once)
            due = sorted(symbol for symbol, held in self.waiting.items() if held and held[0][1]["open_time"] <= t)
            if not all(self.desk.ready_for(symbol, t) for symbol in due):
                break  # a bar its symbol's signal answers is still on its way: nothing from this time on yet
            for symbol in sorted(self.desk.held):
                self._paper(self.desk.release(symbol, t))
            for symbol in due:
                while self.waiting[symbol] and self.waiting[symbol][0][1]["open_time"] <= t:
                    decided += self._verdict(symbol, now)
        metrics.RISK_HELD_SIGNALS.set(sum(len(held) for held in self.waiting.values()))
        return decided

    def _verdict(self, symbol: str, now: int) -> int:
        """The symbol's oldest held signal gets its verdict, its orders go to the paper engine."""
        partition, signal = self.waiting[symbol].pop(0)
        self.waiting_changed.add(partition)
        # the chain lagged the market data by more than the desk holds: those bars were applied without their
        # signals, and an entry now would fill bars later than its signal's
        passed = self.desk.passed(symbol, signal["open_time"]) if self.desk is not None else 0
        self.guard.signal(signal, partition, now, passed)
        self._feed()
        if signal["source"] in ("binance",):
            metrics.E2E_LATENCY.observe(max(now - signal["event_time"], 0) / 1000)
        return 1

    def _holding(self) -> tuple[int, str]:
        """For the watchdog (its own thread): how many signals are held, and per symbol what holds them."""
        held = {s: list(h) for s, h in list(self.waiting.items())}
        clocks = dict(self.order.clocks)
        parts = []
        for symbol in sorted(set(held) | set(clocks)):
            first = held[symbol][0][1]["open_time"] if held.get(symbol) else None
            clock = clocks.get(symbol)
            ready = self.desk.ready_for(symbol, first) if self.desk is not None and first is not None else None
            parts.append(f"{symbol}: {len(held.get(symbol, ()))} held from {first}, passed "
                         f"{clock.passed() if clock else None}, pending {clock.pending[:3] if clock else None}, "
                         f"bar applied {ready}")
        return sum(len(h) for h in held.values()), "; ".join(parts)

    def _idle(self, symbol: str) -> bool:
        """Whether the symbol's market data is handled to the end of its partition now (its feed is quiet)."""
        partition = self.partition_of.get(symbol)
        if partition is None or self.waiting.get(symbol):
            return False
        tp = TP(kafka_name(self.app, "md.klines"), partition)
        return read_to_end(self.app, tp, max(self.processed.get(tp, -1), self.handing.get(tp, -1)))

    def _paper(self, events: list[dict]) -> None:
        """The paper engine's events: to the guard now, to `user.events` with the batch."""
        for event in events:
            self.guard.user_event(event)
            self._feed()  # a fill may make the guard close (a kill that came while the entry was on its way)
        self.paper_events += events

    def _feed(self) -> None:
        if self.desk is not None:
            orders = self.guard.out.orders
            for _, order in orders[self.fed:]:
                self.desk.order(order)
            self.fed = len(orders)

    def _outputs(self) -> list[tuple[str, int | None, bytes, dict]]:
        self._feed()  # orders made outside a signal (an operator's kill) reach the paper engine too
        out, self.fed = self.guard.take_outputs(), 0
        sends: list[tuple[str, int | None, bytes, dict]] = []
        for ev in self.paper_events:
            sends.append(("user.events", self.partition_of.get(ev["symbol"]), ev["symbol"].encode(), ev))
        self.paper_events = []
        for v in out.verdicts:
            self.latest[v["symbol"]] = {k: v[k] for k in ("event_time", "open_time", "decision", "verdict", "action",
                                                          "violations", "intent_id", "signal_id")}
            sends.append(("risk.verdicts", self._partition(v["symbol"]), v["symbol"].encode(), v))
            reason = "flat" if v["decision"] == "FLAT" else "entry"
            for r in v["violations"] or [reason]:
                metrics.RISK_VERDICTS.labels(v["verdict"].lower(), r).inc()
        for partition, order in out.orders:
            sends.append(("orders", partition, order["symbol"].encode(), order))
            log.info("risk: %s %s %s (%s)", order["action"], order["symbol"], order["side"], order["reason"])
        for partition, ev in out.risk_events:
            key = (ev["symbol"] or "account").encode()
            sends.append(("risk.events", partition if ev["symbol"] else None, key, ev))
        now = int(time.time() * 1000)
        for change in out.control:  # wall-clock stamped, as operators' commands: the newest is the state
            now = max(now, self.guard.book.control_time + 1)
            self.guard.book.control_time = now
            sends.append(("control", 0, TRADING_ENTITY.encode(),
                          control_record(TRADING_ENTITY, "trading_state", change, "risk", now, self.token)))
        self._export()
        return sends

    def _partition(self, symbol: str) -> int | None:
        mark = self.guard.book.marks.get(symbol)
        return mark.partition if mark else None

    def save(self) -> None:
        if self.dirty is None:
            return
        self.seq += 1
        key = BOOK_KEY + str(self.dirty).encode()
        # the book's and the desk's JSON are put in as they are, not as strings escaped once more (the desk's held
        # bars make it the bulk of each save); a snapshot of an older version holds them as strings, read alike
        desk = self.desk.dumps() if self.desk is not None else "null"
        body = (f'"book": {self.guard.book.dumps()}, "waiting": {json.dumps(self.waiting)}, '
                f'"order": {json.dumps(self.order.to_state())}, "desk": {desk}')
        self.output.save(self.table, self.dirty, key, f'{{"seq": {self.seq}, {body}}}'.encode())
        self.dirty = None
        for p in sorted(self.waiting_changed):
            of_p = [r for held in self.waiting.values() for q, r in held if q == p]
            self.output.save(self.table, p, WAITING_KEY + str(p).encode(), json.dumps(of_p).encode())
        self.waiting_changed.clear()
        copy = self.book_copy.offer(self.seq, body, self.guard.book, time.monotonic())
        if copy is not None:  # acknowledged with the table write, before the inputs are committed
            self.send([("risk.book", None, ACCOUNT.encode(), copy)])

    def _export(self) -> None:
        g, b = self.guard, self.guard.book
        for state in STATES:
            metrics.TRADING_STATE.labels(state).set(1 if b.state == state else 0)
        metrics.ACCOUNT_EQUITY.set(g.equity())
        metrics.ACCOUNT_DRAWDOWN.set(g.drawdown())
        metrics.DAILY_PNL.set(g.daily_pnl())
        shown = set()
        for symbol, pos in b.positions.items():
            distance = g.liq_distance_atr(symbol)
            if distance is not None:
                labels = (symbol, "long" if pos.side > 0 else "short")
                metrics.LIQ_DISTANCE.labels(*labels).set(distance)
                shown.add(labels)
        for labels in self.liq_shown - shown:  # a closed position has no distance
            metrics.LIQ_DISTANCE.remove(*labels)
        self.liq_shown = shown
        self.snapshot = {
            "trading_state": b.state, "reason": b.state_reason, "held_state": b.held_state,
            "automatic_halts": list(b.auto_halts), "equity": g.equity(), "drawdown": g.drawdown(),
            "daily_pnl": g.daily_pnl(), "margin_used": g.margin_used(), "wallet_balance": b.balance,
            "last_bar": {s: m.event_time for s, m in b.marks.items()}, "latest": dict(self.latest),
            "positions": {s: {"side": "LONG" if p.side > 0 else "SHORT", "status": p.status, "quantity": p.quantity,
                              "entry": p.entry, "leverage": p.leverage, "margin": p.margin, "closing": p.closing,
                              "liq_price": g.liq_price(s), "liq_distance_atr": g.liq_distance_atr(s)}
                          for s, p in b.positions.items()}}


def _answered(bar: dict) -> bool:
    """Whether the chain makes a signal of this bar: the features agent dead-letters an invalid one."""
    try:
        SymbolFeatures.check_bar(bar)
    except ValueError:
        return False
    return True


def register(app: faust.App, settings: Settings) -> RiskAgent:
    return RiskAgent(app, settings)
