"""The market connector: Binance's combined WebSocket streams → md.* topics, with REST backfill so that a
disconnect never silently loses a closed bar.

One combined stream per connection carries, per symbol, `<s>@kline_<i>` for every configured interval,
`<s>@markPrice@1s`, `<s>@bookTicker` and `<s>@forceOrder`. Only closed klines (`x: true`) are published.
At start-up and after every reconnect the missing closed klines are fetched from /fapi/v1/klines (paged),
with the mark-price klines, funding settlements and open-interest history of the same span; the connector
remembers the last bar it published per (symbol, interval), so nothing is published twice and a jump
in a live stream is a gap that is filled from REST before the new bar goes out.
A connection silent past `stale_s` is dead; one older than `max_connection_s` is rolled before Binance's
24-hour cut. Pings are answered by the WebSocket library.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import websockets

from connectors.binance.publish import Publisher
from connectors.binance.rest import BinanceError, RestClient
from schemas import event_ids, records
from schemas.records import INTERVAL_MS
from streams import metrics

log = logging.getLogger(__name__)

KLINES_PAGE = 1500  # /fapi/v1/klines limit
FUNDING_PAGE = 1000
OI_PAGE = 500
OI_PERIOD = "5m"
OI_HISTORY_MS = 30 * 86_400_000  # openInterestHist serves the last 30 days only
MARK_INTERVAL = "5m"  # missed marks are backfilled as one per 5m bar, the bars the features are built on


def _f(value) -> float | None:
    return None if value is None or value == "" else float(value)


# -- payload → record (WebSocket) ---------------------------------------------------------------
def kline_from_ws(k: dict, source: str = "binance-ws") -> dict:
    return records.kline(k["s"], k["i"], int(k["t"]), int(k["T"]), float(k["o"]), float(k["h"]), float(k["l"]),
                         float(k["c"]), float(k["v"]), _f(k.get("q")), int(k["n"]) if "n" in k else None,
                         _f(k.get("V")), _f(k.get("Q")), source)


def kline_from_rest(symbol: str, interval: str, row: list, source: str = "binance-rest") -> dict:
    # [openTime, o, h, l, c, volume, closeTime, quoteVolume, trades, takerBuyBase, takerBuyQuote, ignore]
    return records.kline(symbol, interval, int(row[0]), int(row[6]), float(row[1]), float(row[2]), float(row[3]),
                         float(row[4]), float(row[5]), _f(row[7]), int(row[8]), _f(row[9]), _f(row[10]), source)


def mark_from_ws(d: dict) -> dict:
    return records.mark_price(d["s"], int(d["E"]), float(d["p"]), _f(d.get("i")), _f(d.get("P")), _f(d.get("r")),
                              int(d["T"]) if d.get("T") else None, "binance-ws")


def mark_from_rest(symbol: str, row: list) -> dict:
    """A mark-price kline: its close is the mark at the bar's end (no funding rate in it)."""
    return records.mark_price(symbol, int(row[6]), float(row[4]), None, None, None, None,
                              "binance-rest:markPriceKlines")


def funding_from_rest(d: dict) -> dict:
    return records.funding(d["symbol"], int(d["fundingTime"]), float(d["fundingRate"]), _f(d.get("markPrice")),
                           "binance-rest")


def book_from_ws(d: dict) -> dict:
    return {"event_id": event_ids.book_ticker(d["s"], int(d["u"])), "event_time": int(d["E"]), "symbol": d["s"],
            "update_id": int(d["u"]), "bid_price": float(d["b"]), "bid_qty": float(d["B"]),
            "ask_price": float(d["a"]), "ask_qty": float(d["A"]),
            "transaction_time": int(d["T"]) if "T" in d else None, "source": "binance-ws"}


def liquidation_from_ws(d: dict) -> dict:
    o = d["o"]
    return {"event_id": event_ids.liquidation(o["s"], int(o["T"]), o["S"], o["q"], o["p"]), "event_time": int(d["E"]),
            "symbol": o["s"], "side": o["S"], "order_type": o["o"], "time_in_force": o["f"],
            "quantity": float(o["q"]), "price": float(o["p"]), "average_price": float(o["ap"]),
            "order_status": o["X"], "last_filled_qty": float(o["l"]), "filled_qty": float(o["z"]),
            "trade_time": int(o["T"]), "source": "binance-ws"}


