"""The running stack of one `perpflow up`: what it started (embedded broker, embedded store) or
connected to (external Kafka, ClickHouse server), the topics and tables it ensured, its control
API, and `$PERPFLOW_HOME/run/stack.json`, through which other commands find it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from confluent_kafka import Producer

from connectors.clickhouse_store import Store
from schemas.catalog import Topic, archived
from schemas.codec import default_codec
from streams.broker import EmbeddedBroker, ensure_topics, producer_config
from streams.control_api import ControlApi
from streams.errors import PerpflowError
from streams.output import MAX_RECORD_BYTES
from streams.settings import Settings
from streams.topic_health import TopicHealth

log = logging.getLogger(__name__)


@dataclass
class StackInfo:
    pid: int
    bootstrap: str
    api_url: str
    store: str
    broker_pid: int | None  # the embedded broker's pid, None for an external cluster

    @staticmethod
    def path(settings: Settings) -> Path:
        return settings.run_dir / "stack.json"

    @classmethod
    def load(cls, settings: Settings) -> StackInfo | None:
        """The running stack of this PERPFLOW_HOME, or None (a stale file of a dead process is ignored)."""
        try:
            info = cls(**json.loads(cls.path(settings).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        try:
            os.kill(info.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return info


# which of a compacted topic's archived records to seed, read from the store (e.g. `perpflow up` seeds the risk book as
# it stood before its replay's first bar, not a newer one the replay would contradict)
SeedFilter = Callable[[Topic, Store], list[dict]]


def seed_compacted(bootstrap: str, store: Store, keep: SeedFilter | None = None) -> dict[str, int]:
    """Every compacted topic's state as the archive holds it → the topic: per key the newest record, with its own
    event id (the sink archives it again as the same row). The embedded broker keeps nothing across a restart, and
    what these topics hold is state, not history: the trading state and promoted models (`control`), the execution
    lifecycles (`execution.intents`), the risk agent's book (`risk.book`). Records read back as they were written."""
    codec, seeded, errors = default_codec(), {}, []
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 5, "message.max.bytes": MAX_RECORD_BYTES}))
    for t in archived():
        if not t.compacted:
            continue
        records = keep(t, store) if keep is not None else store.newest_per_key(t)
        for record in records:
            producer.produce(t.name, codec.encode(t.schema, record), str(record[t.order_by[0]]).encode(),
                             on_delivery=lambda err, _: errors.append(str(err)) if err else None)
        seeded[t.name] = len(records)
    if producer.flush(30) or errors:
        raise PerpflowError(f"the embedded broker at {bootstrap} did not take the state restored from the archive "
                            f"({'; '.join(errors[:3]) or 'timed out'})")
    return seeded


class Stack:
    def __init__(self, settings: Settings, seed_filter: SeedFilter | None = None):
        self.settings = settings
        self.seed_filter = seed_filter
        self.broker: EmbeddedBroker | None = None
        self.store: Store | None = None
        self.api: ControlApi | None = None
        self.health: TopicHealth | None = None
        self._stop = threading.Event()
        self.bootstrap = settings.kafka_bootstrap

    def __enter__(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        from streams.control import control_token, promote_route

        s = self.settings
        s.run_dir.mkdir(parents=True, exist_ok=True)
        token = control_token(s)  # first: an API bound beyond loopback without a token refuses before anything starts
        running = StackInfo.load(s)
        if running and running.pid != os.getpid():
            raise PerpflowError(f"perpflow up is already running for {s.home_dir} (pid {running.pid}); "
                                "stop it first or set PERPFLOW_HOME to another directory")
        self.store = Store(s)  # first: it claims the embedded store, so two ups fail fast
        if not self.bootstrap:
            self.broker = EmbeddedBroker(log_path=s.run_dir / "broker.log").start()
            self.bootstrap = self.broker.bootstrap
        created = ensure_topics(self.bootstrap)
        log.info("topics ready (%d created) on %s", len(created), self.bootstrap)
        self.store.ensure_tables(archived())
        if self.broker is not None:  # memory only: the compacted topics' state comes back from the archive
            seeded = seed_compacted(self.bootstrap, self.store, self.seed_filter)
            if any(seeded.values()):
                log.info("state restored from the archive: %s", ", ".join(f"{n} {t}" for t, n in seeded.items()))
        self.health = TopicHealth(self.bootstrap)
        self._health_thread = threading.Thread(target=self.health.run, args=(self._stop,), name="topic-health",
                                               daemon=True)
        self._health_thread.start()
        self.api = ControlApi(s.metrics_host, s.metrics_port, self.store, self.health,
                              routes={("POST", "/models"): promote_route(self.store, self.bootstrap, token)},
                              token=token).start()
        broker_pid = self.broker.process.pid if self.broker else None
        # no password in a file other commands read: a process that needs the store reads its own settings
        info = StackInfo(os.getpid(), self.bootstrap, self.api.url, s.clickhouse_where, broker_pid)
        StackInfo.path(s).write_text(json.dumps(asdict(info)))
        log.info("metrics and control API on %s", self.api.url)

    def close(self) -> None:
        self._stop.set()
        path = StackInfo.path(self.settings)
        try:
            if path.exists() and json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
        if self.api:
            self.api.stop()
            self.api = None
        if self.health:  # its Kafka clients must be gone before the broker is
            self._health_thread.join(10)
            self.health = None
        if self.store:
            self.store.close()
            self.store = None
        if self.broker:
            self.broker.stop()
            self.broker = None
