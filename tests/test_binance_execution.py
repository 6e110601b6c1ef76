"""The execution connector against the fake exchange and the real broker: Binance's signature vector; an
intent from `orders` becomes one MARKET entry and two algo protective orders with exchangeInfo rounding,
and replaying it places nothing new; a rejected protective order closes the position at once; a timed-out
entry is looked up, not duplicated; -2019 and -1021 are handled by code; a restart finds and fixes an
unprotected position and an orphaned order; no secret reaches the logs."""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal

import pytest

from connectors.binance.execution import Executor, OrderConsumer, client_ids
from connectors.binance.publish import Publisher
from connectors.binance.rest import RestClient, sign
from connectors.binance.rules import SymbolRules
from schemas.codec import default_codec
from streams.broker import EmbeddedBroker, ensure_topics, producer_config
from tests.conftest import read_topic
from tests.fake_binance import API_KEY, API_SECRET, FakeBinance

NOW = 1_704_240_000_000  # 2024-01-03 00:00 UTC: the fake's clock (real time from there)


@pytest.fixture(scope="module")
def bootstrap():
    b = EmbeddedBroker().start()
    ensure_topics(b.bootstrap)
    yield b.bootstrap
    b.stop()


@pytest.fixture
def fake():
    f = FakeBinance(["BTCUSDT", "ETHUSDT"], NOW).start()
    yield f
    f.stop()


def intent(intent_id: str, symbol: str = "BTCUSDT", side: str = "BUY", qty: float = 0.0123456,
           sl: float | None = 43_000.04, tp: float | None = 47_000.06, action: str = "OPEN",
           leverage: int | None = None) -> dict:
    return {"event_id": f"order:{intent_id}", "event_time": NOW, "symbol": symbol, "intent_id": intent_id,
            "action": action, "side": side, "quantity": qty, "stop_loss": sl, "take_profit": tp, "source": "test",
            "leverage": leverage}


def run(fake: FakeBinance, bootstrap: str, body, timeout_s: float = 5.0):
    """Run `body(executor)` with a started executor; returns its result."""
    async def main():
        rest = RestClient(fake.rest_url, API_KEY, API_SECRET, timeout_s=timeout_s)
        ex = Executor(rest, Publisher(bootstrap), ["BTCUSDT", "ETHUSDT"], leverage=3)
        try:
            await ex.start()
            return await body(ex)
        finally:
            ex.publisher.flush()
            await rest.close()
    return asyncio.run(main())


def risk_events(bootstrap: str, intent_id: str) -> list[dict]:
    return [r for r in read_topic(bootstrap, "risk.events") if intent_id in r["detail"]]


def test_signature_matches_binance_documented_example():
    secret = "2b5eb11e18796d12d88f13dc27dbbd02c2cc51ff7059765ed9821957d82bb4d9"
    query = ("symbol=BTCUSDT&side=BUY&type=LIMIT&quantity=1&price=9000&timeInForce=GTC&recvWindow=5000"
             "&timestamp=1591702613943")
    assert sign(secret, query) == "3c661234138461fcc7a7d8746c6558c9842d4e10870d2ecbedf7777cad694af9"


def test_rounding_follows_exchange_info_filters():
    rules = SymbolRules(Decimal("0.10"), Decimal("0.001"), Decimal("0.001"), Decimal("100"))
    assert rules.quantity(0.0123456) == Decimal("0.012") and rules.quantity(0.0129999) == Decimal("0.012")
    assert rules.price(41_000.04) == Decimal("41000.0") and rules.price(41_000.06) == Decimal("41000.1")
    ids = client_ids("intent-1")
    assert ids == client_ids("intent-1") and len(set(ids.values())) == 4
    assert all(len(i) <= 36 for i in ids.values())


