"""The risk agent through the real broker and a real worker process, paper trading (its paper exchange fills the
orders from md.klines): signals in, exactly one verdict each, orders for approved entries, protective orders on the
exchange, the kill switch from the CLI, and the trading state across a SIGKILL of the worker."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from connectors.binance.execution import client_ids
from connectors.binance.publish import Publisher
from schemas import event_ids, records
from streams.broker import ensure_topics
from streams.settings import Settings
from streams.worker import WorkerProcess
from tests.conftest import read_topic, run_cli

pytestmark = pytest.mark.e2e

T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
BAR = 300_000


def signal(symbol: str, n: int, decision: str, close: float, qty: float) -> dict:
    open_time = T0 + n * BAR
    s = {"event_id": event_ids.signal(symbol, "5m", open_time), "event_time": open_time + BAR, "symbol": symbol,
         "source": "replay", "interval": "5m", "open_time": open_time, "prediction_id": "", "model_id_long": "m-l",
         "model_id_short": "m-s", "decision": decision, "side": None, "ev_long": 0.001, "ev_short": -0.001,
         "p_win_long": 0.6, "p_win_short": 0.4, "confidence": 0.6, "entry_price": None, "stop_loss": None,
         "take_profit": None, "quantity": None, "notional": None, "leverage": None, "liq_price": None,
         "liq_distance_atr": None, "close": close, "atr_14": close * 0.003, "funding_rate": 0.0001,
         "flat_reason": "thresholds" if decision == "FLAT" else "", "reasons": []}
    if decision == "LONG":
        s.update(side="BUY", entry_price=close, stop_loss=round(close * 0.994, 1), take_profit=round(close * 1.012, 1),
                 quantity=qty, notional=qty * close, leverage=5, liq_price=close * 0.8, liq_distance_atr=60.0)
    return s


def kline(symbol: str, n: int, price: float) -> dict:
    t = T0 + n * BAR
    return records.kline(symbol, "5m", t, t + BAR - 1, price, price * 1.001, price * 0.999, price, 1.0, None, None,
                         None, None, "test")


def publish(bootstrap: str, items: list[tuple[str, dict]]) -> None:
    pub = Publisher(bootstrap)
    for topic, rec in items:
        pub.publish(topic, rec)
    assert pub.flush() == 0


def wait(what: str, check, timeout: float = 90, worker: WorkerProcess | None = None):
    deadline = time.monotonic() + timeout
    while True:
        if worker is not None:
            worker.check()
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def verdicts(bootstrap: str) -> dict[str, dict]:
    return {v["signal_id"]: v for v in read_topic(bootstrap, "risk.verdicts")}


@pytest.fixture(autouse=True)
def risk_agent_alone(monkeypatch):
    """The worker runs the risk agent only: these tests play the policy agent, and the chain would make its own
    signal of every bar published here (FLAT, not ready), the risk agent's input like any other."""
    monkeypatch.setenv("PERPFLOW_AGENTS", "risk")


