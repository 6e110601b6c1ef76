"""The whole live path with a promoted model, through the CLI, the real broker, worker and store, against the fake
exchange serving the bundled real sample: `perpflow up --source binance --live` with the worker running trades end
to end — features → predict → policy → risk → `orders` → the execution connector → the exchange → the user data
stream → `user.events` — and what it archives matches what the exchange recorded.

Models are trained and promoted on the older part of the sample (the demo's split: 2023-12-09 → 12-28). The live
run backfills from 12-28 over REST (the ~4.5 days of 5m bars the features need to become `ready`, on bars no model
saw), then streams 2024-01-02 → 01-03 over WebSocket on the fake's clock at 600× the wall clock (a 5m bar every
half second per symbol). The fake's clock is in 2024: the risk guard's staleness limit (wall clock − a live bar's
close, PERPFLOW_RISK_STALE_SECONDS) is raised by the distance between the wall clock and the fake's at its start, so
it rejects as stale what would be stale on the exchange — the backfilled bars, hours old — and nothing streamed; the
execution connector's age limit for intents (PERPFLOW_EXECUTION_MAX_INTENT_AGE_SECONDS) spans the fake's whole day.

The entry thresholds are lowered (PERPFLOW_MIN_PWIN=0.30, PERPFLOW_MIN_EV=-0.01): with the defaults (0.55 / 0.0)
these models, which have no edge after costs on this sample (best P(win) ≈ 0.36), never enter, and the path from a
signal to the exchange would go unchecked. With them nearly every ready bar is an entry signal, and the risk per trade
is lowered from 50 to 20 USDT (PERPFLOW_RISK_PER_TRADE_USDT): sized for 50 on the fake's 10,000 USDT account, every
entry's isolated margin is ~0.34 of equity, above the guard's 0.20 per-symbol exposure limit, and all are rejected."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from connectors.binance.execution import client_ids
from connectors.binance.user_stream import PARSERS
from tests.conftest import PERPFLOW, ROOT, SAMPLE, cli_env, run_cli
from tests.fake_binance import API_KEY, API_SECRET, FakeBinance

pytestmark = pytest.mark.e2e

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
TRAIN_SYMBOLS = ["BTCUSDT", "ETHUSDT", "1000PEPEUSDT"]  # the demo's, pooled into one model set per side
BAR = 300_000


def ms(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)


SAMPLE_FIRST, SAMPLE_END = ms("2023-12-09"), ms("2024-01-09")
TRAIN_END = ms("2023-12-28")  # what the demo's plan gives for this sample (7 days traded after 5 of warm-up)
CLOCK_START, CLOCK_END = ms("2024-01-02"), ms("2024-01-03")
SPEED = 600.0
MIN_PWIN, MIN_EV = 0.30, -0.01

TRAIN = """
import sys
from streams.demo import plan, train_and_promote
from streams.settings import Settings

p = plan(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4]))
assert p.train_end_ms == int(sys.argv[5]), p
for model_id, _ in train_and_promote(Settings(), p, lambda line: print(line, file=sys.stderr), max_rounds=20):
    print(model_id)