def oi_from_rest(symbol: str, d: dict) -> dict:
    """/fapi/v1/openInterest ({openInterest, time}) or /futures/data/openInterestHist (sum…, timestamp)."""
    t = int(d.get("time") or d["timestamp"])
    return {"event_id": event_ids.open_interest(symbol, t), "event_time": t, "symbol": symbol,
            "open_interest": float(d.get("openInterest") or d["sumOpenInterest"]),
            "open_interest_value": _f(d.get("sumOpenInterestValue")), "source": "binance-rest"}


def stream_names(symbols: list[str], intervals: list[str]) -> list[str]:
    names = []
    for s in symbols:
        s = s.lower()
        names += [f"{s}@kline_{i}" for i in intervals]
        names += [f"{s}@markPrice@1s", f"{s}@bookTicker", f"{s}@forceOrder"]
    return names


# -- REST history, shared by the live connector and `perpflow backfill` --------------------------
class History:
    """Pages Binance's history endpoints into records. Every call goes through the RestClient, which keeps
    the request weight under the limit and waits out 429/418."""

    def __init__(self, rest: RestClient):
        self.rest = rest

    async def klines(self, symbol: str, interval: str, start_ms: int, end_ms: int, path: str = "/fapi/v1/klines"):
        """Closed bars with open time in [start_ms, end_ms), in pages; yields lists of raw rows."""
        step = INTERVAL_MS[interval]
        cursor = start_ms
        while cursor < end_ms:
            rows = await self.rest.get(path, {"symbol": symbol, "interval": interval, "startTime": cursor,
                                              "endTime": end_ms - 1, "limit": KLINES_PAGE})
            rows = [r for r in rows if cursor <= int(r[0]) < end_ms]
            if not rows:
                return
            yield rows
            cursor = int(rows[-1][0]) + step

    async def funding(self, symbol: str, start_ms: int, end_ms: int):
        cursor = start_ms
        while cursor < end_ms:
            rows = await self.rest.get("/fapi/v1/fundingRate", {"symbol": symbol, "startTime": cursor,
                                                                "endTime": end_ms - 1, "limit": FUNDING_PAGE})
            rows = [r for r in rows if cursor <= int(r["fundingTime"]) < end_ms]
            if not rows:
                return
            yield rows
            cursor = int(rows[-1]["fundingTime"]) + 1

    async def open_interest(self, symbol: str, start_ms: int, end_ms: int):
        cursor = max(start_ms, self.rest.server_now_ms() - OI_HISTORY_MS + 60_000)
        while cursor < end_ms:
            rows = await self.rest.get("/futures/data/openInterestHist", {
                "symbol": symbol, "period": OI_PERIOD, "startTime": cursor, "endTime": end_ms - 1, "limit": OI_PAGE})
            rows = [r for r in rows if cursor <= int(r["timestamp"]) < end_ms]
            if not rows:
                return
            yield rows
            cursor = int(rows[-1]["timestamp"]) + 1


@dataclass
class MarketState:
    """What was published: the last closed bar per (symbol, interval), the newest funding time per symbol."""

    last_open: dict[tuple[str, str], int] = field(default_factory=dict)
    next_funding: dict[str, int] = field(default_factory=dict)
    last_funding: dict[str, int] = field(default_factory=dict)