def test_verdicts_orders_kill_switch_and_restart(broker, tmp_path: Path):
    bootstrap = broker.bootstrap
    ensure_topics(bootstrap)
    home = tmp_path / "home"
    settings = Settings(home=home, kafka_bootstrap=bootstrap, clickhouse_url="", worker_metrics_port=0,
                        symbols=["BTCUSDT", "ETHUSDT"])
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, bootstrap)
    cli = {"PERPFLOW_KAFKA_BOOTSTRAP": bootstrap}
    try:
        btc = signal("BTCUSDT", 0, "LONG", 42_000.0, 0.1)
        # a signal is decided once its bar is in md.klines (live, the bar always comes first)
        publish(bootstrap, [("md.klines", kline("BTCUSDT", 0, 42_000.0)), ("md.klines", kline("ETHUSDT", 0, 2_300.0)),
                            ("signals", btc), ("signals", signal("ETHUSDT", 0, "FLAT", 2_300.0, 0))])
        got = wait("two verdicts", lambda: len(verdicts(bootstrap)) == 2 and verdicts(bootstrap), worker=worker)
        assert (got[btc["event_id"]]["verdict"], got[btc["event_id"]]["action"]) == ("APPROVED", "OPEN")
        assert got[signal("ETHUSDT", 0, "FLAT", 0, 0)["event_id"]]["action"] == "NONE"
        [order] = read_topic(bootstrap, "orders")
        assert (order["intent_id"], order["action"], order["quantity"], order["leverage"]) == \
               (event_ids.open_intent("BTCUSDT", "5m", T0), "OPEN", 0.1, 5)
        ids = client_ids(order["intent_id"])
        publish(bootstrap, [("md.klines", kline("BTCUSDT", 1, 42_010.0)),  # the bar the entry fills at
                            ("md.klines", kline("BTCUSDT", 2, 42_010.0))])  # held until a signal of its own
        # the same signal again (a redelivery) changes nothing: same verdict, no second order; bar 1 is applied
        # before its own signal is decided: the entry fills at its open, with both protective orders
        publish(bootstrap, [("signals", btc), ("signals", signal("BTCUSDT", 1, "LONG", 42_010.0, 0.1))])
        wait("four verdicts", lambda: len(read_topic(bootstrap, "risk.verdicts")) == 4, worker=worker)

        def protected():
            events = read_topic(bootstrap, "user.events")
            filled = any(e["client_order_id"] == ids["entry"] and e["order_status"] == "FILLED" for e in events)
            legs = {e["client_order_id"] for e in events if e["event_type"] == "ALGO_UPDATE"
                    and e["order_status"] == "NEW"}
            return filled and {ids["sl"], ids["tp"]} <= legs

        wait("the entry filled with both protective orders", protected, worker=worker)
        again = [v for v in read_topic(bootstrap, "risk.verdicts") if v["signal_id"] == btc["event_id"]]
        assert len(again) == 2 and again[0] == again[1]
        assert verdicts(bootstrap)[signal("BTCUSDT", 1, "LONG", 0, 0)["event_id"]]["violations"] == ["position_open"]
        assert len(read_topic(bootstrap, "orders")) == 1

        # the state-changing routes want the token
        api = json.loads(next(settings.run_dir.glob("worker-*.json")).read_text())["api_url"]
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(urllib.request.Request(api + "/trading/kill", data=b"{}", method="POST"))
        assert denied.value.code == 401

        killed = run_cli(home, "trading", "kill", "--reason", "test", **cli)
        assert killed.returncode == 0, killed.stderr
        close = wait("the kill's close order", lambda: [o for o in read_topic(bootstrap, "orders")
                                                         if o["action"] == "CLOSE"], worker=worker)
        assert close[0]["reason"] == "test" and close[0]["side"] == "SELL"
        publish(bootstrap, [("md.klines", kline("BTCUSDT", 3, 42_020.0)),
                            ("signals", signal("BTCUSDT", 2, "FLAT", 42_010.0, 0))])  # bar 2 applied: flat
        closing = client_ids(close[0]["intent_id"])["close"]
        wait("the position closed", lambda: any(
            e["client_order_id"] == closing and e["order_status"] == "FILLED"
            for e in read_topic(bootstrap, "user.events")), worker=worker)

        # SIGKILL the worker: the restarted one is still HALTED (ETH's bar 3 is decided once BTC's is: every symbol
        # in event-time order)
        worker.process.kill()
        eth = signal("ETHUSDT", 3, "LONG", 2_300.0, 1.0)
        publish(bootstrap, [("md.klines", kline("ETHUSDT", 3, 2_300.0)), ("signals", eth),
                            ("signals", signal("BTCUSDT", 3, "FLAT", 42_020.0, 0))])
        v = wait("the verdict after the restart", lambda: verdicts(bootstrap).get(eth["event_id"]), timeout=120,
                 worker=worker)
        assert worker.restarts == 1
        assert v["verdict"] == "REJECTED" and "halted" in v["violations"] and v["trading_state"] == "HALTED"

        status = run_cli(home, "trading", "status", **cli)
        assert status.returncode == 0 and "HALTED" in status.stdout, status.stderr
        started = run_cli(home, "trading", "start", **cli)
        assert started.returncode == 0, started.stderr
        eth4 = signal("ETHUSDT", 4, "LONG", 2_300.0, 1.0)
        wait("RUNNING", lambda: "RUNNING" in run_cli(home, "trading", "status", **cli).stdout, worker=worker)
        publish(bootstrap, [("md.klines", kline("ETHUSDT", 4, 2_300.0)), ("signals", eth4)])
        v = wait("an approved entry", lambda: verdicts(bootstrap).get(eth4["event_id"]), worker=worker)
        assert v["verdict"] == "APPROVED"
        # every signal, exactly one verdict (the redelivered one twice, with one event_id)
        signals = {s["event_id"] for s in read_topic(bootstrap, "signals")}
        assert set(verdicts(bootstrap)) == signals
    finally:
        worker.stop()


