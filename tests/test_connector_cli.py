"""`perpflow connector …`: one connector as its own process, as the compose services and Kubernetes Deployments run
it, through the CLI against the real (embedded) broker and the fake exchange. The market connector backfills and
streams closed klines onto md.klines and serves /metrics and /health; live execution and the user data stream
run as two processes without publishing any user event twice; a wrong argument is one line and exit code 2, and
there is no paper connector (the worker's risk agent is the paper exchange)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from confluent_kafka import Producer

from connectors.binance.execution import client_ids
from connectors.binance.user_stream import PARSERS
from schemas.codec import default_codec
from streams.broker import producer_config
from tests.conftest import PERPFLOW, ROOT, cli_env, free_port, read_topic, run_cli
from tests.fake_binance import API_KEY, API_SECRET, FakeBinance

NOW = 1_704_240_000_000  # 2024-01-03 00:00 UTC
BAR = 300_000


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for(what: str, predicate, procs: list[subprocess.Popen], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.poll() is None, f"{p.args} exited {p.returncode}: {p.stderr.read()}"
        try:
            if predicate():
                return
        except OSError:  # its /metrics is not up yet
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def start(home, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([PERPFLOW, "connector", *args], env=cli_env(home, **env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    assert proc.returncode in (0, 130), stderr  # SIGTERM unwinds like Ctrl-C
    return stderr


def test_a_wrong_connector_is_one_line_and_exit_code_2(tmp_path):
    for args in (["orderbook"], [], ["user", "--start", "2024-01-01"], ["paper"]):
        result = run_cli(tmp_path / "home", "connector", *args, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("perpflow connector: "), (args, result.stderr)
    assert "market, user, execution" in run_cli(tmp_path / "home", "connector", timeout=60).stderr


def test_there_is_no_paper_connector(tmp_path):
    """The paper exchange runs in the worker's risk agent (PERPFLOW_PAPER_TRADING): a second one reading `orders`
    would fill every order twice. `connector paper` is a one-line error naming the valid parts."""
    result = run_cli(tmp_path / "home", "connector", "paper", timeout=60)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("perpflow connector: ") and "'paper'" in line
    assert all(f"'{part}'" in line for part in ("market", "user", "execution")), line


def test_live_connectors_need_the_api_key(tmp_path):
    result = run_cli(tmp_path / "home", "connector", "execution", PERPFLOW_KAFKA_BOOTSTRAP="127.0.0.1:1",
                     timeout=60)
    assert result.returncode == 1 and "PERPFLOW_BINANCE_API_KEY" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_execution_connector_refuses_to_run_next_to_paper_trading(tmp_path):
    """With PERPFLOW_PAPER_TRADING true (the default) the workers' risk agent fills every order on paper: a live
    execution connector next to it would trade the same orders twice over."""
    keys = {"PERPFLOW_BINANCE_API_KEY": API_KEY, "PERPFLOW_BINANCE_API_SECRET": API_SECRET,
            "PERPFLOW_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    result = run_cli(tmp_path / "home", "connector", "execution", timeout=60, **keys)
    assert result.returncode == 1 and "PERPFLOW_PAPER_TRADING=false" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_market_connector_alone_puts_closed_klines_on_md_klines(tmp_path, broker):
    fake = FakeBinance(["BTCUSDT"], NOW, speed=BAR / 1000 / 2).start()  # a 5m bar every 2 s
    port = free_port()
    proc = start(tmp_path / "home", "market", "--symbols", "BTCUSDT", "--start", "2024-01-02T22:00",
                 PERPFLOW_KAFKA_BOOTSTRAP=broker.bootstrap, PERPFLOW_METRICS_PORT=str(port),
                 PERPFLOW_BINANCE_REST_URL=fake.rest_url, PERPFLOW_BINANCE_WS_URL=fake.ws_url,
                 PERPFLOW_BINANCE_INTERVALS="5m")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for("/health", lambda: '"ok"' in get(url + "/health"), [proc])
        # 24 bars of 22:00-24:00 from REST, then bars that close on the stream
        wait_for("streamed bars", lambda: {b["source"] for b in read_topic(broker.bootstrap, "md.klines")} ==
                 {"binance-rest", "binance-ws"}, [proc])
        text = get(url + "/metrics")
        assert 'perpflow_connector_connected{connector="binance-market"} 1.0' in text
        assert 'perpflow_last_closed_bar_seconds{interval="5m",symbol="BTCUSDT"}' in text
        assert json.loads(get(url + "/ready")) == {"status": "ready", "stream": "binance-market", "connected": True}
        fake.drop_market_streams(refuse_s=4.0)  # the stream is down: not ready, still alive
        wait_for("/ready says the stream is down", lambda: status(url + "/ready") == 503, [proc], timeout=4.0)
        assert '"ok"' in get(url + "/health")
        wait_for("/ready again after the reconnect", lambda: status(url + "/ready") == 200, [proc])
    finally:
        stderr = stop(proc)
        fake.stop()
    bars = read_topic(broker.bootstrap, "md.klines")
    opens = [b["open_time"] for b in bars]
    assert opens == list(range(NOW - 24 * BAR, NOW - 24 * BAR + len(bars) * BAR, BAR)), "every bar once, in order"
    assert len(bars) > 24 and all(b["is_closed"] and b["interval"] == "5m" and b["symbol"] == "BTCUSDT"
                                  for b in bars)
    assert "Traceback" not in stderr


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_user_and_execution_connectors_as_two_processes(tmp_path, broker):
    """The user connector publishes the account's events; the execution connector trades an intent, protects it
    and cancels the sibling when the stop fires, watching the account itself; each event is on user.events once."""
    fake = FakeBinance(["BTCUSDT"], NOW).start()
    env = {"PERPFLOW_KAFKA_BOOTSTRAP": broker.bootstrap, "PERPFLOW_BINANCE_REST_URL": fake.rest_url,
           "PERPFLOW_BINANCE_WS_URL": fake.ws_url, "PERPFLOW_BINANCE_API_KEY": API_KEY,
           "PERPFLOW_BINANCE_API_SECRET": API_SECRET, "PERPFLOW_LOG_LEVEL": "INFO", "PERPFLOW_PAPER_TRADING": "false"}
    user = start(tmp_path / "user", "user", "--symbols", "BTCUSDT", PERPFLOW_METRICS_PORT=str(free_port()), **env)
    execution = start(tmp_path / "execution", "execution", "--symbols", "BTCUSDT",
                      PERPFLOW_METRICS_PORT=str(free_port()), **env)
    procs = [user, execution]
    try:
        wait_for("both account streams connected", lambda: sum(len(c) for c in fake._user_ws.values()) == 2, procs)
        price = fake.market.price("BTCUSDT", NOW)
        order = {"event_id": "order:split-1", "event_time": NOW, "symbol": "BTCUSDT", "intent_id": "split-1",
                 "action": "OPEN", "side": "BUY", "quantity": 0.02, "stop_loss": price * 0.98,
                 "take_profit": price * 1.04, "source": "test"}
        producer = Producer(producer_config(broker.bootstrap))
        producer.produce("orders", default_codec().encode("order", order), b"BTCUSDT")
        producer.flush()
        ids = client_ids("split-1")
        wait_for("entry and protection", lambda: len(fake.account.algo_orders) == 2, procs)
        fake.call(fake.trigger_algo, ids["sl"])
        wait_for("sibling cancelled", lambda: any(a["algoStatus"] == "CANCELED"
                                                  for a in fake.account.algo_orders.values()), procs)
        expected = sorted(PARSERS[e["e"]](e)["event_id"] for e in fake.user_events)
        wait_for("user events published", lambda: len(read_topic(broker.bootstrap, "user.events")) >= len(expected),
                 procs)
        time.sleep(1.0)  # nothing more arrives
    finally:
        stderrs = [stop(p) for p in procs]
        fake.stop()
    assert sorted(e["event_id"] for e in read_topic(broker.bootstrap, "user.events")) == expected, "each event once"
    risk = [r["kind"] for r in read_topic(broker.bootstrap, "risk.events")]
    assert risk.count("user_stream_restored") == 1, risk  # the user connector's; the execution's watch is private
    assert [o["clientOrderId"] for o in fake.exchange_orders()][0] == ids["entry"]
    assert fake.account.positions["BTCUSDT"].amount == 0
    assert all(API_SECRET not in s and API_KEY not in s for s in stderrs)
