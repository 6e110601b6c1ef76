"""The Faust app that runs the decision-chain agents (features → predictions → signals → risk).

Agents register on the app returned by `create_app`; `perpflow worker` runs it (as its own
process: `perpflow up` starts one, Kubernetes scales them). Settings follow the facts measured on
the embedded broker: at-least-once (Tansu has no transactions, so no exactly_once), a short group
session so joins take seconds, `earliest` offset reset, and a lean sensor — Faust's default Monitor
costs tens of µs per message, which the hot path cannot afford.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import faust
from faust.sensors.monitor import Monitor
from faust.types import TP

from schemas.catalog import SYMBOL_PARTITIONS
from streams import input_offsets, metrics
from streams.broker import end_offsets
from streams.output import MAX_RECORD_BYTES


class LeanMonitor(Monitor):
    """Faust's monitor without the per-message bookkeeping; perpflow exports its own metrics."""

    def on_message_in(self, tp, offset, message):  # noqa: D102
        pass

    def on_stream_event_in(self, tp, offset, stream, event):  # noqa: D102
        return None

    def on_stream_event_out(self, tp, offset, stream, event, state=None):  # noqa: D102
        pass

    def on_message_out(self, tp, offset, message):  # noqa: D102
        pass

    def on_send_initiated(self, producer, topic, message, keysize, valsize):  # noqa: D102
        return None

    def on_send_completed(self, producer, state, metadata):  # noqa: D102
        pass


APP_ID = "perpflow"  # also the Kafka consumer group of the agents


def app_id_for(prefix: str) -> str:
    """The app id (= consumer group, and the stem of the tables' changelog topics) of the agents reading topics
    named with `prefix`: a backtest's run (`bt.<run>.`) gets groups and changelogs of its own, so its tables never
    restore a live worker's state or another run's."""
    return APP_ID if not prefix else f"{APP_ID}-{prefix.rstrip('.')}"


def topic_prefix(app: faust.App) -> str:
    """The prefix of every topic this app's agents read and write (empty for the live topics)."""
    return getattr(app, "perpflow_topic_prefix", "")


def kafka_name(app: faust.App, name: str) -> str:
    """A catalog topic name → the topic the agents of `app` use."""
    return topic_prefix(app) + name


def catalog_name(app: faust.App, name: str) -> str:
    """A topic the agents of `app` use → its catalog name (what the agents' code dispatches on)."""
    prefix = topic_prefix(app)
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def raw_topic(app: faust.App, *names: str) -> faust.TopicT:
    """The agents' one way to make a topic: catalog names, prefixed for the app, raw bytes (perpflow's codec)."""
    return app.topic(*(kafka_name(app, n) for n in names), key_serializer="raw", value_serializer="raw")


def _use_fetch_highwaters(bootstrap: str) -> None:
    """Faust's table recovery reads a changelog up to the highwater from ListOffsets, which Tansu under-reports
    when the last batch holds several records: the newest state (a batch's last keys) would silently not be
    restored. Take the high-watermarks from fetch responses instead (`streams.broker.end_offsets`)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    async def _highwaters(self, partitions):
        ends = await asyncio.get_running_loop().run_in_executor(
            None, end_offsets, bootstrap, sorted({tp.topic for tp in partitions}))
        return {tp: ends.get((tp.topic, tp.partition), 0) for tp in partitions}

    AIOKafkaConsumerThread._highwaters = _highwaters


FETCH_MAX_WAIT_MS = 10


def _short_fetch_wait() -> None:
    """Faust builds its consumer with fetch_max_wait_ms=1500; a fetch of partitions with nothing new is held that
    long by the broker before it answers. A short wait costs a few more fetch requests per second."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    create = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "_perpflow", False):
        return

    def _create_worker_consumer(self, transport):
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer

    _create_worker_consumer._perpflow = True
    AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer


