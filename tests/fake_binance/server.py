"""A local fake of Binance USDT-M futures on loopback: REST JSON and WebSocket combined streams in Binance's
wire formats, signatures and recvWindow verified, request weights with 429/418 + Retry-After, listenKeys,
orders, algo orders and positions with user-data events, and faults to inject on demand.

It runs in a thread with its own event loop; tests drive it through the methods of `FakeBinance`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import re
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web

from tests.conftest import SAMPLE
from tests.fake_binance.market import FILTERS, FUNDING_STEP, Clock, MarketData

API_KEY = "fake-api-key-0123456789abcdef"
API_SECRET = "fake-api-secret-fedcba9876543210"
CLIENT_ID_RE = re.compile(r"^[\.A-Z\:/a-z0-9_-]{1,36}$")
CONDITIONAL_TYPES = {"STOP_MARKET", "TAKE_PROFIT_MARKET", "STOP", "TAKE_PROFIT", "TRAILING_STOP_MARKET"}


class ApiError(Exception):
    def __init__(self, code: int, msg: str, status: int = 400, retry_after: float | None = None):
        self.code, self.msg, self.status, self.retry_after = code, msg, status, retry_after


@dataclass
class Fault:
    """What one call meets. By default it fails before the exchange accepts it; the other kinds are the ones Binance
    documents as "execution status unknown": the request *is* executed (now or a little later) and the client sees an
    error, a late answer or a dropped connection."""

    status: int
    code: int = 0
    msg: str = ""
    retry_after: float | None = None
    delay_after_accept: float = 0.0  # executed; the answer comes this late (the client times out before it)
    executed: bool = False  # executed, and answered with the error anyway (408 / -1007, 503 "Unknown error")
    drop: bool = False  # executed, then the connection is dropped without an answer
    execute_after: float = 0.0  # answered with the error now, executed this many seconds later

    @property
    def before_accept(self) -> bool:
        return not (self.delay_after_accept or self.executed or self.drop or self.execute_after)


@dataclass
class Position:
    amount: Decimal = Decimal(0)
    entry: float = 0.0
    margin_type: str = "cross"
    leverage: int = 20


@dataclass
class Account:
    balance: float = 10_000.0
    positions: dict[str, Position] = field(default_factory=lambda: defaultdict(Position))
    orders: dict[int, dict] = field(default_factory=dict)
    algo_orders: dict[int, dict] = field(default_factory=dict)
    trades: list[dict] = field(default_factory=list)  # every fill, as GET /fapi/v1/userTrades answers it


class FakeBinance:
    def __init__(self, symbols: list[str], clock_start: int, clock_end: int | None = None, speed: float = 1.0,
                 data_dir: str = str(SAMPLE), weight_limit: int = 2400, push_interval_s: float = 0.05):
        self.market = MarketData(data_dir, symbols)
        self.symbols = symbols
        self.clock = Clock(clock_start, clock_end, speed)
        self.weight_limit = weight_limit
        self.push_interval_s = push_interval_s
        self.account = Account()
        self.ids = itertools.count(1_000_001)
        self.faults: dict[tuple[str, str], list[Fault]] = defaultdict(list)  # (method, path) → the next calls'
        self.faults_at: dict[tuple[str, str], dict[int, Fault]] = defaultdict(dict)  # … → call number → fault
        self.calls: dict[tuple[str, str], int] = defaultdict(int)  # calls so far per (method, path)
        self.fired: list[tuple[str, str, int, Fault]] = []  # every fault that met its call
        self.requests: list[tuple[float, str, str, dict]] = []  # (monotonic, method, path, params)
        self.banned_until = 0.0
        self.rest_errors: list[int] = []  # every error code answered
        self.ban_violations = 0
        self._weight: dict[int, int] = defaultdict(int)
        self.listen_keys: set[str] = set()
        self.user_events: list[dict] = []  # every user-data event pushed
        self._market_ws: list[tuple[web.WebSocketResponse, set[str], float]] = []
        self._user_ws: dict[str, list[web.WebSocketResponse]] = defaultdict(list)
        self._silent_user_ws: set[web.WebSocketResponse] = set()  # dead paths: nothing sent, pings unanswered
        self.refuse_streams_until = 0.0
        self.silent_until = 0.0
        self.rollover_after_s: float | None = None
        self._pushed: dict[str, int] = {}
        self._time_offsets: list[int] = []  # serverTime − wall clock of each /fapi/v1/time answered (newest last)
        self.market_connections = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-binance", daemon=True)
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FakeBinance:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/stream", self._market_stream)
        app.router.add_route("GET", "/ws/{key}", self._user_stream)
        app.router.add_route("*", "/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._pusher = asyncio.create_task(self._push_loop())

    def stop(self) -> None:
        async def _stop():
            self._pusher.cancel()
            for ws, _, _ in list(self._market_ws):
                await ws.close()
            for conns in self._user_ws.values():
                for ws in conns:
                    await ws.close()
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def call(self, fn, *args):
        """Run `fn(*args)` on the fake's loop (coroutine functions too) and return its result."""
        async def run():
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    # -- faults ------------------------------------------------------------------------------
    def fail_next(self, path: str, status: int, code: int = 0, msg: str = "", retry_after: float | None = None,
                  times: int = 1, delay_after_accept: float = 0.0, method: str | None = None, nth: int | None = None,
                  executed: bool = False, drop: bool = False, execute_after: float = 0.0) -> None:
        """Fault the next `times` calls of (method, path) — or, with `nth`, the nth call from now on (and the `times`
        − 1 after it). The method defaults to POST where the path has a POST route (an order), else GET."""
        method = method or ("POST" if ("POST", path) in ROUTES else "GET")
        key = (method, path)
        for i in range(times):
            fault = Fault(status, code, msg, retry_after, delay_after_accept, executed, drop, execute_after)
            if nth is None:
                self.faults[key].append(fault)
            else:
                self.faults_at[key][self.calls[key] + nth + i] = fault

    def fired_on(self, method: str, path: str) -> list[Fault]:
        return [f for m, p, _, f in self.fired if (m, p) == (method, path)]

    def drop_market_streams(self, refuse_s: float = 0.0) -> None:
        """Close every market connection abruptly; refuse new ones for `refuse_s` (bars pass meanwhile)."""
        self.refuse_streams_until = time.monotonic() + refuse_s
        self.call(self._close_all, [ws for ws, _, _ in self._market_ws])

    def drop_user_streams(self) -> None:
        self.call(self._close_all, [ws for conns in self._user_ws.values() for ws in conns])

    def silence_user_streams(self) -> None:
        """The open user-stream connections go dead without closing: no event reaches them, no ping is answered
        (events still happen and are recorded). Connections made afterwards work."""
        self.call(lambda: self._silent_user_ws.update(ws for conns in self._user_ws.values() for ws in conns))

    def silence_market(self, seconds: float) -> None:
        self.silent_until = time.monotonic() + seconds

    def expire_listen_keys(self) -> None:
        async def expire():
            for key in list(self.listen_keys):
                self.listen_keys.discard(key)
                for ws in self._user_ws.pop(key, []):
                    await ws.send_str(json.dumps({"e": "listenKeyExpired", "E": str(self.clock.now()),
                                                  "listenKey": key}))
                    await ws.close()
        self.call(expire)

    @staticmethod
    async def _close_all(conns) -> None:
        for ws in conns:
            await ws.close(code=1006)

    # -- REST --------------------------------------------------------------------------------
    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        body = await request.text()
        raw = request.query_string + body
        params = dict(parse_qsl(raw, keep_blank_values=True))
        self.requests.append((time.monotonic(), request.method, path, params))
        headers = {}
        try:
            self._charge_weight(path, params, headers)
            key = (request.method, path)
            self.calls[key] += 1
            fault = self.faults_at[key].pop(self.calls[key], None) or (self.faults[key].pop(0) if self.faults.get(key)
                                                                       else None)
            if fault:
                self.fired.append((request.method, path, self.calls[key], fault))
            if fault and fault.before_accept:
                raise ApiError(fault.code, fault.msg, fault.status, fault.retry_after)
            handler = ROUTES.get(key)
            if handler is None:
                raise ApiError(-1000, f"fake: no route {request.method} {path}", 404)
            if handler.signed:
                self._verify(request, raw, params)
            elif handler.keyed and request.headers.get("X-MBX-APIKEY") != API_KEY:
                raise ApiError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
            if fault and fault.execute_after:  # the matching engine gets it later; the client hears an error now
                self.loop.call_later(fault.execute_after, lambda: asyncio.ensure_future(self._late(handler, params)))
                raise ApiError(fault.code, fault.msg, fault.status)
            result = handler.fn(self, params)
            if asyncio.iscoroutine(result):
                result = await result
            if fault and fault.delay_after_accept:  # executed; the answer is late (the client times out before it)
                await asyncio.sleep(fault.delay_after_accept)
            if fault and fault.drop:  # executed; the connection drops before the answer
                request.transport.abort()
                return web.Response(status=500)
            if fault and fault.executed:
                raise ApiError(fault.code, fault.msg, fault.status)
            return web.json_response(result, headers=headers)
        except ApiError as e:
            self.rest_errors.append(e.code)
            if e.retry_after is not None:
                headers["Retry-After"] = str(e.retry_after)
            return web.json_response({"code": e.code, "msg": e.msg}, status=e.status, headers=headers)

    async def _late(self, handler, params: dict) -> None:
        try:
            result = handler.fn(self, params)
            if asyncio.iscoroutine(result):
                await result
        except ApiError as e:  # e.g. a late entry that no longer fits: it simply did not execute
            self.rest_errors.append(e.code)

    def _charge_weight(self, path: str, params: dict, headers: dict) -> None:
        now = time.monotonic()
        if now < self.banned_until:
            self.ban_violations += 1
            self.banned_until = now + 2 * (self.banned_until - now)  # as Binance: bans escalate
            raise ApiError(-1003, "Way too many requests; IP banned.", 418, round(self.banned_until - now, 3))
        weight = 1
        if path.endswith("klines") or path.endswith("Klines"):
            limit = int(params.get("limit", 500))
            weight = 1 if limit < 100 else 2 if limit < 500 else 5 if limit <= 1000 else 10
        minute = self.clock.now() // 60_000
        self._weight[minute] += weight
        headers["X-MBX-USED-WEIGHT-1M"] = str(self._weight[minute])
        if self._weight[minute] > self.weight_limit:
            self.banned_until = now + 1.0
            raise ApiError(-1003, f"Too many requests; current limit is {self.weight_limit} requests per minute.",
                           429, 1.0)

    def _verify(self, request: web.Request, raw: str, params: dict) -> None:
        if request.headers.get("X-MBX-APIKEY") != API_KEY:
            raise ApiError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
        at = raw.rfind("&signature=")
        if at < 0:
            raise ApiError(-1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.")
        expected = hmac.new(API_SECRET.encode(), raw[:at].encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, raw[at + len("&signature="):]):
            raise ApiError(-1022, "Signature for this request is not valid.")
        ts, window = int(params.get("timestamp", 0)), int(params.get("recvWindow", 5000))
        now = self.clock.now()
        if window > 60_000:
            raise ApiError(-1131, "recvWindow must be less than 60000")
        if (ts > now + 1000 or now - ts > window) and not self._fresh_on_wall_clock(ts, window):
            raise ApiError(-1021, "Timestamp for this request is outside of the recvWindow.")

    def _fresh_on_wall_clock(self, ts: int, window: int) -> bool:
        """On a virtual clock faster than the wall clock, a client's timestamp (its clock + the offset it measured
        from /fapi/v1/time) falls behind the server's by (speed − 1) × the time since it measured. Binance's clock
        runs at wall speed: judge the timestamp against the wall clock since a serverTime this fake answered."""
        if self.clock.speed == 1:
            return False
        wall = int(time.time() * 1000)
        return any(wall + o - window <= ts <= wall + o + 1000 for o in self._time_offsets)

    # -- market data endpoints ----------------------------------------------------------------
    def time_(self, p):
        now = self.clock.now()
        self._time_offsets = [*self._time_offsets[-7:], now - int(time.time() * 1000)]
        return {"serverTime": now}

    def exchange_info(self, p):
        symbols = []
        for s in self.symbols:
            f = FILTERS[s]
            symbols.append({"symbol": s, "status": "TRADING", "contractType": "PERPETUAL", "quoteAsset": "USDT",
                            "filters": [
                                {"filterType": "PRICE_FILTER", "minPrice": f["tickSize"], "maxPrice": "1000000",
                                 "tickSize": f["tickSize"]},
                                {"filterType": "LOT_SIZE", "minQty": f["minQty"], "maxQty": "1000000",
                                 "stepSize": f["stepSize"]},
                                {"filterType": "MARKET_LOT_SIZE", "minQty": f["minQty"], "maxQty": "1000000",
                                 "stepSize": f["stepSize"]},
                                {"filterType": "MIN_NOTIONAL", "notional": f["notional"]}]})
        return {"timezone": "UTC", "serverTime": self.clock.now(), "symbols": symbols,
                "rateLimits": [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
                                "limit": self.weight_limit},
                               {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 1200}]}

    def klines(self, p, mark: bool = False):
        if p.get("interval") != "5m":
            return []  # the recorded data has 5m bars only
        rows = self.market.klines(p["symbol"], _int(p.get("startTime")), _int(p.get("endTime")),
                                  min(int(p.get("limit", 500)), 1500), self.clock.now())
        if mark:  # mark-price klines: prices only, volumes zero
            rows = [[r[0], r[1], r[2], r[3], r[4], "0", r[6], "0", 0, "0", "0", "0"] for r in rows]
        return rows

    def funding_rate(self, p):
        now = self.clock.now()
        start, end = _int(p.get("startTime")) or 0, min(_int(p.get("endTime")) or now, now)
        rows = [r for r in self.market.bars[p["symbol"]].funding if start <= r["fundingTime"] <= end]
        return rows[: int(p.get("limit", 100))]

    def open_interest(self, p):
        now = self.clock.now()
        return {"openInterest": f"{self._oi(p['symbol'], now):.3f}", "symbol": p["symbol"], "time": now}

    def open_interest_hist(self, p):
        now = self.clock.now()
        start = max(_int(p.get("startTime")) or now - 30 * 86_400_000, now - 30 * 86_400_000)
        end = min(_int(p.get("endTime")) or now, now)
        first = (start + 299_999) // 300_000 * 300_000
        times = list(range(first, end + 1, 300_000))[: int(p.get("limit", 30))]
        return [{"symbol": p["symbol"], "sumOpenInterest": f"{self._oi(p['symbol'], t):.3f}",
                 "sumOpenInterestValue": f"{self._oi(p['symbol'], t) * self.market.price(p['symbol'], t):.2f}",
                 "timestamp": t} for t in times]

    @staticmethod
    def _oi(symbol: str, t: int) -> float:
        return 80_000 + (t // 300_000) % 1000  # synthetic: the recorded data has no open interest

    # -- user data stream ---------------------------------------------------------------------
    def new_listen_key(self, p):
        key = next(iter(self.listen_keys), None) or secrets.token_hex(32)
        self.listen_keys.add(key)
        return {"listenKey": key}

    def keepalive_listen_key(self, p):
        if not self.listen_keys:
            raise ApiError(-1125, "This listenKey does not exist.")
        return {"listenKey": next(iter(self.listen_keys))}

    def close_listen_key(self, p):
        self.listen_keys.clear()
        return {}

    async def _user_stream(self, request: web.Request):
        key = request.match_info["key"]
        if key not in self.listen_keys:
            return web.json_response({"code": -1125, "msg": "This listenKey does not exist."}, status=400)
        ws = web.WebSocketResponse(autoping=False)  # pings answered below, unless the connection is silenced
        await ws.prepare(request)
        self._user_ws[key].append(ws)
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
            if msg.type == WSMsgType.PING and ws not in self._silent_user_ws:
                await ws.pong(msg.data)
        self._silent_user_ws.discard(ws)
        conns = self._user_ws.get(key, [])
        if ws in conns:
            conns.remove(ws)
        return ws

    async def push_user(self, event: dict) -> None:
        self.user_events.append(event)
        for conns in self._user_ws.values():
            for ws in list(conns):
                if not ws.closed and ws not in self._silent_user_ws:
                    await ws.send_str(json.dumps(event))

    async def send_user_raw(self, text: str) -> None:
        for conns in self._user_ws.values():
            for ws in conns:
                await ws.send_str(text)

    # -- market streams -------------------------------------------------------------------------
    async def _market_stream(self, request: web.Request):
        if time.monotonic() < self.refuse_streams_until:
            return web.Response(status=503, text="fake: refusing connections")
        streams = set(request.query.get("streams", "").split("/"))
        ws = web.WebSocketResponse(heartbeat=5.0)
        await ws.prepare(request)
        entry = (ws, streams, time.monotonic())
        self._market_ws.append(entry)
        self.market_connections += 1
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
        if entry in self._market_ws:
            self._market_ws.remove(entry)
        return ws

    async def _send_market(self, stream: str, data: dict) -> None:
        text = json.dumps({"stream": stream, "data": data})
        for ws, streams, _ in list(self._market_ws):
            if stream in streams and not ws.closed:
                try:
                    await ws.send_str(text)
                except ConnectionError:
                    pass

    async def send_raw_market(self, text: str) -> None:
        for ws, _, _ in list(self._market_ws):
            await ws.send_str(text)

    async def _push_loop(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(self.push_interval_s)
            tick += 1
            now = self.clock.now()
            if self.rollover_after_s is not None:
                for ws, _, opened in list(self._market_ws):
                    if time.monotonic() - opened > self.rollover_after_s:
                        await ws.close()  # Binance cuts every connection at 24 hours
            if time.monotonic() < self.silent_until:
                continue
            try:
                await self._push_market(now, tick)
                await self._trigger_algo_orders(now)
            except Exception:  # a fake's bug must not stop the stream silently
                import traceback
                traceback.print_exc()

    async def _push_market(self, now: int, tick: int) -> None:
        for symbol in self.symbols:
            s = symbol.lower()
            closed = self.market.closed_upto(symbol, now)
            first = self._pushed.get(symbol, closed)
            rows = self.market.bars[symbol].rows
            for i in range(first, closed):
                await self._send_market(f"{s}@kline_5m", _kline_event(symbol, rows[i], True, now))
            self._pushed[symbol] = closed
            if closed < len(rows) and tick % 5 == 0:  # the open bar, not closed yet: never archived
                await self._send_market(f"{s}@kline_5m", _kline_event(symbol, rows[closed], False, now))
            price = self.market.price(symbol, now)
            f = self.market.funding_at_or_before(symbol, now)
            await self._send_market(f"{s}@markPrice@1s", {
                "e": "markPriceUpdate", "E": now, "s": symbol, "p": f"{price:.8f}", "i": f"{price * 0.9999:.8f}",
                "P": f"{price:.8f}", "r": f["fundingRate"] if f else "0.00010000",
                "T": (now // FUNDING_STEP + 1) * FUNDING_STEP})
            await self._send_market(f"{s}@bookTicker", {
                "e": "bookTicker", "u": now * 10 + tick % 10, "E": now, "T": now - 1, "s": symbol,
                "b": f"{price * 0.99995:.8f}", "B": "3.2", "a": f"{price * 1.00005:.8f}", "A": "2.9"})
            if tick % 20 == 0:
                await self._send_market(f"{s}@forceOrder", {"e": "forceOrder", "E": now, "o": {
                    "s": symbol, "S": "SELL", "o": "LIMIT", "f": "IOC", "q": "0.014", "p": f"{price * 0.99:.2f}",
                    "ap": f"{price * 0.99:.2f}", "X": "FILLED", "l": "0.014", "z": "0.014", "T": now}})

    # -- trading ------------------------------------------------------------------------------
    def margin_type(self, p):
        pos = self.account.positions[p["symbol"]]
        wanted = p["marginType"].lower().replace("crossed", "cross")
        if pos.margin_type == wanted:
            raise ApiError(-4046, "No need to change margin type.")
        pos.margin_type = wanted
        return {"code": 200, "msg": "success"}

    def leverage(self, p):
        self.account.positions[p["symbol"]].leverage = int(p["leverage"])
        return {"leverage": int(p["leverage"]), "maxNotionalValue": "1000000", "symbol": p["symbol"]}

    def _check_step(self, symbol: str, qty: str, what: str = "stepSize", value: str | None = None) -> Decimal:
        q = Decimal(qty)
        step = Decimal(FILTERS[symbol][what])
        if q % step != 0:
            raise ApiError(-1111, "Precision is over the maximum defined for this asset.")
        return q

    async def new_order(self, p):
        symbol, cid = p["symbol"], p.get("newClientOrderId") or f"fake-{next(self.ids)}"
        if p["type"] in CONDITIONAL_TYPES:
            raise ApiError(-4120, "Order type not supported for this endpoint. Please use the Algo Order API "
                                  "endpoints instead.")
        if p["type"] != "MARKET":
            raise ApiError(-1116, "Invalid orderType.")
        if not CLIENT_ID_RE.match(cid):
            raise ApiError(-1100, "Illegal characters found in parameter 'newClientOrderId'.")
        if any(o["clientOrderId"] == cid and o["status"] == "NEW" for o in self.account.orders.values()):
            raise ApiError(-4116, "ClientOrderId is duplicated.")
        qty = self._check_step(symbol, p["quantity"])
        if qty < Decimal(FILTERS[symbol]["minQty"]):
            raise ApiError(-4003, "Quantity less than or equal to zero.")
        pos = self.account.positions[symbol]
        now, price = self.clock.now(), self.market.price(symbol, self.clock.now())
        signed_qty = qty if p["side"] == "BUY" else -qty
        reduce_only = p.get("reduceOnly") == "true"
        if reduce_only and (pos.amount == 0 or (pos.amount > 0) == (signed_qty > 0)):
            raise ApiError(-2022, "ReduceOnly Order is rejected.")
        if not reduce_only and float(qty) * price / pos.leverage > self.account.balance:
            raise ApiError(-2019, "Margin is insufficient.")
        oid = next(self.ids)
        order = {"orderId": oid, "symbol": symbol, "status": "FILLED", "clientOrderId": cid, "price": "0",
                 "avgPrice": f"{price}", "origQty": str(qty), "executedQty": str(qty), "cumQty": str(qty),
                 "cumQuote": f"{float(qty) * price:.5f}", "timeInForce": "GTC", "type": "MARKET",
                 "reduceOnly": reduce_only, "closePosition": False, "side": p["side"], "positionSide": "BOTH",
                 "stopPrice": "0", "workingType": "CONTRACT_PRICE", "priceProtect": False, "origType": "MARKET",
                 "updateTime": now}
        self.account.orders[oid] = order
        await self._fill(order, qty, price, now)
        return order

    async def _fill(self, order: dict, qty: Decimal, price: float, now: int) -> None:
        symbol = order["symbol"]
        pos = self.account.positions[symbol]
        signed_qty = qty if order["side"] == "BUY" else -qty
        realized = 0.0
        if pos.amount == 0 or (pos.amount > 0) == (signed_qty > 0):
            total = pos.amount + signed_qty
            pos.entry = (float(abs(pos.amount)) * pos.entry + float(qty) * price) / float(abs(total))
            pos.amount = total
        else:
            closed = float(min(abs(signed_qty), abs(pos.amount)))
            realized = closed * (price - pos.entry) * (1 if pos.amount > 0 else -1)
            pos.amount += signed_qty
            if pos.amount == 0:
                pos.entry = 0.0
        fee = float(qty) * price * 0.0005
        self.account.balance += realized - fee
        base = {"s": symbol, "c": order["clientOrderId"], "S": order["side"], "o": "MARKET", "f": "GTC",
                "q": str(qty), "p": "0", "ap": "0", "sp": "0", "i": order["orderId"], "l": "0", "z": "0",
                "L": "0", "n": "0", "N": "USDT", "T": now, "t": 0, "b": "0", "a": "0", "m": False,
                "R": order["reduceOnly"], "wt": "CONTRACT_PRICE", "ot": "MARKET", "ps": "BOTH", "cp": False,
                "rp": "0", "pP": False, "si": 0, "ss": 0, "V": "EXPIRE_MAKER", "pm": "NONE", "gtd": 0}
        await self.push_user({"e": "ORDER_TRADE_UPDATE", "E": now, "T": now, "o": {**base, "x": "NEW", "X": "NEW"}})
        trade_id = next(self.ids)
        self.account.trades.append({
            "symbol": symbol, "id": trade_id, "orderId": order["orderId"], "side": order["side"], "price": f"{price}",
            "qty": str(qty), "realizedPnl": f"{realized:.8f}", "marginAsset": "USDT",
            "quoteQty": f"{float(qty) * price:.8f}", "commission": f"{fee:.8f}", "commissionAsset": "USDT",
            "time": now, "positionSide": "BOTH", "buyer": order["side"] == "BUY", "maker": False})
        await self.push_user({"e": "ORDER_TRADE_UPDATE", "E": now + 1, "T": now + 1, "o": {
            **base, "x": "TRADE", "X": "FILLED", "ap": f"{price}", "l": str(qty), "z": str(qty), "L": f"{price}",
            "n": f"{fee:.8f}", "t": trade_id, "rp": f"{realized:.8f}"}})
        await self.push_user({"e": "ACCOUNT_UPDATE", "E": now + 2, "T": now + 1, "a": {
            "m": "ORDER",
            "B": [{"a": "USDT", "wb": f"{self.account.balance:.8f}", "cw": f"{self.account.balance:.8f}",
                   "bc": "0"}],
            "P": [{"s": symbol, "pa": str(pos.amount), "ep": f"{pos.entry}", "bep": f"{pos.entry}",
                   "cr": f"{realized:.8f}", "up": "0", "mt": pos.margin_type, "iw": "0", "ps": "BOTH"}]}})

    def get_order(self, p):
        for o in self.account.orders.values():
            if o["symbol"] == p["symbol"] and (str(o["orderId"]) == p.get("orderId")
                                               or o["clientOrderId"] == p.get("origClientOrderId")):
                return o
        raise ApiError(-2013, "Order does not exist.")

    def cancel_order(self, p):
        o = self.get_order(p)
        if o["status"] != "NEW":
            raise ApiError(-2011, "Unknown order sent.")
        o["status"] = "CANCELED"
        return o

    def open_orders(self, p):
        return [o for o in self.account.orders.values() if o["status"] == "NEW"
                and (not p.get("symbol") or o["symbol"] == p["symbol"])]

    async def new_algo_order(self, p):
        symbol, cid = p["symbol"], p.get("clientAlgoId") or f"fake-algo-{next(self.ids)}"
        if p.get("algoType") != "CONDITIONAL" or p.get("type") not in CONDITIONAL_TYPES:
            raise ApiError(-1116, "Invalid orderType.")
        if not CLIENT_ID_RE.match(cid):
            raise ApiError(-1100, "Illegal characters found in parameter 'clientAlgoId'.")
        open_ = [a for a in self.account.algo_orders.values() if a["algoStatus"] in ("NEW", "TRIGGERING")]
        if any(a["clientAlgoId"] == cid for a in open_):  # as Binance: a duplicate only among open orders
            raise ApiError(-4116, "ClientOrderId is duplicated.")
        if p.get("closePosition") == "true" and any(
                a["closePosition"] and (a["symbol"], a["orderType"], a["side"]) == (symbol, p["type"], p["side"])
                for a in open_):
            raise ApiError(-4130, "An open stop or take profit order with GTE and closePosition in the direction is "
                                  "existing.")
        self._check_step(symbol, p["triggerPrice"], "tickSize")
        close_position = p.get("closePosition") == "true"
        if not close_position:
            self._check_step(symbol, p["quantity"])
        now = self.clock.now()
        aid = next(self.ids)
        algo = {"algoId": aid, "clientAlgoId": cid, "algoType": "CONDITIONAL", "orderType": p["type"],
                "symbol": symbol, "side": p["side"], "positionSide": "BOTH", "timeInForce": "GTC",
                "quantity": p.get("quantity", "0"), "algoStatus": "NEW", "triggerPrice": p["triggerPrice"],
                "price": "0", "workingType": p.get("workingType", "CONTRACT_PRICE"), "priceMatch": "NONE",
                "closePosition": close_position, "priceProtect": p.get("priceProtect") == "TRUE",
                "reduceOnly": p.get("reduceOnly") == "true", "createTime": now, "updateTime": now,
                "triggerTime": 0, "goodTillDate": 0}
        self.account.algo_orders[aid] = algo
        await self._push_algo(algo, now)
        return algo

    async def _push_algo(self, a: dict, now: int, **extra) -> None:
        await self.push_user({"e": "ALGO_UPDATE", "T": now, "E": now, "o": {
            "caid": a["clientAlgoId"], "aid": a["algoId"], "at": "CONDITIONAL", "o": a["orderType"],
            "s": a["symbol"], "S": a["side"], "ps": "BOTH", "f": "GTC", "q": a["quantity"], "X": a["algoStatus"],
            "ai": "", "ap": "0.00000", "aq": "0.00000", "act": "0", "tp": a["triggerPrice"], "p": "0",
            "V": "EXPIRE_MAKER", "wt": a["workingType"], "pm": "NONE", "cp": a["closePosition"], "pP": False,
            "R": a["reduceOnly"], "tt": a["triggerTime"], "gtd": 0, **extra}})

    def _open_algo(self, client_algo_id: str) -> dict:
        return next(a for a in self.account.algo_orders.values()
                    if a["clientAlgoId"] == client_algo_id and a["algoStatus"] == "NEW")

    async def end_algo(self, client_algo_id: str, status: str) -> None:
        """The exchange ends an open conditional order on its own: CANCELED, REJECTED or EXPIRED, with ALGO_UPDATE."""
        a = self._open_algo(client_algo_id)
        a["algoStatus"] = status
        await self._push_algo(a, self.clock.now())

    def balance(self, p):
        b = f"{self.account.balance:.8f}"
        return [{"accountAlias": "fake", "asset": "USDT", "balance": b, "crossWalletBalance": b,
                 "crossUnPnl": "0", "availableBalance": b, "maxWithdrawAmount": b, "marginAvailable": True,
                 "updateTime": self.clock.now()}]

    def _find_algo(self, p) -> dict:
        for a in reversed(self.account.algo_orders.values()):  # an id reused after its order ended: the newest
            if str(a["algoId"]) == p.get("algoId") or a["clientAlgoId"] == p.get("clientAlgoId"):
                return a
        raise ApiError(-2013, "Order does not exist.")

    def get_algo_order(self, p):
        return self._find_algo(p)

    async def cancel_algo_order(self, p):
        a = self._find_algo(p)
        if a["algoStatus"] != "NEW":
            raise ApiError(-2011, "Unknown order sent.")
        a["algoStatus"] = "CANCELED"
        await self._push_algo(a, self.clock.now())
        return {"algoId": a["algoId"], "clientAlgoId": a["clientAlgoId"], "code": "200", "msg": "success"}

    def open_algo_orders(self, p):
        return [a for a in self.account.algo_orders.values() if a["algoStatus"] in ("NEW", "TRIGGERING")
                and (not p.get("symbol") or a["symbol"] == p["symbol"])]

    def position_risk(self, p):
        now = self.clock.now()
        return [{"symbol": s, "positionAmt": str(pos.amount), "entryPrice": f"{pos.entry}",
                 "breakEvenPrice": f"{pos.entry}", "markPrice": f"{self.market.price(s, now)}",
                 "unRealizedProfit": "0", "liquidationPrice": "0", "leverage": str(pos.leverage),
                 "maxNotionalValue": "1000000", "marginType": pos.margin_type, "isolatedMargin": "0",
                 "isAutoAddMargin": "false", "positionSide": "BOTH", "notional": "0", "isolatedWallet": "0",
                 "updateTime": now}
                for s, pos in self.account.positions.items() if not p.get("symbol") or s == p["symbol"]]

    def user_trades(self, p):
        """As Binance: by symbol, optionally one orderId; startTime/endTime or fromId; oldest first, `limit` rows."""
        if "fromId" in p and ("startTime" in p or "endTime" in p):
            raise ApiError(-1128, "Combination of optional parameters invalid.")
        start, end, from_id = _int(p.get("startTime")), _int(p.get("endTime")), _int(p.get("fromId"))
        rows = [t for t in self.account.trades if t["symbol"] == p["symbol"]
                and (not p.get("orderId") or str(t["orderId"]) == p["orderId"])
                and (start is None or t["time"] >= start) and (end is None or t["time"] <= end)
                and (from_id is None or t["id"] >= from_id)]
        return sorted(rows, key=lambda t: t["id"])[: min(int(p.get("limit", 500)), 1000)]

    async def trigger_algo(self, client_algo_id: str, fill_delay_s: float = 0.0) -> None:
        """Fire a conditional order as if the mark price had crossed its trigger: NEW → TRIGGERING → TRIGGERED, its
        market order fills (after `fill_delay_s`) → FINISHED; reduce-only with nothing to reduce → REJECTED."""
        a = self._open_algo(client_algo_id)
        now = self.clock.now()
        pos = self.account.positions[a["symbol"]]
        a.update(algoStatus="TRIGGERING", triggerTime=now)
        await self._push_algo(a, now)
        reduces = pos.amount != 0 and (pos.amount > 0) == (a["side"] == "SELL")
        if (a["closePosition"] or a["reduceOnly"]) and not reduces:
            a["algoStatus"] = "REJECTED"
            await self._push_algo(a, now, rm="Reduce Only reject")
            return
        qty = abs(pos.amount) if a["closePosition"] else Decimal(a["quantity"])
        a["algoStatus"] = "TRIGGERED"
        await self._push_algo(a, now)
        if fill_delay_s:
            await asyncio.sleep(fill_delay_s)
        oid = next(self.ids)
        order = {"orderId": oid, "symbol": a["symbol"], "status": "FILLED", "clientOrderId": a["clientAlgoId"],
                 "side": a["side"], "reduceOnly": True, "type": "MARKET", "origQty": str(qty),
                 "executedQty": str(qty)}
        self.account.orders[oid] = order
        price = self.market.price(a["symbol"], now)
        if qty:
            await self._fill(order, qty, price, now)
        a["algoStatus"] = "FINISHED"
        await self._push_algo(a, now, ai=str(oid), ap=f"{price}", aq=str(qty), act="MARKET")

    async def _trigger_algo_orders(self, now: int) -> None:
        for a in list(self.account.algo_orders.values()):
            if a["algoStatus"] != "NEW" or a["orderType"] not in ("STOP_MARKET", "TAKE_PROFIT_MARKET"):
                continue
            price, trigger = self.market.price(a["symbol"], now), float(a["triggerPrice"])
            up = (a["side"] == "BUY") == (a["orderType"] == "STOP_MARKET")  # a buy stop fires on a rise
            if (price >= trigger) if up else (price <= trigger):
                await self.trigger_algo(a["clientAlgoId"])

    def set_position(self, symbol: str, amount: str, entry: float) -> None:
        pos = self.account.positions[symbol]
        pos.amount, pos.entry = Decimal(amount), entry

    def exchange_orders(self, symbol: str | None = None) -> list[dict]:
        return [o for o in self.account.orders.values() if symbol is None or o["symbol"] == symbol]


def _int(v) -> int | None:
    return None if v in (None, "") else int(v)


def _kline_event(symbol: str, r: list, closed: bool, now: int) -> dict:
    return {"e": "kline", "E": now, "s": symbol, "k": {
        "t": r[0], "T": r[6], "s": symbol, "i": "5m", "f": 100, "L": 200, "o": r[1], "c": r[4], "h": r[2],
        "l": r[3], "v": r[5], "n": r[8], "x": closed, "q": r[7], "V": r[9], "Q": r[10], "B": "0"}}


@dataclass(frozen=True)
class _Route:
    fn: object
    signed: bool = False
    keyed: bool = False


ROUTES = {
    ("GET", "/fapi/v1/time"): _Route(FakeBinance.time_),
    ("GET", "/fapi/v1/exchangeInfo"): _Route(FakeBinance.exchange_info),
    ("GET", "/fapi/v1/klines"): _Route(FakeBinance.klines),
    ("GET", "/fapi/v1/markPriceKlines"): _Route(lambda self, p: self.klines(p, mark=True)),
    ("GET", "/fapi/v1/fundingRate"): _Route(FakeBinance.funding_rate),
    ("GET", "/fapi/v1/openInterest"): _Route(FakeBinance.open_interest),
    ("GET", "/futures/data/openInterestHist"): _Route(FakeBinance.open_interest_hist),
    ("POST", "/fapi/v1/listenKey"): _Route(FakeBinance.new_listen_key, keyed=True),
    ("PUT", "/fapi/v1/listenKey"): _Route(FakeBinance.keepalive_listen_key, keyed=True),
    ("DELETE", "/fapi/v1/listenKey"): _Route(FakeBinance.close_listen_key, keyed=True),
    ("POST", "/fapi/v1/marginType"): _Route(FakeBinance.margin_type, signed=True),
    ("POST", "/fapi/v1/leverage"): _Route(FakeBinance.leverage, signed=True),
    ("POST", "/fapi/v1/order"): _Route(FakeBinance.new_order, signed=True),
    ("GET", "/fapi/v1/order"): _Route(FakeBinance.get_order, signed=True),
    ("DELETE", "/fapi/v1/order"): _Route(FakeBinance.cancel_order, signed=True),
    ("GET", "/fapi/v1/openOrders"): _Route(FakeBinance.open_orders, signed=True),
    ("POST", "/fapi/v1/algoOrder"): _Route(FakeBinance.new_algo_order, signed=True),
    ("GET", "/fapi/v1/algoOrder"): _Route(FakeBinance.get_algo_order, signed=True),
    ("DELETE", "/fapi/v1/algoOrder"): _Route(FakeBinance.cancel_algo_order, signed=True),
    ("GET", "/fapi/v1/openAlgoOrders"): _Route(FakeBinance.open_algo_orders, signed=True),
    ("GET", "/fapi/v2/positionRisk"): _Route(FakeBinance.position_risk, signed=True),
    ("GET", "/fapi/v2/balance"): _Route(FakeBinance.balance, signed=True),
    ("GET", "/fapi/v1/userTrades"): _Route(FakeBinance.user_trades, signed=True),
}
