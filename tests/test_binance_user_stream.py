"""The user data stream: Binance's documented example events parse field by field into `user.events`;
listenKey expiry, keepalive failure, disconnects, silence (no pong) and the scheduled roll reconnect, with a
critical `user_stream_down` risk event per outage and `user_stream_restored` only after reconciliation and the
recovery of missed fills succeeded; a fill missed while down reaches `user.events` once, with the stream's id."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from connectors.binance.publish import Publisher
from connectors.binance.rest import RestClient
from connectors.binance.user_stream import PARSERS, UserStream, fill_from_rest
from streams.broker import ensure_topics
from tests.conftest import read_topic
from tests.fake_binance import API_KEY, API_SECRET, FakeBinance

# The examples of Binance's USDⓈ-M futures user-data-stream documentation, as published
ORDER_TRADE_UPDATE = json.loads("""{"e":"ORDER_TRADE_UPDATE","E":1568879465651,"T":1568879465650,"o":{
  "s":"BTCUSDT","c":"TEST","S":"SELL","o":"TRAILING_STOP_MARKET","f":"GTC","q":"0.001","p":"0","ap":"0",
  "sp":"7103.04","x":"NEW","X":"NEW","i":8886774,"l":"0","z":"0","L":"0","N":"USDT","n":"0","T":1568879465650,
  "t":0,"b":"0","a":"9.91","m":false,"R":false,"wt":"CONTRACT_PRICE","ot":"TRAILING_STOP_MARKET","ps":"LONG",
  "cp":false,"AP":"7476.89","cr":"5.0","pP":false,"si":0,"ss":0,"rp":"0","V":"EXPIRE_TAKER","pm":"OPPONENT",
  "gtd":0}}""")
ACCOUNT_UPDATE = json.loads("""{"e":"ACCOUNT_UPDATE","E":1564745798939,"T":1564745798938,"a":{"m":"ORDER",
  "B":[{"a":"USDT","wb":"122624.12345678","cw":"100.12345678","bc":"50.12345678"},
       {"a":"BUSD","wb":"1.00000000","cw":"0.00000000","bc":"-49.12345678"}],
  "P":[{"s":"BTCUSDT","pa":"0","ep":"0.00000","bep":"0","cr":"200","up":"0","mt":"isolated","iw":"0.00000000",
        "ps":"BOTH"},
       {"s":"BTCUSDT","pa":"20","ep":"6563.66500","bep":"0","cr":"0","up":"2850.21200","mt":"isolated",
        "iw":"13200.70726908","ps":"LONG"},
       {"s":"BTCUSDT","pa":"-10","ep":"6563.86000","bep":"6563.6","cr":"-45.04000000","up":"-1423.15600",
        "mt":"isolated","iw":"6570.42511771","ps":"SHORT"}]}}""")
ALGO_UPDATE = json.loads("""{"e":"ALGO_UPDATE","T":1750515742297,"E":1750515742303,"o":{
  "caid":"Q5xaq5EGKgXXa0fD7fs0Ip","aid":2148719,"at":"CONDITIONAL","o":"TAKE_PROFIT","s":"BNBUSDT","S":"SELL",
  "ps":"BOTH","f":"GTC","q":"0.01","X":"CANCELED","ai":"","ap":"0.00000","aq":"0.00000","act":"0","tp":"750",
  "p":"750","V":"EXPIRE_MAKER","wt":"CONTRACT_PRICE","pm":"NONE","cp":false,"pP":false,"R":false,"tt":0,"gtd":0,
  "rm":"Reduce Only reject"}}""")
MARGIN_CALL = json.loads("""{"e":"MARGIN_CALL","E":1587727187525,"cw":"3.16812045","p":[{"s":"ETHUSDT",
  "ps":"LONG","pa":"1.327","mt":"CROSSED","iw":"0","mp":"187.17127","up":"-1.166074","mm":"1.614445"}]}""")
EXAMPLES = [ORDER_TRADE_UPDATE, ACCOUNT_UPDATE, ALGO_UPDATE, MARGIN_CALL]


def test_order_trade_update_reads_the_order_inside_o():
    r = PARSERS["ORDER_TRADE_UPDATE"](ORDER_TRADE_UPDATE)
    assert (r["symbol"], r["client_order_id"], r["order_id"], r["side"], r["order_type"]) == (
        "BTCUSDT", "TEST", 8886774, "SELL", "TRAILING_STOP_MARKET")
    assert (r["orig_qty"], r["stop_price"], r["execution_type"], r["order_status"]) == (0.001, 7103.04, "NEW", "NEW")
    assert (r["event_time"], r["transaction_time"], r["trade_time"]) == (1568879465651, 1568879465650, 1568879465650)
    assert (r["commission_asset"], r["is_maker"], r["reduce_only"], r["working_type"], r["position_side"]) == (
        "USDT", False, False, "CONTRACT_PRICE", "LONG")


def test_account_update_reads_balances_and_positions_inside_a():
    r = PARSERS["ACCOUNT_UPDATE"](ACCOUNT_UPDATE)
    assert r["reason"] == "ORDER" and r["symbol"] == "BTCUSDT" and r["transaction_time"] == 1564745798938
    assert r["balances"][0] == {"asset": "USDT", "wallet_balance": 122624.12345678,
                                "cross_wallet_balance": 100.12345678, "balance_change": 50.12345678}
    assert [(p["position_amount"], p["entry_price"], p["breakeven_price"], p["position_side"])
            for p in r["positions"]] == [(0.0, 0.0, 0.0, "BOTH"), (20.0, 6563.665, 0.0, "LONG"),
                                         (-10.0, 6563.86, 6563.6, "SHORT")]
    assert r["positions"][2]["accumulated_realized"] == -45.04
    assert r["positions"][1]["isolated_wallet"] == 13200.70726908


def test_algo_update_and_margin_call():
    a = PARSERS["ALGO_UPDATE"](ALGO_UPDATE)
    assert (a["client_order_id"], a["order_id"], a["order_type"], a["order_status"], a["stop_price"]) == (
        "Q5xaq5EGKgXXa0fD7fs0Ip", 2148719, "TAKE_PROFIT", "CANCELED", 750.0)
    assert a["reason"] == "Reduce Only reject" and a["actual_order_id"] is None
    m = PARSERS["MARGIN_CALL"](MARGIN_CALL)
    assert m["cross_wallet_balance"] == 3.16812045 and m["symbol"] == "ETHUSDT"
    p = m["positions"][0]
    assert (p["position_amount"], p["mark_price"], p["maintenance_margin"], p["margin_type"]) == (
        1.327, 187.17127, 1.614445, "CROSSED")


async def _until(predicate, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
def test_stream_publishes_events_and_survives_expiry_keepalive_loss_and_disconnects(broker):
    ensure_topics(broker.bootstrap)
    fake = FakeBinance(["BTCUSDT"], 1_704_153_600_000).start()
    publisher = Publisher(broker.bootstrap)
    rest = RestClient(fake.rest_url, API_KEY, API_SECRET, timeout_s=5)
    reconciled: list[bool] = []

    async def reconcile():  # the stream must not look healthy before reconciliation finished
        reconciled.append(stream.healthy.is_set())

    stream = UserStream(rest, fake.ws_url, publisher, keepalive_s=0.3, on_reconnected=reconcile)

    async def scenario():
        task = asyncio.create_task(stream.run())
        await _until(lambda: stream.connections == 1)
        for event in EXAMPLES:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fake.push_user(event), fake.loop))
        fake.call(fake.send_user_raw, "not json")
        await asyncio.sleep(0.5)  # a keepalive PUT or two
        fake.expire_listen_keys()
        await _until(lambda: stream.connections == 2)
        fake.drop_user_streams()
        await _until(lambda: stream.connections == 3)
        fake.listen_keys.clear()  # Binance forgot the key: the next keepalive gets -1125
        await _until(lambda: stream.connections == 4)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rest.close()

    try:
        asyncio.run(scenario())
    finally:
        fake.stop()
    publisher.flush()
    events = read_topic(broker.bootstrap, "user.events")
    assert sorted(e["event_type"] for e in events) == sorted(m["e"] for m in EXAMPLES)
    assert {e["event_id"] for e in events} == {PARSERS[m["e"]](m)["event_id"] for m in EXAMPLES}
    assert reconciled == [False] * 4
    health = sorted(read_topic(broker.bootstrap, "risk.events"), key=lambda r: r["event_time"])
    kinds = [h["kind"] for h in health]
    assert kinds.count("user_stream_restored") == 4 and kinds.count("user_stream_down") == 3
    assert all(h["severity"] == "critical" for h in health if h["kind"] == "user_stream_down")
    puts = [r for r in fake.requests if r[1] == "PUT" and r[2] == "/fapi/v1/listenKey"]
    assert puts, "the listenKey was kept alive"
    assert [d["reason"] for d in read_topic(broker.bootstrap, "deadletter")] == ["malformed"]


STALE_S = 1.5  # the silence bound in these tests (60 s in production)


def _order(fake: FakeBinance, cid: str, side: str = "BUY", qty: str = "0.010") -> None:
    """A fill on the fake account that nobody's executor made: the stream (or its recovery) must report it."""
    fake.call(fake.new_order, {"symbol": "BTCUSDT", "side": side, "type": "MARKET", "quantity": qty,
                               "newClientOrderId": cid})