"""


def sql_rows(home, query: str) -> list[list[str]]:
    result = run_cli(home, "sql", query, "--format", "tsv", timeout=60)
    assert result.returncode == 0, result.stderr
    # strip only the newline: a trailing tab is an empty last column, not whitespace to drop
    return [line.split("\t") for line in result.stdout.splitlines() if line]


def scalar(home, query: str) -> int:
    return int(sql_rows(home, query)[0][0])


def wait_for(what: str, predicate, timeout: float, check=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if check is not None:
            check()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A home with both sides' models trained on 2023-12-09 → 12-28 and promoted (the demo's steps 1 and 2)."""
    home = tmp_path_factory.mktemp("live-chain") / "home"
    result = subprocess.run([sys.executable, "-c", TRAIN, str(SAMPLE), ",".join(TRAIN_SYMBOLS), str(SAMPLE_FIRST),
                             str(SAMPLE_END), str(TRAIN_END)], env=cli_env(home), cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    models = result.stdout.split()
    assert len(models) == 2, result.stderr
    return home


@pytest.mark.timeout(1500)
def test_live_path_with_a_promoted_model_trades_end_to_end(home):
    fake = FakeBinance(SYMBOLS, CLOCK_START, CLOCK_END, speed=SPEED).start()
    stale_s = time.time() - fake.clock.now() / 1000 + 60
    env = cli_env(home, PERPFLOW_BINANCE_REST_URL=fake.rest_url, PERPFLOW_BINANCE_WS_URL=fake.ws_url,
                  PERPFLOW_BINANCE_API_KEY=API_KEY, PERPFLOW_BINANCE_API_SECRET=API_SECRET,
                  PERPFLOW_BINANCE_INTERVALS="5m", PERPFLOW_MIN_PWIN=str(MIN_PWIN), PERPFLOW_MIN_EV=str(MIN_EV),
                  PERPFLOW_RISK_PER_TRADE_USDT="20",
                  PERPFLOW_RISK_STALE_SECONDS=f"{stale_s:.0f}", PERPFLOW_LOG_LEVEL="INFO",
                  # on the fake's clock (600×) a second of the chain's latency on a busy machine is ten minutes of
                  # an intent's age: the stale bars are the guard's to reject, every streamed one's intent executes
                  PERPFLOW_EXECUTION_MAX_INTENT_AGE_SECONDS=f"{(CLOCK_END - CLOCK_START) / 1000:.0f}")
    out, err = (home.parent / "up.out").open("w+"), (home.parent / "up.err").open("w+")
    up = subprocess.Popen([PERPFLOW, "up", "--source", "binance", "--live", "--symbols", ",".join(SYMBOLS),
                           "--start", "2023-12-28"], env=env, cwd=ROOT, stdout=out, stderr=err, text=True)

    def alive() -> None:
        if up.poll() is not None:
            err.seek(0)
            pytest.fail(f"perpflow up exited with {up.returncode}: {err.read()[-4000:]}")

    bars = (CLOCK_END - TRAIN_END) // BAR  # per symbol: every bar closed by the end of the fake's clock
    live = f"toUnixTimestamp64Milli(open_time) >= {TRAIN_END}"
    try:
        wait_for("the fake's clock to end", lambda: fake.clock.now() >= CLOCK_END, 600, alive)
        wait_for("every bar archived", lambda: scalar(
            home, f"SELECT count() FROM md_klines FINAL WHERE source LIKE 'binance%' AND {live}") == 2 * bars,
            300, alive)
        wait_for("features of every bar", lambda: scalar(home, f"SELECT count() FROM features FINAL WHERE {live}")
                 == 2 * bars, 300, alive)
        ready = scalar(home, f"SELECT count() FROM features FINAL WHERE ready AND {live}")
        assert ready > 288 * len(SYMBOLS)  # at least the streamed day, warmed up by the backfilled days
        # one signal and one verdict per bar: a prediction's for a ready one, FLAT `not_ready` for the others (the
        # home's own replay, before TRAIN_END, made FLAT `no_model` ones: no model was promoted yet)
        wait_for("a signal and a verdict per bar", lambda: all(
            scalar(home, f"SELECT count() FROM {table} FINAL WHERE {live}") == 2 * bars
            for table in ("signals", "risk_verdicts")), 300, alive)
        predicted = scalar(home, f"SELECT count() FROM signals FINAL WHERE model_id_long != '' AND {live}")
        not_ready = scalar(home, f"SELECT count() FROM signals FINAL WHERE flat_reason = 'not_ready' AND {live}")

        def settled() -> bool:
            n = len(fake.user_events)
            archived = scalar(home, "SELECT count() FROM user_events FINAL")
            opens = scalar(home, "SELECT count() FROM orders FINAL")
            time.sleep(3)
            return archived == len({PARSERS[e["e"]](e)["event_id"] for e in fake.user_events}) \
                and n == len(fake.user_events) and opens == scalar(home, "SELECT count() FROM orders FINAL")
        wait_for("user.events archived as the exchange sent them", settled, 300, alive)

        signals = sql_rows(home, f"SELECT decision, count() FROM signals FINAL WHERE {live} GROUP BY decision "
                                 "ORDER BY decision")
        verdicts = sql_rows(home, "SELECT signal_id, decision, verdict, action, ifNull(intent_id, ''), violations, "
                                  f"toUnixTimestamp64Milli(open_time), source FROM risk_verdicts FINAL WHERE {live}")
        orders = sql_rows(home, "SELECT intent_id, action, side, quantity, ifNull(stop_loss, 0), "
                                "ifNull(take_profit, 0), symbol FROM orders FINAL")
        events = sql_rows(home, "SELECT event_id, event_type, ifNull(client_order_id, ''), ifNull(order_status, ''), "
                                "ifNull(execution_type, ''), ifNull(filled_qty, 0), ifNull(avg_price, 0), "
                                "ifNull(order_type, '') FROM user_events FINAL")
        risk = sql_rows(home, "SELECT kind, detail FROM risk_events FINAL ORDER BY event_time")
        distinct_verdicts = scalar(home, f"SELECT count(DISTINCT signal_id) FROM risk_verdicts FINAL WHERE {live}")
        unmatched = scalar(home, "SELECT count() FROM risk_verdicts AS v FINAL LEFT ANTI JOIN signals AS s FINAL "
                                 "ON v.signal_id = s.event_id")
    finally:
        up.terminate()
        try:
            up.wait(timeout=90)
        finally:
            fake.stop()
    err.seek(0)
    stderr = err.read()
    assert up.returncode in (0, 130), stderr[-4000:]
    assert API_SECRET not in stderr and API_KEY not in stderr

    # signals → exactly one verdict each
    assert distinct_verdicts == 2 * bars and unmatched == 0
    assert predicted == ready and not_ready == 2 * bars - ready
    decided = {decision: int(n) for decision, n in signals}
    assert decided.get("LONG", 0) + decided.get("SHORT", 0) > 0, decided
    approved = [v for v in verdicts if v[3] == "OPEN"]
    assert approved and all(v[2] == "APPROVED" and v[1] != "FLAT" for v in approved)
    assert all(v[5] != "[]" for v in verdicts if v[2] == "REJECTED")
    assert {v[7] for v in verdicts} == {"binance"}  # the chain knows its data is live
    # entries on history (bars that had closed a bar or more before the run began) are stale: never traded at
    # today's price; the bar closing as the fake's clock starts is as fresh as a live one
    history = [v for v in verdicts if v[1] != "FLAT" and int(v[6]) + 2 * BAR <= CLOCK_START]
    assert history and all(v[2] == "REJECTED" and "stale_data" in v[5] for v in history)
    assert all(int(v[6]) + 2 * BAR > CLOCK_START for v in approved)
    # → an OPEN order for each approved entry and nothing else
    opens = {o[0]: o for o in orders if o[1] == "OPEN"}
    assert sorted(opens) == sorted(v[4] for v in approved)

    # → the exchange received each entry (MARKET, POST /fapi/v1/order) and both protective orders (Algo API)
    posted = [(path, p) for _, method, path, p in fake.requests if method == "POST"]
    entries = {p["newClientOrderId"]: p for path, p in posted if path == "/fapi/v1/order"}
    algos = {p["clientAlgoId"]: p for path, p in posted if path == "/fapi/v1/algoOrder"}
    for intent, (_, _, side, qty, stop, target, symbol) in opens.items():
        ids = client_ids(intent)
        entry = entries[ids["entry"]]
        assert (entry["symbol"], entry["side"], entry["type"]) == (symbol, side, "MARKET")
        assert float(entry["quantity"]) == pytest.approx(float(qty))
        for leg, kind, price in (("sl", "STOP_MARKET", stop), ("tp", "TAKE_PROFIT_MARKET", target)):
            algo = algos[ids[leg]]
            assert (algo["algoType"], algo["type"], algo["closePosition"], algo["workingType"]) == \
                ("CONDITIONAL", kind, "true", "MARK_PRICE")
            assert algo["side"] == ("SELL" if side == "BUY" else "BUY")
            assert float(algo["triggerPrice"]) == pytest.approx(float(price), rel=1e-4)
    closes = [o for o in orders if o[1] == "CLOSE"]  # the guard flattening (HALT) or a liquidation-distance breach
    closed_by_protection = {cid for cid, status in ((r["client_order_id"], r["order_status"]) for r in (
        PARSERS[e["e"]](e) for e in fake.user_events if e["e"] == "ALGO_UPDATE")) if status == "FINISHED"}
    for intent, _, side, _, _, _, symbol in closes:
        close = entries.get(client_ids(intent)["close"])
        if close is not None:  # a reduce-only MARKET order for what the exchange held
            assert (close["symbol"], close["side"], close["type"], close["reduceOnly"]) == \
                (symbol, side, "MARKET", "true")
        else:  # nothing to close: its entry's stop-loss or take-profit had fired first, or (the guard's retry of
            # a close whose fill it had not seen yet, `close:…:{attempt}`) the first close had flattened it
            entry_intent = next(i for i in opens if intent.startswith(f"close:{i}:"))
            first, attempt = intent.rsplit(":", 1)
            if attempt.isdigit() and client_ids(first)["close"] in entries:
                continue
            assert {client_ids(entry_intent)["sl"], client_ids(entry_intent)["tp"]} & closed_by_protection, intent

    # → user.events archived = what the exchange sent: the same events, client ids, statuses and fills
    sent = {}
    for e in fake.user_events:
        r = PARSERS[e["e"]](e)
        sent[r["event_id"]] = (r["event_type"], r["client_order_id"] or "", r["order_status"] or "",
                               r["execution_type"] or "", r["filled_qty"] or 0.0, r["avg_price"] or 0.0,
                               r["order_type"] or "")
    archived = {row[0]: (row[1], row[2], row[3], row[4], float(row[5]), float(row[6]), row[7]) for row in events}
    assert archived.keys() == sent.keys()
    for event_id, fields in sent.items():
        got = archived[event_id]
        assert got[:4] == fields[:4] and got[6] == fields[6], (event_id, got, fields)
        assert got[4:6] == pytest.approx(fields[4:6]), (event_id, got, fields)
    filled = {cid for kind, cid, status, *_ in sent.values() if kind == "ORDER_TRADE_UPDATE" and status == "FILLED"}
    assert {client_ids(i)["entry"] for i in opens} <= filled  # every approved entry filled at the exchange
    protected = {cid for kind, cid, status, *_ in sent.values() if kind == "ALGO_UPDATE" and status == "NEW"}
    assert {client_ids(i)[leg] for i in opens for leg in ("sl", "tp")} <= protected
    assert [k for k, _ in risk if k in ("protection_failed", "order_rejected")] == []
    print(f"\nlive chain: {ready} ready bars → signals {decided}; {len(approved)} approved entries; "
          f"{len(orders)} orders ({len(closes)} closes); the fake received {len(entries)} orders and "
          f"{len(algos)} algo orders and sent {len(sent)} user events; {len(history)} entries on backfilled bars "
          f"rejected as stale; trading states {[json.loads(d)['to'] for k, d in risk if k == 'trading_state']}; "
          f"rejections: {Counter(v[5] for v in verdicts if v[2] == 'REJECTED').most_common(5)}")