@pytest.mark.timeout(90)
def test_intent_from_the_topic_trades_once_with_protection_and_replay_is_harmless(fake, bootstrap):
    codec = default_codec()
    from confluent_kafka import Producer

    producer = Producer(producer_config(bootstrap))
    record = intent("topic-intent-1")
    producer.produce("orders", codec.encode("order", record), b"BTCUSDT")
    producer.flush()

    async def consume(ex: Executor, group: str):
        consumer = OrderConsumer(bootstrap, ex, group=group)
        task = asyncio.create_task(consumer.run())
        deadline = time.monotonic() + 30
        while consumer.handled < 1:
            assert time.monotonic() < deadline and not task.done(), "the intent was not consumed"
            await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(fake, bootstrap, lambda ex: consume(ex, "exec-a"))
    run(fake, bootstrap, lambda ex: consume(ex, "exec-b"))  # another group replays the same intent
    ids = client_ids("topic-intent-1")
    orders = fake.exchange_orders("BTCUSDT")
    assert [(o["clientOrderId"], o["type"], o["origQty"]) for o in orders] == [(ids["entry"], "MARKET", "0.012")]
    algos = sorted(fake.account.algo_orders.values(), key=lambda a: a["orderType"])
    assert [(a["clientAlgoId"], a["orderType"], a["triggerPrice"], a["workingType"], a["closePosition"], a["side"])
            for a in algos] == [(ids["sl"], "STOP_MARKET", "43000", "MARK_PRICE", True, "SELL"),
                                (ids["tp"], "TAKE_PROFIT_MARKET", "47000.1", "MARK_PRICE", True, "SELL")]
    paths = [(m, p) for _, m, p, _ in fake.requests if m == "POST"]
    first_order = paths.index(("POST", "/fapi/v1/order"))
    assert {("POST", "/fapi/v1/marginType"), ("POST", "/fapi/v1/leverage")} <= set(paths[:first_order])
    assert fake.account.positions["BTCUSDT"].margin_type == "isolated"
    assert fake.account.positions["BTCUSDT"].leverage == 3
    # conditional orders never go to /fapi/v1/order (Binance answers -4120 there since 2025-12-09)
    assert not [p for _, m, path, p in fake.requests if path == "/fapi/v1/order" and m == "POST"
                and p["type"] != "MARKET"]
    assert fake.account.positions["BTCUSDT"].amount == Decimal("0.012")


@pytest.mark.timeout(90)
def test_no_order_is_placed_while_the_user_stream_is_down(fake, bootstrap):
    from confluent_kafka import Producer

    producer = Producer(producer_config(bootstrap))
    halted = intent("halted-1", symbol="ETHUSDT", qty=0.5, sl=2_200.0, tp=2_600.0)
    producer.produce("orders", default_codec().encode("order", halted), b"ETHUSDT")
    producer.flush()

    async def body(ex: Executor):
        ready = asyncio.Event()  # the user stream's `healthy`: down
        consumer = OrderConsumer(bootstrap, ex, ready=ready, group="exec-halted")
        task = asyncio.create_task(consumer.run())
        await asyncio.sleep(6)  # the group joins (~3 s) and the intent is read, but must wait
        placed_while_down = len(fake.exchange_orders())
        ready.set()  # reconnected and reconciled
        deadline = time.monotonic() + 20
        while not fake.exchange_orders("ETHUSDT"):  # (the group also replays earlier tests' intents)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return placed_while_down

    assert run(fake, bootstrap, body) == 0
    assert [o["clientOrderId"] for o in fake.exchange_orders("ETHUSDT")] == [client_ids("halted-1")["entry"]]


@pytest.mark.timeout(60)
def test_when_one_protective_order_fires_its_sibling_is_cancelled(fake, bootstrap):
    async def body(ex: Executor):
        assert await ex.execute(intent("sibling-1")) == "filled"
        ids = client_ids("sibling-1")
        before = len(fake.user_events)
        fake.call(fake.trigger_algo, ids["sl"])
        for event in fake.user_events[before:]:  # as the user stream would deliver them
            await ex.on_user_event(event)
        return ids

    ids = run(fake, bootstrap, body)
    status = {a["clientAlgoId"]: a["algoStatus"] for a in fake.account.algo_orders.values()}
    assert status == {ids["sl"]: "FINISHED", ids["tp"]: "CANCELED"}
    assert fake.account.positions["BTCUSDT"].amount == 0


