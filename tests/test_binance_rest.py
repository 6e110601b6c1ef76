"""The REST client against the fake exchange: it stays under the request-weight limit by itself, waits out
429 and 418 for as long as Retry-After says, retries GETs on 5xx, and never retries a state-changing
request whose outcome is unknown."""

from __future__ import annotations

import asyncio
import time

import pytest

from connectors.binance.rest import RestClient, UnknownOutcome
from tests.fake_binance import API_KEY, API_SECRET, FakeBinance

MINUTE = 60_000
NOW = 1_704_240_000_000 - 1_500  # 1.5 s before a minute boundary of the fake's clock


@pytest.fixture
def fake():
    f = FakeBinance(["BTCUSDT"], NOW, weight_limit=12).start()
    yield f
    f.stop()


def run(coro):
    return asyncio.run(coro)


def test_weight_budget_pauses_until_the_next_minute_instead_of_hitting_429(fake):
    async def main():
        async with RestClient(fake.rest_url) as rest:
            await rest.sync_time()
            rest.use_limits(await rest.get("/fapi/v1/exchangeInfo"))
            assert rest.weight_limit_1m == 12
            started = time.monotonic()
            for _ in range(15):  # more than one minute's budget
                await rest.get("/fapi/v1/time")
            return time.monotonic() - started
    elapsed = run(main())
    assert fake.rest_errors == [], "never over the limit"
    assert elapsed >= 0.5, "it waited for the minute to turn"


def test_429_and_418_are_waited_out_as_told(fake):
    fake.fail_next("/fapi/v1/time", 429, -1003, "Too many requests.", retry_after=0.4)
    fake.fail_next("/fapi/v1/time", 418, -1003, "Way too many requests; IP banned.", retry_after=0.6)

    async def main():
        async with RestClient(fake.rest_url) as rest:
            return await rest.get("/fapi/v1/time")
    assert "serverTime" in run(main())
    t = [t for t, _, path, _ in fake.requests if path == "/fapi/v1/time"]
    assert len(t) == 3 and t[1] - t[0] >= 0.4 and t[2] - t[1] >= 0.6
    assert fake.ban_violations == 0


def test_get_is_retried_on_5xx_but_an_order_is_not(fake):
    fake.fail_next("/fapi/v1/time", 503, 0, "Service Unavailable")
    fake.fail_next("/fapi/v1/order", 502, 0, "Bad Gateway")

    async def main():
        async with RestClient(fake.rest_url, API_KEY, API_SECRET) as rest:
            await rest.sync_time()
            with pytest.raises(UnknownOutcome):
                await rest.signed("POST", "/fapi/v1/order", {"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET",
                                                             "quantity": "0.01", "newClientOrderId": "x-1"})
    run(main())
    assert [p for _, m, p, _ in fake.requests].count("/fapi/v1/order") == 1