def _only_agents_commit() -> None:
    """Faust commits on its own (every broker_commit_interval, on a rebalance, on stop) the offsets its streams
    acked — and a stream acks its events as the agent takes them, long before a stateful agent
    has saved what the batch changed (the risk agent saves its book once a second, before its own commit). Every
    perpflow agent commits what it handled and saved itself (`streams.batch_agent.commit_handled`, which calls the
    consumer's low-level `_commit`), so Faust's high-level commit is switched off: at worst a restart handles again
    what it had handled, never skips what it had not saved."""
    from faust.transport.consumer import Consumer

    if getattr(Consumer.commit, "_perpflow", False):
        return

    async def commit(self, topics=None, start_new_transaction: bool = True) -> bool:
        return False

    commit._perpflow = True
    Consumer.commit = commit


def _deliver_without_tasks() -> None:
    """Faust's fetch loop hands each message to the streams through `wait_first(callback(message),
    suspend_flow.wait())`, racing the delivery against a flow suspension (a rebalance): four tasks and an
    asyncio.wait per message, measured at about a sixth of the worker's CPU on the decision chain. The delivery
    almost never suspends (the streams' queues have room), so it is run at once; only one that does suspend (a full
    queue) or a flow already suspended takes Faust's race, for the rest of it."""
    from faust.transport.consumer import Consumer
    from mode.services import WaitResults

    race = Consumer.wait_first
    if getattr(race, "_perpflow", False):
        return

    async def wait_first(self, *coros, timeout=None):
        first = coros[0]
        if (timeout is not None or len(coros) != 2 or not asyncio.iscoroutine(first) or self.suspend_flow.is_set()
                or self._stopped.is_set() or self._crashed.is_set()):
            return await race(self, *coros, timeout=timeout)
        try:
            step = first.send(None)
        except StopIteration as done:
            coros[1].close()  # the suspension's wait, never started
            return WaitResults([first], [done.value], False)
        except BaseException:
            coros[1].close()
            raise
        return await race(self, _finish(first, step), coros[1], timeout=timeout)

    wait_first._perpflow = True
    Consumer.wait_first = wait_first


async def _finish(coro, step):
    """Drive the rest of a coroutine that already ran to its first suspension (`step`: what it awaited), as a
    task would; cancelled, the cancellation is thrown into it."""
    try:
        while True:
            if step is None:  # a bare yield (asyncio.sleep(0))
                await asyncio.sleep(0)
            else:
                await asyncio.wait((step,))  # its own await then takes the future's result or exception
            try:
                step = coro.send(None)
            except StopIteration as done:
                return done.value
    except asyncio.CancelledError:
        try:
            coro.throw(asyncio.CancelledError())
        except (StopIteration, asyncio.CancelledError):
            pass
        else:
            coro.close()
        raise


class _ReadOffsets(defaultdict):
    """Faust's consumer's last offset handed per partition (`Consumer._read_offset`), which its fetch loop sets after
    handing each record and below which it drops records — except while a seek awaits its first record: then only
    that record's offset moves it (`awaiting`, set by `_keep_seeks`)."""

    def __init__(self) -> None:
        super().__init__(lambda: None)
        self.awaiting: dict = {}  # partition → the offset it was sought to

    def __setitem__(self, tp, offset) -> None:
        awaiting = self.awaiting.get(tp)
        if awaiting is not None:
            if offset is not None and offset != awaiting:
                metrics.AGENT_INPUT_SKIPPED.labels("consumer", "fetched_before_seek").inc()
                return  # a record fetched before the seek, handed after it
            del self.awaiting[tp]
        super().__setitem__(tp, offset)