def test_each_entry_trades_at_the_leverage_the_risk_guard_sized_it_with(fake, bootstrap):
    """The intent's leverage, set on the exchange before its entry (the configured one only when it names none)."""
    async def body(ex: Executor):
        assert await ex.execute(intent("lev-5", leverage=5)) == "filled"
        assert fake.account.positions["BTCUSDT"].leverage == 5
        assert await ex.execute(intent("lev-eth", symbol="ETHUSDT", qty=0.5, sl=2_000.0, tp=2_600.0)) == "filled"
        assert fake.account.positions["ETHUSDT"].leverage == 3
        assert await ex.execute(intent("lev-5-again", leverage=5, action="CLOSE")) == "closed"
        assert await ex.execute(intent("lev-5-next", leverage=5)) == "filled"

    run(fake, bootstrap, body)
    leverage_calls = [p for _, m, path, p in fake.requests if path == "/fapi/v1/leverage" and m == "POST"]
    assert [(p["symbol"], str(p["leverage"])) for p in leverage_calls] == [("BTCUSDT", "5"), ("ETHUSDT", "3")]


@pytest.mark.timeout(60)
def test_a_rejected_protective_order_closes_the_position_at_once(fake, bootstrap):
    fake.fail_next("/fapi/v1/algoOrder", 400, -2021, "Order would immediately trigger.")
    outcome = run(fake, bootstrap, lambda ex: ex.execute(intent("naked-1")))
    assert outcome == "closed"
    assert [f.code for f in fake.fired_on("POST", "/fapi/v1/algoOrder")] == [-2021]
    assert fake.account.positions["BTCUSDT"].amount == 0
    ids = client_ids("naked-1")
    assert [o["clientOrderId"] for o in fake.exchange_orders()] == [ids["entry"], ids["close"]]
    assert not fake.open_algo_orders({})
    events = risk_events(bootstrap, "naked-1")
    assert [(e["kind"], e["severity"]) for e in events] == [("protection_failed", "critical")]


@pytest.mark.timeout(60)
def test_a_timed_out_entry_is_looked_up_not_duplicated(fake, bootstrap):
    fake.fail_next("/fapi/v1/order", 200, delay_after_accept=2.5)  # accepted, but the answer comes too late
    outcome = run(fake, bootstrap, lambda ex: ex.execute(intent("timeout-1")), timeout_s=1.0)
    assert outcome == "filled"
    assert [f.delay_after_accept for f in fake.fired_on("POST", "/fapi/v1/order")] == [2.5]
    entry_posts = [p for _, m, path, p in fake.requests if (m, path) == ("POST", "/fapi/v1/order")]
    assert len(entry_posts) == 1, "an entry whose outcome was unknown is looked up, never sent again"
    assert len(fake.exchange_orders("BTCUSDT")) == 1
    assert len(fake.account.algo_orders) == 2


@pytest.mark.timeout(60)
def test_margin_insufficient_is_rejected_and_reported_and_clock_skew_is_resynced(fake, bootstrap):
    fake.fail_next("/fapi/v1/order", 400, -2019, "Margin is insufficient.")

    async def body(ex: Executor):
        rejected = await ex.execute(intent("margin-1"))
        fake.clock.skew_ms = 8_000  # the server's clock jumps: our timestamps fall outside recvWindow
        filled = await ex.execute(intent("skew-1", symbol="ETHUSDT", qty=0.5, sl=2_200.0, tp=2_600.0))
        return rejected, filled

    assert run(fake, bootstrap, body) == ("rejected", "filled")
    assert [(e["kind"], '"code": -2019' in e["detail"]) for e in risk_events(bootstrap, "margin-1")] == [
        ("order_rejected", True)]
    assert fake.rest_errors.count(-1021) == 1, "one -1021, then the resynced retry went through"
    assert fake.account.positions["BTCUSDT"].amount == 0
    assert fake.account.positions["ETHUSDT"].amount == Decimal("0.5")