def test_trading_command_errors_are_one_line(tmp_path: Path):
    bad = run_cli(tmp_path / "home", "trading", "explode")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    none = run_cli(tmp_path / "home", "trading", "status")
    assert none.returncode == 1 and "no running worker" in none.stderr


def test_daily_loss_flattens_and_halts_within_one_bar(broker, tmp_path: Path):
    """0.3 BTC long filled at 42,000 × 1.0015 (paper slippage) = 42,063; marked at 40,000 at that bar's close:
    −618.9 unrealized (and a 5.05 fee) on a 10,000 account, past the 2 % daily limit → a CLOSE and HALTED in that
    bar's verdict, flat at the next open."""
    bootstrap = broker.bootstrap
    ensure_topics(bootstrap)
    home = tmp_path / "home"
    settings = Settings(home=home, kafka_bootstrap=bootstrap, clickhouse_url="", worker_metrics_port=0,
                        symbols=["BTCUSDT"])
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, bootstrap)
    try:
        entry = signal("BTCUSDT", 0, "LONG", 42_000.0, 0.3) | {"leverage": 8}  # 1,575 margin: 15.75 % exposure
        publish(bootstrap, [("md.klines", kline("BTCUSDT", 0, 42_000.0)), ("signals", entry),
                            ("md.klines", kline("BTCUSDT", 1, 42_000.0)),
                            ("signals", signal("BTCUSDT", 1, "FLAT", 40_000.0, 0))])
        v = wait("the second verdict", lambda: verdicts(bootstrap).get(signal("BTCUSDT", 1, "FLAT", 0, 0)["event_id"]),
                 worker=worker)
        assert v["trading_state"] == "HALTED"
        assert v["daily_pnl_ratio"] == pytest.approx(-(0.3 * 2_063 + 0.3 * 42_063 * 0.0004) / 10_000, rel=1e-6)
        [close] = [o for o in read_topic(bootstrap, "orders") if o["action"] == "CLOSE"]
        assert close["reason"] == "daily_loss"
        events = read_topic(bootstrap, "risk.events")
        assert any(e["kind"] == "trading_state" and json.loads(e["detail"])["to"] == "HALTED" for e in events)
        publish(bootstrap, [("md.klines", kline("BTCUSDT", 2, 40_000.0)),
                            ("signals", signal("BTCUSDT", 2, "LONG", 40_000.0, 0.1))])
        v = wait("the third verdict", lambda: verdicts(bootstrap).get(signal("BTCUSDT", 2, "LONG", 0, 0)["event_id"]),
                 worker=worker)
        assert v["verdict"] == "REJECTED" and "halted" in v["violations"]
        closing = client_ids(close["intent_id"])["close"]
        fills = [e for e in read_topic(bootstrap, "user.events")
                 if e["client_order_id"] == closing and e["order_status"] == "FILLED"]
        assert len(fills) == 1 and fills[0]["event_time"] == T0 + 2 * BAR  # at the open of the next bar
    finally:
        worker.stop()


