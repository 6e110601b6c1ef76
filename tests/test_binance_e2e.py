"""The live path end to end, through the CLI, the real broker and store, against the fake exchange:
`perpflow up --source binance --live` archives market data, trades an order intent put on `orders` with
its protection, cancels the sibling when the stop fires, and archives user.events that match what the
fake exchange sent; no secret appears in its output."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from confluent_kafka import Producer

from connectors.binance.execution import client_ids
from connectors.binance.user_stream import PARSERS
from schemas.codec import default_codec
from streams.broker import producer_config
from tests.conftest import PERPFLOW, ROOT, cli_env, run_cli
from tests.fake_binance import API_KEY, API_SECRET, FakeBinance

pytestmark = pytest.mark.e2e
NOW = 1_704_240_000_000  # 2024-01-03 00:00 UTC


def sql(home, query: str) -> str:
    result = run_cli(home, "sql", query, "--format", "tsv", timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def wait_for(what: str, predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.timeout(240)
def test_live_path_trades_and_archives_what_the_exchange_sent(tmp_path):
    home = tmp_path / "home"
    fake = FakeBinance(["BTCUSDT"], NOW).start()
    env = cli_env(home, PERPFLOW_BINANCE_REST_URL=fake.rest_url, PERPFLOW_BINANCE_WS_URL=fake.ws_url,
                  PERPFLOW_BINANCE_API_KEY=API_KEY, PERPFLOW_BINANCE_API_SECRET=API_SECRET,
                  PERPFLOW_BINANCE_INTERVALS="5m", PERPFLOW_RUN_WORKER="false", PERPFLOW_LOG_LEVEL="INFO")
    up = subprocess.Popen([PERPFLOW, "up", "--source", "binance", "--live", "--symbols", "BTCUSDT",
                           "--start", "2024-01-02T22:00"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        stack = home / "run" / "stack.json"
        wait_for("stack.json", lambda: up.poll() is None and stack.exists() or up.poll() is not None)
        assert up.poll() is None, up.stderr.read()
        bootstrap = json.loads(stack.read_text())["bootstrap"]
        # 24 bars of 22:00-24:00 backfilled from REST and archived
        wait_for("klines archived", lambda: sql(home, "SELECT count() FROM md_klines FINAL") == "24")
        wait_for("user stream connected", lambda: fake._user_ws and any(fake._user_ws.values()))
        price = fake.market.price("BTCUSDT", NOW)
        order = {"event_id": "order:e2e-1", "event_time": NOW, "symbol": "BTCUSDT", "intent_id": "e2e-1",
                 "action": "OPEN", "side": "BUY", "quantity": 0.02, "stop_loss": price * 0.98,
                 "take_profit": price * 1.04, "source": "test"}
        producer = Producer(producer_config(bootstrap))
        producer.produce("orders", default_codec().encode("order", order), b"BTCUSDT")
        producer.flush()
        ids = client_ids("e2e-1")
        wait_for("entry and protection", lambda: len(fake.account.algo_orders) == 2)
        fake.call(fake.trigger_algo, ids["sl"])
        wait_for("sibling cancelled", lambda: any(a["algoStatus"] == "CANCELED"
                                                  for a in fake.account.algo_orders.values()))
        expected = {PARSERS[e["e"]](e)["event_id"] for e in fake.user_events}
        wait_for("user events archived", lambda: sql(home, "SELECT count() FROM user_events FINAL") == str(
            len(expected)))
        archived = set(sql(home, "SELECT event_id FROM user_events FINAL").splitlines())
        assert archived == expected
        assert sql(home, "SELECT count() FROM md_markprice FINAL WHERE source = 'binance-ws'") != "0"
        risk = sql(home, "SELECT kind FROM risk_events FINAL ORDER BY event_time, kind").splitlines()
        # the reconcile before trading reports the account, then the stream is restored; nothing went wrong
        assert risk[:2] == ["account_snapshot", "user_stream_restored"], risk
    finally:
        up.terminate()
        try:
            _, stderr = up.communicate(timeout=60)
        finally:
            fake.stop()
    assert up.returncode in (0, 130), stderr
    assert API_SECRET not in stderr and API_KEY not in stderr
    assert [o["clientOrderId"] for o in fake.exchange_orders()][0] == ids["entry"]
    assert fake.account.positions["BTCUSDT"].amount == 0


@pytest.mark.timeout(180)
def test_backfill_command_loads_history_into_the_archive(tmp_path):
    home = tmp_path / "home"
    fake = FakeBinance(["BTCUSDT", "ETHUSDT"], NOW).start()
    env = {"PERPFLOW_BINANCE_REST_URL": fake.rest_url, "PERPFLOW_BINANCE_WS_URL": fake.ws_url,
           "PERPFLOW_BINANCE_INTERVALS": "5m", "PERPFLOW_RUN_WORKER": "false"}
    up = subprocess.Popen([PERPFLOW, "up", "--source", "none"], env=cli_env(home, **env), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("stack.json", lambda: (home / "run" / "stack.json").exists() or up.poll() is not None)
        assert up.poll() is None, up.stderr.read()
        result = run_cli(home, "backfill", "--symbols", "BTCUSDT,ETHUSDT", "--start", "2024-01-02",
                         "--end", "2024-01-02T06:00", **env)
        assert result.returncode == 0, result.stderr
        assert "md.klines" in result.stdout and "144" in result.stdout  # 2 symbols × 72 bars
        assert "backfill: 144 bars" in result.stderr  # the progress line's summary
        wait_for("bars archived", lambda: sql(home, "SELECT symbol, count(), min(open_time), max(open_time) FROM "
                                                    "md_klines FINAL GROUP BY symbol ORDER BY symbol") ==
                 "BTCUSDT\t72\t2024-01-02 00:00:00.000\t2024-01-02 05:55:00.000\n"
                 "ETHUSDT\t72\t2024-01-02 00:00:00.000\t2024-01-02 05:55:00.000")
        funding = sql(home, "SELECT count() FROM md_funding FINAL WHERE symbol = 'BTCUSDT'")
        assert funding == "1"  # the 00:00 settlement; 08:00 is after --end
    finally:
        up.terminate()
        up.communicate(timeout=60)
        fake.stop()