@pytest.mark.timeout(60)
def test_restart_finds_an_unprotected_position_and_an_orphan_and_fixes_both(fake, bootstrap):
    fake.set_position("BTCUSDT", "0.010", 42_000.0)  # left over by a crash before protection was placed

    async def seed_orphan():
        await fake.new_algo_order({"symbol": "ETHUSDT", "algoType": "CONDITIONAL", "type": "STOP_MARKET",
                                   "side": "SELL", "triggerPrice": "2000.00", "closePosition": "true",
                                   "clientAlgoId": "old-orphan-sl"})
    fake.call(seed_orphan)
    summary = run(fake, bootstrap, lambda ex: ex.reconcile())
    assert summary["closed"] == ["BTCUSDT"] and summary["cancelled"] == ["old-orphan-sl"]
    assert fake.account.positions["BTCUSDT"].amount == 0
    assert not fake.open_algo_orders({})
    kinds = {(r["kind"], r["symbol"]) for r in read_topic(bootstrap, "risk.events")}
    assert {("unprotected_position", "BTCUSDT"), ("orphan_order_cancelled", "ETHUSDT")} <= kinds


@pytest.mark.timeout(60)
def test_no_secret_in_the_logs(fake, bootstrap, caplog):
    caplog.set_level(logging.DEBUG)
    fake.fail_next("/fapi/v1/algoOrder", 400, -2021, "Order would immediately trigger.")
    run(fake, bootstrap, lambda ex: ex.execute(intent("secret-1")))
    assert caplog.text, "the run logged something"
    assert API_SECRET not in caplog.text and API_KEY not in caplog.text
    assert "signature=" not in caplog.text
    rest = RestClient("http://x", API_KEY, API_SECRET)
    assert API_SECRET not in repr(rest) and API_KEY not in repr(rest)


@pytest.mark.timeout(90)
def test_a_failing_close_is_retried_until_flat_and_no_entry_is_taken_meanwhile(fake, bootstrap):
    """The stop-loss is refused (-2021) and the emergency close then fails six times: the close goes on with backoff
    until the position is flat, a critical close_failed each time; an entry meanwhile is refused; close_recovered."""
    from connectors.binance.execution import ExecutionConfig, State

    fake.fail_next("/fapi/v1/algoOrder", 400, -2021, "Order would immediately trigger.")
    fake.fail_next("/fapi/v1/order", 503, 0, "Service Unavailable.", nth=2, times=6)

    async def body(ex: Executor):
        ex.config = ExecutionConfig(maintenance_interval_s=0.2, close_backoff_max_s=0.5)
        maintenance = asyncio.create_task(ex.maintain())
        first = await ex.execute(intent("close-retry-1"))
        meanwhile = await ex.execute(intent("close-retry-eth", symbol="ETHUSDT", qty=0.5, sl=2_200.0, tp=2_600.0))
        deadline = time.monotonic() + 30
        while ex.lifecycles["close-retry-1"].state != State.CLOSED:
            assert time.monotonic() < deadline, ex.lifecycles["close-retry-1"]
            await asyncio.sleep(0.1)
        maintenance.cancel()
        return first, meanwhile

    first, meanwhile = run(fake, bootstrap, body)
    assert (first, meanwhile) == ("closing", "rejected")
    assert len(fake.fired_on("POST", "/fapi/v1/order")) == 6, "every close failure fired"
    assert fake.account.positions["BTCUSDT"].amount == 0 and fake.account.positions["ETHUSDT"].amount == 0
    assert not fake.open_algo_orders({})
    kinds = [e["kind"] for e in risk_events(bootstrap, "close-retry-1")]
    assert kinds.count("close_failed") == 6 and kinds[-1] == "close_recovered", kinds
    assert [e["kind"] for e in risk_events(bootstrap, "close-retry-eth")] == ["order_rejected"]


@pytest.mark.timeout(60)
def test_an_intent_older_than_two_bars_is_not_traded(fake, bootstrap):
    stale = {**intent("stale-1"), "event_time": NOW - 11 * 60_000}
    assert run(fake, bootstrap, lambda ex: ex.execute(stale)) == "expired"
    assert not fake.exchange_orders()
    assert [e["kind"] for e in risk_events(bootstrap, "stale-1")] == ["intent_expired"]