def _stream_fill_ids(fake: FakeBinance) -> set[str]:
    """The ids of every fill the fake pushed (delivered or not), as the stream's parser names them."""
    return {PARSERS["ORDER_TRADE_UPDATE"](e)["event_id"] for e in fake.user_events
            if e["e"] == "ORDER_TRADE_UPDATE" and e["o"]["x"] == "TRADE"}


@pytest.mark.timeout(60)
def test_an_idle_stream_stays_up_on_pongs_and_a_silent_one_is_down_within_the_bound(broker):
    ensure_topics(broker.bootstrap)
    fake = FakeBinance(["BTCUSDT"], 1_704_153_600_000).start()
    publisher = Publisher(broker.bootstrap)
    rest = RestClient(fake.rest_url, API_KEY, API_SECRET, timeout_s=5)
    stream = UserStream(rest, fake.ws_url, publisher, stale_s=STALE_S, symbols=["BTCUSDT"])
    measured: dict[str, float] = {}

    async def scenario():
        await rest.sync_time()
        task = asyncio.create_task(stream.run())
        await _until(stream.healthy.is_set)
        await asyncio.sleep(3 * STALE_S)  # no event at all: the pongs alone keep it up
        measured["idle_connections"] = stream.connections
        silenced = time.monotonic()
        fake.silence_user_streams()
        await _until(lambda: not stream.healthy.is_set(), timeout=3 * STALE_S)
        measured["down_after_s"] = time.monotonic() - silenced
        await _until(lambda: stream.connections == 2 and stream.healthy.is_set())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rest.close()

    try:
        asyncio.run(scenario())
    finally:
        fake.stop()
    publisher.flush()
    assert measured["idle_connections"] == 1, "an idle account's stream is not dead"
    # within the bound of the last pong, which came about a third of the bound (one ping period) before the silence
    assert STALE_S / 3 <= measured["down_after_s"] <= STALE_S + 0.5, measured
    health = read_topic(broker.bootstrap, "risk.events")
    assert [h["kind"] for h in health] == ["user_stream_restored", "user_stream_down", "user_stream_restored"]
    down = json.loads(health[1]["detail"])
    assert down["reason"].startswith("silent for") and health[1]["severity"] == "critical", down
    pings = [r for r in fake.requests if r[2] == "/fapi/v1/listenKey" and r[1] == "POST"]
    assert len(pings) == 2, "a new listenKey session after the silent one"