class MarketConnector:
    def __init__(self, rest: RestClient, ws_base: str, publisher: Publisher, symbols: list[str],
                 intervals: list[str], start_ms: int, stale_s: float = 30.0,
                 max_connection_s: float = 23.5 * 3600, open_interest_s: float = 60.0,
                 state: MarketState | None = None, on_progress: Callable[[str, int], None] | None = None):
        self.rest = rest
        self.history = History(rest)
        self.ws_url = f"{ws_base.rstrip('/')}/stream?streams=" + "/".join(stream_names(symbols, intervals))
        self.publisher = publisher
        self.symbols = symbols
        self.intervals = intervals
        self.start_ms = start_ms  # the first bar wanted when nothing was published yet
        self.stale_s = stale_s
        self.max_connection_s = max_connection_s
        self.open_interest_s = open_interest_s
        self.state = state or MarketState()
        self.on_progress = on_progress
        self.connections = 0
        self.stop = asyncio.Event()

    # -- backfill --------------------------------------------------------------------------
    async def backfill(self, end_ms: int | None = None) -> int:
        """Publish every closed bar after the last one published (or from start_ms) up to end_ms (default:
        the bars closed by now on the server's clock), with the marks, funding and OI of that span."""
        now = self.rest.server_now_ms()
        end = min(end_ms, now) if end_ms is not None else now
        n = 0
        for symbol in self.symbols:
            span_start = None
            for interval in self.intervals:
                step = INTERVAL_MS[interval]
                first = self.state.last_open.get((symbol, interval), self.start_ms - step) + step
                last_closed_open = (end + 1) // step * step - step  # the newest bar whose close_time < end
                if first > last_closed_open:
                    continue
                span_start = first if span_start is None else min(span_start, first)
                n += await self._backfill_klines(symbol, interval, first, last_closed_open + step)
                if interval == MARK_INTERVAL:
                    n += await self._backfill_marks(symbol, interval, first, last_closed_open + step)
            if span_start is not None:
                n += await self._backfill_funding(symbol, span_start, end)
                n += await self._backfill_oi(symbol, span_start, end)
        return n

    async def _backfill_klines(self, symbol: str, interval: str, start: int, end: int) -> int:
        n = 0
        async for rows in self.history.klines(symbol, interval, start, end):
            for row in rows:
                n += self._publish_kline(kline_from_rest(symbol, interval, row))
            if self.on_progress:
                self.on_progress(f"{symbol} {interval}", len(rows))
        metrics.BINANCE_BACKFILLED.labels("md.klines").inc(n)
        return n

    async def _backfill_marks(self, symbol: str, interval: str, start: int, end: int) -> int:
        n = 0
        async for rows in self.history.klines(symbol, interval, start, end, path="/fapi/v1/markPriceKlines"):
            for row in rows:
                self.publisher.publish("md.markprice", mark_from_rest(symbol, row))
                n += 1
        metrics.BINANCE_BACKFILLED.labels("md.markprice").inc(n)
        return n

    async def _backfill_funding(self, symbol: str, start: int, end: int) -> int:
        n = 0
        start = max(start, self.state.last_funding.get(symbol, -1) + 1)
        async for rows in self.history.funding(symbol, start, end):
            for row in rows:
                self.publisher.publish("md.funding", funding_from_rest(row))
                self.state.last_funding[symbol] = int(row["fundingTime"])
                n += 1
        metrics.BINANCE_BACKFILLED.labels("md.funding").inc(n)
        return n

    async def _backfill_oi(self, symbol: str, start: int, end: int) -> int:
        n = 0
        async for rows in self.history.open_interest(symbol, start, end):
            for row in rows:
                self.publisher.publish("md.openinterest", oi_from_rest(symbol, row))
                n += 1
        metrics.BINANCE_BACKFILLED.labels("md.openinterest").inc(n)
        return n

    def _publish_kline(self, record: dict) -> int:
        key = (record["symbol"], record["interval"])
        if record["open_time"] <= self.state.last_open.get(key, -1):
            return 0  # already published (backfill and stream overlap)
        self.publisher.publish("md.klines", record)
        self.state.last_open[key] = record["open_time"]
        metrics.LAST_CLOSED_BAR.labels(*key).set(record["close_time"] / 1000)
        return 1

    # -- the live loop ---------------------------------------------------------------------
    async def run(self) -> None:
        await self.rest.sync_time()
        self.rest.use_limits(await self.rest.get("/fapi/v1/exchangeInfo"))
        await self.backfill()
        poller = asyncio.create_task(self._poll_open_interest())
        attempt = 0
        try:
            while not self.stop.is_set():
                reason = await self._session()
                if self.stop.is_set():
                    break
                metrics.CONNECTOR_RECONNECTS.labels("binance-market").inc()
                attempt = 0 if reason == "rollover" else attempt + 1
                delay = 0 if reason == "rollover" else min(0.25 * 2 ** attempt, 30.0) * random.uniform(0.5, 1.0)
                log.warning("market stream: %s; reconnecting in %.1f s", reason, delay)
                await asyncio.sleep(delay)
        finally:
            poller.cancel()
            metrics.CONNECTOR_CONNECTED.labels("binance-market").set(0)

    async def _session(self) -> str:
        """One connection: connect, backfill what was missed, then stream. Returns why it ended."""
        try:
            async with websockets.connect(self.ws_url, ping_interval=None, max_size=2**22, open_timeout=10) as ws:
                self.connections += 1
                metrics.CONNECTOR_CONNECTED.labels("binance-market").set(1)
                if self.connections > 1:
                    await self.rest.sync_time()
                    n = await self.backfill()
                    log.info("market stream reconnected; %d records backfilled", n)
                opened = time.monotonic()
                while not self.stop.is_set():
                    if time.monotonic() - opened > self.max_connection_s:
                        return "rollover"
                    try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                        async with asyncio.timeout(self.stale_s):
                            raw = await ws.recv()
                    except TimeoutError:
                        return "stale"
                    await self._on_message(raw)
                return "stopped"
        except (OSError, websockets.WebSocketException, TimeoutError) as exc:
            return f"disconnected ({type(exc).__name__})"
        except BinanceError as exc:  # the backfill gave up for now; the next connection tries again
            return f"backfill failed ({exc})"
        finally:
            metrics.CONNECTOR_CONNECTED.labels("binance-market").set(0)

    async def _on_message(self, raw: str | bytes) -> None:
        payload = raw.encode() if isinstance(raw, str) else raw
        try:
            msg = json.loads(payload)
            data = msg["data"]
            event = data["e"]
        except (ValueError, KeyError, TypeError) as exc:
            self.publisher.dead_letter("binance:market", payload, "malformed", f"{type(exc).__name__}: {exc}")
            return
        metrics.BINANCE_MESSAGES.labels("binance-market", event).inc()
        if isinstance(data.get("E"), int):
            latency = max(self.rest.server_now_ms() - data["E"], 0) / 1000
            metrics.BINANCE_LATENCY.labels("binance-market").observe(latency)
        try:
            if event == "kline":
                if data["k"]["x"]:
                    await self._on_closed_kline(kline_from_ws(data["k"]))
            elif event == "markPriceUpdate":
                record = mark_from_ws(data)
                self.publisher.publish("md.markprice", record)
                await self._on_next_funding(record["symbol"], record["next_funding_time"])
            elif event == "bookTicker":
                self.publisher.publish("md.bookticker", book_from_ws(data))
            elif event == "forceOrder":
                self.publisher.publish("md.liquidations", liquidation_from_ws(data))
            else:
                self.publisher.dead_letter("binance:market", payload, "unknown_event", str(event))
        except (ValueError, KeyError, TypeError) as exc:
            self.publisher.dead_letter("binance:market", payload, "invalid_field", f"{type(exc).__name__}: {exc}")

    async def _on_closed_kline(self, record: dict) -> None:
        key = (record["symbol"], record["interval"])
        last = self.state.last_open.get(key)
        step = INTERVAL_MS[record["interval"]]
        if last is not None and record["open_time"] > last + step:
            missing = (record["open_time"] - last) // step - 1
            metrics.BINANCE_GAPS.labels(*key).inc()
            log.warning("gap in %s %s: %d bar(s) missing before %d; backfilling from REST", *key, missing,
                        record["open_time"])
            await self._backfill_klines(record["symbol"], record["interval"], last + step, record["open_time"])
        self._publish_kline(record)

    async def _on_next_funding(self, symbol: str, next_funding: int | None) -> None:
        """The next funding time moved on: a settlement happened at the previous one; fetch it."""
        previous = self.state.next_funding.get(symbol)
        if next_funding is None:
            return
        self.state.next_funding[symbol] = next_funding
        if previous is not None and next_funding > previous:
            await self._backfill_funding(symbol, previous, previous + 60_000)  # settlements may be stamped late

    async def _poll_open_interest(self) -> None:
        while True:
            await asyncio.sleep(self.open_interest_s)
            for symbol in self.symbols:
                try:
                    d = await self.rest.get("/fapi/v1/openInterest", {"symbol": symbol})
                    self.publisher.publish("md.openinterest", oi_from_rest(symbol, d))
                except Exception as exc:  # a missed poll is not fatal: the next one comes
                    log.warning("open interest of %s: %s", symbol, exc)