def test_symbols_are_decided_in_event_time_order_whatever_order_they_arrive_in(broker, tmp_path: Path, monkeypatch):
    """The account couples the symbols: here only one more entry fits under the margin limit (30 %). ETH's entry of
    bar 1 reaches the risk agent after BTC's entry of bar 2; decided on arrival, BTC would take the room. Decided in
    event-time order, BTC's signals wait for ETH to pass bar 1, and ETH's earlier entry gets the room."""
    monkeypatch.setenv("PERPFLOW_RISK_MAX_MARGIN_USAGE", "0.3")
    monkeypatch.setenv("PERPFLOW_RISK_MAX_SYMBOL_EXPOSURE", "1.0")
    bootstrap = broker.bootstrap
    ensure_topics(bootstrap)
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=bootstrap, clickhouse_url="", worker_metrics_port=0,
                        symbols=["BTCUSDT", "ETHUSDT"])
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, bootstrap)
    try:
        publish(bootstrap, [("md.klines", kline("BTCUSDT", 0, 42_000.0)), ("md.klines", kline("ETHUSDT", 0, 2_300.0)),
                            ("signals", signal("BTCUSDT", 0, "FLAT", 42_000.0, 0)),
                            ("signals", signal("ETHUSDT", 0, "FLAT", 2_300.0, 0))])
        wait("the first two verdicts", lambda: len(verdicts(bootstrap)) == 2, worker=worker)
        publish(bootstrap, [("md.klines", kline("ETHUSDT", 1, 2_300.0))])  # its signal is still down the chain
        btc = signal("BTCUSDT", 2, "LONG", 42_000.0, 0.1)  # 4,200 at 5×: 8.4 % of the account
        publish(bootstrap, [("md.klines", kline("BTCUSDT", 1, 42_000.0)), ("md.klines", kline("BTCUSDT", 2, 42_000.0)),
                            ("signals", signal("BTCUSDT", 1, "FLAT", 42_000.0, 0)), ("signals", btc)])
        wait("BTC's signals held", lambda: worker.metric("perpflow_risk_held_signals") == 2, worker=worker)
        assert len(verdicts(bootstrap)) == 2
        eth = signal("ETHUSDT", 1, "LONG", 2_300.0, 5.0)  # 11,500 at 5×: 23 %
        publish(bootstrap, [("signals", eth), ("md.klines", kline("ETHUSDT", 2, 2_300.0)),
                            ("signals", signal("ETHUSDT", 2, "FLAT", 2_300.0, 0))])
        got = wait("six verdicts", lambda: len(verdicts(bootstrap)) == 6 and verdicts(bootstrap), worker=worker)
        assert (got[eth["event_id"]]["verdict"], got[eth["event_id"]]["action"]) == ("APPROVED", "OPEN")
        assert got[btc["event_id"]]["verdict"] == "REJECTED"
        assert got[btc["event_id"]]["violations"] == ["margin_usage"]
        assert worker.metric("perpflow_risk_held_signals") == 0
    finally:
        worker.stop()


def test_a_chain_that_stops_taking_its_input_is_an_error_not_a_wait(broker, tmp_path: Path, monkeypatch):
    """`perpflow up --until-drained` and backtests wait until the agents have taken everything: input that no agent
    takes (`features`, here with the predict agent not running) ends the wait with an error naming what is left."""
    from confluent_kafka import Producer

    from streams import up
    from streams.broker import producer_config
    from streams.errors import PerpflowError

    bootstrap = broker.bootstrap
    ensure_topics(bootstrap)
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=bootstrap, clickhouse_url="", worker_metrics_port=0)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, bootstrap)
    monkeypatch.setattr(up, "STALL_SECONDS", 3.0)
    try:
        producer = Producer(producer_config(bootstrap))
        for _ in range(2):
            producer.produce("features", b"not taken", b"BTCUSDT")
        assert producer.flush(30) == 0
        with pytest.raises(PerpflowError, match=r"nothing committed for 3 s with 2 records of features left"):
            up.wait_for_agents(bootstrap, worker)
    finally:
        worker.stop()