@pytest.mark.timeout(60)
def test_a_fill_missed_while_down_reaches_user_events_once_and_restored_waits_for_reconcile_and_recovery(broker):
    ensure_topics(broker.bootstrap)
    fake = FakeBinance(["BTCUSDT"], 1_704_153_600_000).start()
    publisher = Publisher(broker.bootstrap)
    rest = RestClient(fake.rest_url, API_KEY, API_SECRET, timeout_s=5)
    reconciling, release = asyncio.Event(), asyncio.Event()
    seen: dict[str, object] = {"reconciles": 0}

    async def reconcile():
        seen["reconciles"] += 1
        assert not stream.healthy.is_set()
        if seen["reconciles"] == 3:  # the reconnect after the failed recovery: held until the test has looked
            reconciling.set()
            await release.wait()
        seen["reconciled_at"] = rest.server_now_ms()

    stream = UserStream(rest, fake.ws_url, publisher, stale_s=STALE_S, on_reconnected=reconcile,
                        symbols=["BTCUSDT"])

    async def scenario():
        await rest.sync_time()
        task = asyncio.create_task(stream.run())
        await _until(stream.healthy.is_set)
        _order(fake, "live-fill")  # delivered by the stream: never again by the recovery
        await _until(lambda: len(stream._seen_trades) == 1)
        fake.silence_user_streams()
        _order(fake, "missed-fill")  # the connection is dead, nobody knows yet
        fake.fail_next("/fapi/v1/userTrades", 400, -1000, "fake: an unknown error occurred")
        await _until(reconciling.is_set, timeout=3 * STALE_S + 5)
        _order(fake, "fill-during-reconcile", side="SELL", qty="0.005")  # on the live connection and over REST
        await asyncio.sleep(0.3)
        seen["healthy_while_reconciling"] = stream.healthy.is_set()
        seen["risk_while_reconciling"] = publisher.published.get("risk.events", 0)
        release.set()
        await _until(lambda: stream.healthy.is_set() and stream.connections == 3)  # the failed recovery retried
        await asyncio.sleep(0.5)  # the new connection's buffered events are read (and not published again)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rest.close()

    try:
        asyncio.run(scenario())
    finally:
        fake.stop()
    publisher.flush()
    assert -1000 in fake.rest_errors, "the injected userTrades failure fired"
    assert not seen["healthy_while_reconciling"] and seen["risk_while_reconciling"] == 2  # restored, down
    events = read_topic(broker.bootstrap, "user.events")
    fills = [e for e in events if e["execution_type"] == "TRADE"]
    assert len(_stream_fill_ids(fake)) == 3
    assert sorted(e["event_id"] for e in fills) == sorted(_stream_fill_ids(fake)), "each fill once, the stream's id"
    by_client = {e["client_order_id"]: e for e in fills}
    assert by_client["live-fill"]["source"] == "binance-ws" and by_client["missed-fill"]["source"] == "binance-rest"
    missed = by_client["missed-fill"]
    assert (missed["order_status"], missed["filled_qty"], missed["last_filled_qty"], missed["side"]) == (
        "FILLED", 0.01, 0.01, "BUY")
    health = sorted(read_topic(broker.bootstrap, "risk.events"), key=lambda r: r["event_time"])
    assert [h["kind"] for h in health] == ["user_stream_restored", "user_stream_down", "user_stream_restored"]
    restored = health[-1]
    assert restored["event_time"] >= seen["reconciled_at"] and seen["reconciles"] == 3
    assert json.loads(restored["detail"])["recovered_fills"] == 2


