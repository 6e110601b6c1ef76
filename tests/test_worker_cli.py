"""`perpflow worker` beside a running `perpflow up`, as the README scales out: no PERPFLOW_KAFKA_BOOTSTRAP set, the
worker finds the broker through the stack's run/stack.json, and its agents' own clients (the predict agent's
promotions on `control`, the risk agent's book) reach that broker too — it died at start on the missing setting."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import PERPFLOW, ROOT, cli_env

pytestmark = pytest.mark.e2e


def _wait(what: str, condition, timeout: float, *alive: subprocess.Popen, log=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in alive:
            assert proc.poll() is None, f"{what}: {proc.args[1]} exited ({proc.returncode}): " + \
                (log.read_text()[-3000:] if log else "")
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.3)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_a_second_worker_beside_up_finds_the_broker_and_runs_every_agent(tmp_path):
    home = tmp_path / "home"
    env = cli_env(home)
    assert not any(k == "PERPFLOW_KAFKA_BOOTSTRAP" for k in env)
    up_log, worker_log = tmp_path / "up.log", tmp_path / "worker.log"
    with up_log.open("w") as up_out, worker_log.open("w") as worker_out:
        up = subprocess.Popen([PERPFLOW, "up", "--source", "none"], env=env, cwd=ROOT, stdout=up_out,
                              stderr=subprocess.STDOUT)
        worker = None
        try:
            run = home / "run"
            _wait("up's stack and worker", lambda: (run / "stack.json").exists() and any(run.glob("worker-*.json")),
                  120, up, log=up_log)
            worker = subprocess.Popen([PERPFLOW, "worker"], env=env, cwd=ROOT, stdout=worker_out,
                                      stderr=subprocess.STDOUT)
            info = run / f"worker-{worker.pid}.json"
            _wait("the second worker's control API", info.exists, 120, worker, up, log=worker_log)
            api = json.loads(info.read_text())["api_url"]
            _wait("the second worker healthy", lambda: _healthy(api), 60, worker, log=worker_log)
            time.sleep(5)  # joined the group beside up's worker, every agent started
            assert worker.poll() is None, worker_log.read_text()[-3000:]
            assert _healthy(api)
        finally:
            for proc in (worker, up):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    assert "Traceback" not in worker_log.read_text(), worker_log.read_text()[-3000:]
