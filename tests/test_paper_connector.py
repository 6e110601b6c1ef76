"""The paper exchange through the real broker: market data and an order intent in, the Binance-shaped
event sequence out on `user.events`; a restart resumes from the saved state without a second position."""

from __future__ import annotations

import threading
import time

from connectors.binance.execution import client_ids
from connectors.binance.publish import Publisher
from connectors.paper.connector import PaperConnector
from connectors.paper.engine import PaperConfig
from schemas import records
from streams.broker import ensure_topics
from tests.conftest import read_topic

T0 = 1_704_067_200_000 - 300_000  # bar 1 opens 2024-01-01 00:00 UTC, a funding settlement time
CONFIG = PaperConfig(taker_fee=0.0004, slippage_bps=10, leverage=5, initial_balance=10_000)


def bar(i: int, o: float, h: float, low: float, c: float, interval: str = "5m") -> dict:
    t = T0 + i * 300_000
    return records.kline("BTCUSDT", interval, t, t + 299_999, o, h, low, c, 1.0, None, None, None, None, "test")


def intent(intent_id: str) -> dict:
    return {"event_id": f"order:{intent_id}", "event_time": T0 + 299_999, "symbol": "BTCUSDT", "intent_id": intent_id,
            "action": "OPEN", "side": "BUY", "quantity": 10.0, "stop_loss": 98.0, "take_profit": 104.0,
            "source": "test"}


def send(bootstrap: str, items: list[tuple[str, dict]]) -> None:
    pub = Publisher(bootstrap)
    for topic, rec in items:
        pub.publish(topic, rec)
    assert pub.flush() == 0


def run_until(connector: PaperConnector, events: int, timeout: float = 60) -> None:
    t = threading.Thread(target=connector.run, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while connector.events < events:
        assert time.monotonic() < deadline and t.is_alive(), f"{connector.events} of {events} events"
        time.sleep(0.1)
    time.sleep(1.0)  # a last poll: nothing more may come
    connector.stop()
    t.join(30)


def test_order_fill_protection_trigger_and_restart_through_the_broker(broker, tmp_path):
    bootstrap = broker.bootstrap
    ensure_topics(bootstrap)
    state = tmp_path / "paper" / "state.json"
    send(bootstrap, [("md.klines", bar(0, 100, 100, 100, 100)), ("orders", intent("i1")),
                     ("orders", intent("i1")),  # duplicated intent
                     ("md.klines", bar(1, 100, 101, 99.5, 100.5)),
                     ("md.klines", bar(1, 100, 130, 60, 100.5, interval="1m"))])  # another interval: ignored
    first = PaperConnector(bootstrap, state, CONFIG)
    run_until(first, 5)
    assert first.events == 5 and state.exists()
    # a group without committed offsets (another broker's life) does not inherit the saved position
    assert PaperConnector(bootstrap, state, CONFIG, group="perpflow-paper-fresh").exchange.state.positions == {}

    # restart: the saved state holds the position; a new duplicate, funding and the take-profit bar
    send(bootstrap, [("orders", intent("i1")),
                     ("md.funding", records.funding("BTCUSDT", T0 + 2 * 300_000, 0.0001, 100.0, "test")),
                     ("md.klines", bar(2, 100, 104.5, 99, 104))])
    second = PaperConnector(bootstrap, state, CONFIG)
    assert second.exchange.state.positions["BTCUSDT"].amount == 10
    run_until(second, 7)

    events = read_topic(bootstrap, "user.events")
    ids = client_ids("i1")
    got = [(e["event_type"], e["client_order_id"], e["execution_type"] or e["order_status"] or e["reason"])
           for e in events]
    assert got == [
        ("ORDER_TRADE_UPDATE", ids["entry"], "NEW"), ("ORDER_TRADE_UPDATE", ids["entry"], "TRADE"),
        ("ACCOUNT_UPDATE", None, "ORDER"), ("ALGO_UPDATE", ids["sl"], "NEW"), ("ALGO_UPDATE", ids["tp"], "NEW"),
        ("ACCOUNT_UPDATE", None, "FUNDING_FEE"),
        ("ALGO_UPDATE", ids["tp"], "TRIGGERED"), ("ORDER_TRADE_UPDATE", ids["tp"], "NEW"),
        ("ORDER_TRADE_UPDATE", ids["tp"], "TRADE"), ("ACCOUNT_UPDATE", None, "ORDER"),
        ("ALGO_UPDATE", ids["tp"], "FINISHED"), ("ALGO_UPDATE", ids["sl"], "CANCELED")]
    assert events[1]["last_filled_price"] == 100 * 1.001 and events[1]["trade_time"] == T0 + 300_000
    assert round(events[5]["balances"][0]["balance_change"], 9) == -0.1  # a long pays 10 × 100 × 0.0001
    assert events[8]["last_filled_price"] == 104 * 0.999
    assert len({e["event_id"] for e in events}) == len(events)
    assert {e["source"] for e in events} == {"paper"}
