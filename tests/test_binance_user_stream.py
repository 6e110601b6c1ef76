"""The user data stream: Binance's documented example events parse field by field into `user.events`;
listenKey expiry, keepalive failure and disconnects reconnect, with a critical `user_stream_down` risk
event each time and `user_stream_restored` only after reconciliation ran."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from connectors.binance.publish import Publisher
from connectors.binance.rest import RestClient
from connectors.binance.user_stream import PARSERS, UserStream
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