@pytest.mark.timeout(60)
def test_the_scheduled_roll_reconnects_at_once_through_reconcile_and_recovery(broker):
    ensure_topics(broker.bootstrap)
    fake = FakeBinance(["BTCUSDT"], 1_704_153_600_000).start()
    publisher = Publisher(broker.bootstrap)
    rest = RestClient(fake.rest_url, API_KEY, API_SECRET, timeout_s=5)
    reconciles: list[bool] = []

    async def reconcile():
        reconciles.append(stream.healthy.is_set())

    stream = UserStream(rest, fake.ws_url, publisher, stale_s=STALE_S, max_connection_s=1.0,
                        on_reconnected=reconcile, symbols=["BTCUSDT"])

    async def scenario():
        await rest.sync_time()
        task = asyncio.create_task(stream.run())
        await _until(lambda: stream.connections == 3 and stream.healthy.is_set())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rest.close()

    try:
        asyncio.run(scenario())
    finally:
        fake.stop()
    publisher.flush()
    assert reconciles[:3] == [False] * 3
    health = sorted(read_topic(broker.bootstrap, "risk.events"), key=lambda r: r["event_time"])
    downs = [json.loads(h["detail"]) for h in health if h["kind"] == "user_stream_down"]
    restores = [json.loads(h["detail"]) for h in health if h["kind"] == "user_stream_restored"]
    assert [d["reason"] for d in downs][:2] == ["rollover", "rollover"]
    assert all(r["down_ms"] < 500 for r in restores[1:3]), restores  # no backoff: only the reconnect's own time
    fetched = [r for r in fake.requests if r[2] == "/fapi/v1/userTrades"]
    assert len(fetched) >= 2, "each roll fetched the fills it may have missed"


