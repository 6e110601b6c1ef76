"""The decision chain never stops silently (streams/watchdog.py), on the real broker with real workers:

- an agent that stops taking its input (PERPFLOW_TEST_STALL_AGENT makes the predict agent's handler wait for ever)
  turns the worker unhealthy (/health 503), HALTs trading (a signed `control` record, actor watchdog, which the
  worker's own risk agent applies), publishes a critical chain_stalled risk event naming the partition, and sets
  perpflow_worker_stalled;
- a worker whose input is simply idle, through its warm-up and long after, stays healthy and HALTs nothing;
- rebalances mid-replay (a second worker of the group joining and leaving, SIGTERM and SIGKILL): every bar of the
  bundled real data has its features record, its signal and its verdict, and the chain drains."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from benchmarks import rebalance
from schemas.codec import default_codec
from streams.broker import ensure_topics
from streams.settings import Settings
from streams.worker import WorkerProcess, _info_path
from tests.conftest import read_topic
from tests.test_sink import kline, produce

pytestmark = pytest.mark.e2e

BOUND = 4.0  # PERPFLOW_WATCHDOG_SECONDS in these tests


def health(worker: WorkerProcess) -> tuple[int, dict] | None:
    try:
        info = json.loads(_info_path(worker.log_path.parent, worker.process.pid).read_text())
        with urllib.request.urlopen(info["api_url"] + "/health", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except (OSError, ValueError, KeyError):
        return None


def status(worker: WorkerProcess) -> dict:
    info = json.loads(_info_path(worker.log_path.parent, worker.process.pid).read_text())
    with urllib.request.urlopen(info["api_url"] + "/status", timeout=10) as response:
        return json.loads(response.read())


def bars(bootstrap: str, symbol: str, first: int, last: int) -> None:
    codec = default_codec()
    produce(bootstrap, [("md.klines", symbol, codec.encode("kline", kline(symbol, i))) for i in range(first, last)])


def wait_for(what: str, condition, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)
    return time.monotonic() - started


def watchdog_records(bootstrap: str) -> tuple[list[dict], list[dict]]:
    halts = [r for r in read_topic(bootstrap, "control") if r["actor"] == "watchdog"]
    stalls = [r for r in read_topic(bootstrap, "risk.events") if r["kind"] == "chain_stalled"]
    return halts, stalls


def start_worker(broker, home, **env: str) -> WorkerProcess:
    ensure_topics(broker.bootstrap)
    settings = Settings(home=home, kafka_bootstrap=broker.bootstrap, clickhouse_url="", worker_metrics_port=0,
                        symbols=["ETHUSDT"], watchdog_seconds=BOUND, control_token="watchdog-test")
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    return WorkerProcess(settings, broker.bootstrap)


def test_a_worker_whose_agent_stops_taking_input_turns_unhealthy_and_halts(broker, home, monkeypatch):
    monkeypatch.setenv("PERPFLOW_TEST_STALL_AGENT", "predict:5")  # stalls once it has handled 5 features records
    worker = start_worker(broker, home)
    try:
        bars(broker.bootstrap, "ETHUSDT", 0, 10)
        wait_for("the first signals", lambda: len(read_topic(broker.bootstrap, "signals")) >= 5, 120)
        assert health(worker) == (200, {"status": "ok"})
        signals = len(read_topic(broker.bootstrap, "signals"))
        bars(broker.bootstrap, "ETHUSDT", 10, 20)  # features keeps making records the stuck predict never takes
        wait_for("/health failing", lambda: (health(worker) or (0,))[0] == 503, BOUND + 60)
        code, answer = health(worker)
        assert answer["reason"] == "chain_stalled" and "predict" in answer["stalls"][0]
        assert "features[" in answer["stalls"][0]
        assert worker.metric("perpflow_worker_stalled") == 1
        wait_for("the watchdog's HALT and risk event", lambda: all(watchdog_records(broker.bootstrap)), 30)
        halts, stalls = watchdog_records(broker.bootstrap)
        assert len(halts) == 1 and halts[0]["entity"] == "trading" and halts[0]["signature"]
        assert json.loads(halts[0]["value"]) == {"state": "HALTED", "flatten": False, "reason": "chain_stalled"}
        assert len(stalls) == 1 and stalls[0]["severity"] == "critical" and stalls[0]["source"] == "watchdog"
        detail = json.loads(stalls[0]["detail"])
        assert detail["agent"] == "predict" and detail["topic"] == "features" and detail["waiting"] > 0
        assert detail["seconds"] >= BOUND  # not before the bound
        # the worker's own risk agent (not stalled) took the HALT: no new entries
        wait_for("the risk agent HALTED", lambda: status(worker)["trading_state"] == "HALTED", 30)
        assert len(read_topic(broker.bootstrap, "signals")) == signals  # the stall was real: nothing got through
        time.sleep(3 * BOUND)
        assert len(watchdog_records(broker.bootstrap)[0]) == 1  # one HALT per stall, not one per look
        stuck = worker.process.pid
        worker.check()  # what perpflow up does with its worker, as Kubernetes' liveness probe would: a restart
        assert worker.restarts == 1 and worker.process.pid != stuck and worker.process.poll() is None
    finally:
        worker.stop(grace=5)


def test_idle_input_and_the_warm_up_do_not_trip_the_watchdog(broker, home):
    worker = start_worker(broker, home)
    try:
        wait_for("the worker's API", lambda: health(worker) is not None, 120)
        time.sleep(2 * BOUND)  # joining, recovering, nothing to read
        bars(broker.bootstrap, "ETHUSDT", 0, 10)
        wait_for("every signal", lambda: len(read_topic(broker.bootstrap, "signals")) == 10, 120)
        time.sleep(4 * BOUND)  # input idle, long past the bound
        assert health(worker) == (200, {"status": "ok"})
        assert worker.metric("perpflow_worker_stalled") == 0
        assert watchdog_records(broker.bootstrap) == ([], [])
        assert status(worker)["trading_state"] == "RUNNING"
    finally:
        worker.stop(grace=5)


def test_rebalances_mid_replay_lose_no_bar_and_do_not_stall(tmp_path):
    result = rebalance.run_once(tmp_path, rebalance.QUICK_CYCLES, seed=1, say=lambda line: None)
    assert result.rebalances == 2 * rebalance.QUICK_CYCLES
    assert result.stalled is None
    assert result.bars == 4032  # a week of 5m bars of two symbols
    assert result.missing == {"features": 0, "signals": 0, "risk.verdicts": 0}
    assert result.watchdog_stalls == 0


def test_records_held_back_without_progress_are_a_stall_and_progress_clears_it():
    """An agent that holds records (risk: signals until every symbol has passed their time) with nothing left to
    read is stalled too when what it holds does not move for the bound: the chain's output stopped with no input
    waiting, which the input clocks alone never see."""
    from streams.app import create_app
    from streams.watchdog import HELD, Watchdog, hold_probe

    app = create_app("127.0.0.1:1", app_id="watchdog-held-test")
    held = {"n": 3}
    hold_probe(app, "risk", lambda: (held["n"], f"{held['n']} held from 0"))
    dog = Watchdog(app, "127.0.0.1:1", BOUND, "token")
    assert dog._held_stalls(0.0, frozenset(), {}) == []  # the clock starts
    assert dog._held_stalls(BOUND - 0.1, frozenset(), {}) == []
    [stall] = dog._held_stalls(BOUND + 0.1, frozenset(), {})
    assert (stall.agent, stall.topic, stall.end) == ("risk", HELD, 3)
    assert "holds 3 records" in stall.describe()
    held["n"] = 1  # two released: progress, the clock starts again
    assert dog._held_stalls(BOUND + 0.2, frozenset(), {}) == []
    held["n"] = 0  # nothing held is never a stall, however long
    assert dog._held_stalls(10 * BOUND, frozenset(), {}) == []


def test_a_rebalance_that_does_not_end_is_a_stall_and_its_end_clears_it():
    """A consumer re-joining its group without ever being assigned (seen in the rebalance soak) has no partition, so
    no input clock: the rebalance itself lasting the bound is the stall."""
    from streams.app import create_app
    from streams.watchdog import REBALANCE, Watchdog

    app = create_app("127.0.0.1:1", app_id="watchdog-rebalance-test")
    dog = Watchdog(app, "127.0.0.1:1", BOUND, "token")
    dog._update = lambda stalls: None  # what the look finds, without a broker to announce it on
    assert app.rebalancing is False and dog.look(0.0) == []
    app.on_rebalance_start()
    assert dog.look(1.0) == []  # the clock starts
    assert dog.look(1.0 + BOUND - 0.1) == []
    [stall] = dog.look(1.0 + BOUND + 0.1)
    assert (stall.agent, stall.topic) == ("consumer", REBALANCE)
    assert "in a rebalance for" in stall.describe()
    app.rebalancing = False  # the assignment's recovery done (Faust's on_rebalance_end)
    assert dog.look(2 * BOUND) == []
    app.on_rebalance_start()  # the next rebalance has a clock of its own
    assert dog.look(2 * BOUND + 1) == [] and dog.look(3 * BOUND) == []