def test_trading_state_holds_when_trading_an_account(broker, tmp_path: Path, monkeypatch):
    """Live wiring (no paper exchange; this test plays the connectors): an operator's REDUCE_ONLY survives a
    user-stream roll, an entry the execution connector reports rejected frees its symbol, a kill's CLOSE that the
    exchange leaves unfilled is sent again on the agent's timer until the fill comes, and an account snapshot after
    a reconnect puts the exchange's position in the book (and, a kill in force, closes it)."""
    from connectors.binance.user_stream import parse_order_trade_update, risk_record

    monkeypatch.setenv("PERPFLOW_PAPER_TRADING", "false")
    monkeypatch.setenv("PERPFLOW_RISK_CLOSE_RETRY_SECONDS", "2")
    bootstrap = broker.bootstrap
    ensure_topics(bootstrap)
    home = tmp_path / "home"
    settings = Settings(home=home, kafka_bootstrap=bootstrap, clickhouse_url="", worker_metrics_port=0,
                        symbols=["BTCUSDT", "ETHUSDT"])
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, bootstrap)
    cli = {"PERPFLOW_KAFKA_BOOTSTRAP": bootstrap}

    def state() -> str:
        return run_cli(home, "trading", "status", **cli).stdout

    def decided(s: dict) -> dict | None:
        return verdicts(bootstrap).get(s["event_id"])

    def fill(client_id: str, qty: float, price: float, reduce_only: bool) -> dict:
        t = int(time.time() * 1000)
        return parse_order_trade_update({"e": "ORDER_TRADE_UPDATE", "E": t, "T": t, "o": {
            "s": "BTCUSDT", "c": client_id, "S": "SELL" if reduce_only else "BUY", "o": "MARKET", "f": "GTC",
            "q": str(qty), "p": "0", "ap": str(price), "sp": "0", "x": "TRADE", "X": "FILLED", "i": 7, "l": str(qty),
            "z": str(qty), "L": str(price), "T": t, "t": 1, "R": reduce_only, "wt": "CONTRACT_PRICE", "ps": "BOTH",
            "rp": "0"}})

    try:
        first = signal("BTCUSDT", 0, "FLAT", 42_000.0, 0)
        publish(bootstrap, [("signals", first)])
        wait("the first verdict", lambda: decided(first), worker=worker)
        assert run_cli(home, "trading", "stop", "--reason", "night", **cli).returncode == 0
        wait("REDUCE_ONLY", lambda: "REDUCE_ONLY" in state(), worker=worker)
        roll = [("risk.events", risk_record(kind, "info", "", T0 + n, {"reason": "scheduled roll"}))
                for n, kind in enumerate(("user_stream_down", "user_stream_restored"))]
        publish(bootstrap, roll)
        wait("the roll handled", lambda: [json.loads(e["detail"])["to"] for e in read_topic(bootstrap, "risk.events")
                                          if e["kind"] == "trading_state"][-2:] == ["HALTED", "REDUCE_ONLY"],
             worker=worker)
        blocked = signal("BTCUSDT", 1, "LONG", 42_000.0, 0.1)
        publish(bootstrap, [("signals", blocked)])
        assert wait("a verdict", lambda: decided(blocked), worker=worker)["violations"] == ["reduce_only"]
        assert "REDUCE_ONLY" in state()

        assert run_cli(home, "trading", "start", **cli).returncode == 0
        wait("RUNNING", lambda: "RUNNING" in state(), worker=worker)
        rejected = signal("BTCUSDT", 2, "LONG", 42_000.0, 0.1)
        publish(bootstrap, [("signals", rejected)])
        intent = wait("an entry", lambda: decided(rejected), worker=worker)["intent_id"]
        publish(bootstrap, [("risk.events", risk_record("order_rejected", "warning", "BTCUSDT", T0 + 3 * BAR,
                                                        {"intent_id": intent, "reason": "margin_insufficient"},
                                                        intent))])
        wait("the pending entry cleared", lambda: any(e["kind"] == "entry_cleared"
                                                      for e in read_topic(bootstrap, "risk.events")), worker=worker)
        entry = signal("BTCUSDT", 3, "LONG", 42_000.0, 0.1)
        publish(bootstrap, [("signals", entry)])
        v = wait("the next entry", lambda: decided(entry), worker=worker)
        assert (v["verdict"], v["action"]) == ("APPROVED", "OPEN")  # not position_open: the symbol is free
        publish(bootstrap, [("user.events", fill(client_ids(v["intent_id"])["entry"], 0.1, 42_000.0, False))])
        wait("the entry open", lambda: "open" in json.dumps(worker_get(settings, "/positions")), worker=worker)

        assert run_cli(home, "trading", "kill", "--reason", "test", **cli).returncode == 0
        closes = wait("the kill's close sent three times", lambda: (lambda c: len(c) >= 3 and c)(
            [o for o in read_topic(bootstrap, "orders") if o["action"] == "CLOSE"]), timeout=60, worker=worker)
        assert [o["intent_id"] for o in closes[:3]] == [event_ids.close_intent(v["intent_id"], "test", n)
                                                       for n in (1, 2, 3)]
        retries = [json.loads(e["detail"]) for e in read_topic(bootstrap, "risk.events") if e["kind"] == "close_retry"]
        assert [r["attempt"] for r in retries[:2]] == [2, 3]
        publish(bootstrap, [("user.events", fill(client_ids(closes[-1]["intent_id"])["close"], 0.1, 41_990.0, True))])
        wait("flat", lambda: worker_get(settings, "/positions") == {}, worker=worker)
        sent = len([o for o in read_topic(bootstrap, "orders") if o["action"] == "CLOSE"])
        time.sleep(3)  # past a retry interval: flat, nothing more is sent
        assert len([o for o in read_topic(bootstrap, "orders") if o["action"] == "CLOSE"]) == sent

        # after a reconnect the execution connector publishes the account as the exchange has it
        publish(bootstrap, [("risk.events", risk_record("account_snapshot", "info", "", int(time.time() * 1000),
                                                        {"positions": {"ETHUSDT": "-1.5"}, "balance": "9990.5"})
                             | {"source": "binance-execution"})])
        eth = wait("the exchange's position in the book",
                   lambda: worker_get(settings, "/positions").get("ETHUSDT"), worker=worker)
        assert (eth["side"], eth["quantity"], eth["status"], eth["closing"]) == ("SHORT", 1.5, "open", "test")
        found = {(e["symbol"], json.loads(e["detail"])["reason"]) for e in read_topic(bootstrap, "risk.events")
                 if e["kind"] == "book_reconciled"}
        assert found == {("ETHUSDT", "not_in_book"), ("", "balance")}
        eth_close = [o for o in read_topic(bootstrap, "orders") if o["action"] == "CLOSE" and o["symbol"] == "ETHUSDT"]
        assert [(o["side"], o["quantity"]) for o in eth_close][:1] == [("BUY", 1.5)]
        assert worker_get(settings, "/status")["wallet_balance"] == 9990.5
    finally:
        worker.stop()


def worker_get(settings: Settings, path: str):
    """A read-only route of the worker's control API."""
    api = json.loads(next(settings.run_dir.glob("worker-*.json")).read_text())["api_url"]
    with urllib.request.urlopen(api + path, timeout=10) as answer:
        return json.loads(answer.read())