def _keep_seeks() -> None:
    """A seek must bring the records it was made for. Faust's fetch loop hands the records of one fetch one by one,
    across awaits (a full agent queue makes a delivery wait), and after each it sets the partition's read offset,
    below which it drops records. A seek made meanwhile — an agent seeking back to a gap in its input
    (`streams.input_offsets`) — sets that offset back, but the rest of the fetch, past the sought offset, is still
    handed and moves it up again: the records the seek was for, fetched next, then fall below it and are dropped
    before any agent sees them. The agent kept waiting for an offset that never came, and with no newer record to
    hand (the replay held back by the chain's back-pressure, or at its end) the chain stopped for good with input
    left. So after a seek the read offset moves only with the sought record (`_ReadOffsets`); the stale records
    between are counted (perpflow_agent_input_skipped{agent="consumer", reason="fetched_before_seek"})."""
    from faust.transport.consumer import Consumer

    init = Consumer.__init__
    if getattr(init, "_perpflow", False):
        return
    seek, perform_seek = Consumer.seek, Consumer.perform_seek

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._read_offset = _ReadOffsets()

    async def seek_kept(self, partition, offset):
        await seek(self, partition, offset)  # sets the read offset to `offset`
        self._read_offset.awaiting[partition] = offset or 0

    async def perform_seek_to_committed(self):
        self._read_offset.awaiting.clear()  # the committed offsets replace every seek; the agents seek again
        await perform_seek(self)

    __init__._perpflow = True
    Consumer.__init__, Consumer.seek, Consumer.perform_seek = __init__, seek_kept, perform_seek_to_committed


def _recover_changelogs_from_their_start() -> None:
    """Faust starts reading an active table's changelog partition after the offset it read last in this process,
    kept in a Counter: a partition it never read counts as read up to offset 0, so a changelog partition holding a
    single record is never restored (a risk book saved once would be forgotten by a restart), and a partition read
    once, revoked (the in-memory store then drops its keys) and assigned back is restored only from where it was
    left. The in-memory store has nothing of its own: every recovery reads the changelog from its start."""
    from faust.tables.recovery import Recovery

    build = Recovery._build_offsets
    if getattr(build, "_perpflow", False):
        return

    async def _build_offsets(self, consumer, tps, destination, title):
        if title == "active":
            for tp in tps:
                destination[tp] = None
        await build(self, consumer, tps, destination, title)

    _build_offsets._perpflow = True
    Recovery._build_offsets = _build_offsets


def consumer_flow(app: faust.App, tp: TP) -> str:
    """What Faust's consumer knows of one partition, for a stall's log line: assigned, fetched (active), paused
    (recovery, a rebalance), buffer-full (an agent's queue), the last offset handed and a seek it awaits."""
    consumer = app.consumer
    try:
        active, paused = consumer._active_partitions or set(), consumer._paused_partitions
        buffered, read = consumer._buffered_partitions, consumer._read_offset
        awaiting = getattr(read, "awaiting", {}).get(tp)
        return (f"assigned={tp in consumer.assignment()} active={tp in active} paused={tp in paused} "
                f"buffer_full={tp in buffered} handed={read.get(tp)} awaiting_seek={awaiting} "
                f"flow_active={consumer.flow_active}")
    except Exception as exc:  # the consumer stopping: say so rather than fail the report
        return f"consumer state unknown ({type(exc).__name__})"


def create_app(bootstrap: str, app_id: str | None = None, web_port: int | None = None,
               datadir: str | None = None, prefix: str = "") -> faust.App:
    _use_fetch_highwaters(bootstrap)
    _short_fetch_wait()
    _only_agents_commit()
    _recover_changelogs_from_their_start()
    _deliver_without_tasks()
    _keep_seeks()
    app_id = app_id or app_id_for(prefix)
    app = faust.App(
        app_id,
        datadir=datadir or f"{app_id}-data",  # Faust's working files; perpflow keeps them under PERPFLOW_HOME
        broker=f"kafka://{bootstrap}",
        store="memory://",  # tables are rebuilt from their changelog topics on restart
        processing_guarantee="at_least_once",
        topic_partitions=SYMBOL_PARTITIONS,
        topic_replication_factor=1,
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        value_serializer="raw",  # perpflow's Avro codec decodes, so bad input reaches the dead-letter topic
        key_serializer="raw",
        web_enabled=web_port is not None,
        web_port=web_port or 6066,
        Monitor=LeanMonitor,
        # a table value holds a symbol's state and the events it holds back (a backlog can hold many)
        producer_max_request_size=MAX_RECORD_BYTES,
        producer_linger_ms=5,  # agents send a micro-batch at a time: a few ms fill a request instead of one each
    )
    app.perpflow_topic_prefix = prefix
    input_offsets.install(app)  # each agent's inputs handed from the committed offsets, in order, once
    return app