def test_a_fill_fetched_over_rest_gets_the_id_of_the_stream_event_it_stands_for():
    """An order filled in two trades: the stream says PARTIALLY_FILLED then FILLED, and so must the recovery (the
    status is part of the event id), with the cumulative quantity after each trade."""
    order = {"orderId": 25851813, "symbol": "BTCUSDT", "clientOrderId": "open-x-entry", "side": "SELL",
             "type": "MARKET", "origQty": "0.003", "reduceOnly": False, "timeInForce": "GTC"}
    trades = [{"buyer": False, "commission": "0.07819010", "commissionAsset": "USDT", "id": 698759, "maker": False,
               "orderId": 25851813, "price": "7819.01", "qty": "0.002", "quoteQty": "15.63802",
               "realizedPnl": "-0.91539999", "side": "SELL", "positionSide": "BOTH", "symbol": "BTCUSDT",
               "time": 1569514978020},
              {"buyer": False, "commission": "0.03909000", "commissionAsset": "USDT", "id": 698760, "maker": False,
               "orderId": 25851813, "price": "7818.00", "qty": "0.001", "quoteQty": "7.818", "realizedPnl": "0",
               "side": "SELL", "positionSide": "BOTH", "symbol": "BTCUSDT", "time": 1569514978025}]
    streamed = []
    for trade, status, filled in ((trades[0], "PARTIALLY_FILLED", "0.002"), (trades[1], "FILLED", "0.003")):
        o = {**ORDER_TRADE_UPDATE["o"], "s": "BTCUSDT", "c": "open-x-entry", "S": "SELL",
             "o": "MARKET", "q": "0.003", "x": "TRADE", "X": status, "i": 25851813, "l": trade["qty"], "z": filled,
             "L": trade["price"], "T": trade["time"], "t": trade["id"]}
        streamed.append(PARSERS["ORDER_TRADE_UPDATE"]({"e": "ORDER_TRADE_UPDATE", "E": trade["time"] + 3,
                                                       "T": trade["time"] + 1, "o": o}))
    fetched = [fill_from_rest(t, order, trades) for t in trades]
    assert [f["event_id"] for f in fetched] == [s["event_id"] for s in streamed]
    assert [(f["order_status"], f["filled_qty"], f["last_filled_qty"]) for f in fetched] == [
        ("PARTIALLY_FILLED", 0.002, 0.002), ("FILLED", 0.003, 0.001)]
    assert fetched[1]["avg_price"] == pytest.approx((0.002 * 7819.01 + 0.001 * 7818.0) / 0.003)
    assert {f["source"] for f in fetched} == {"binance-rest"} and fetched[0]["client_order_id"] == "open-x-entry"
