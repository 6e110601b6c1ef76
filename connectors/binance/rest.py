"""Binance USDT-M REST: signing, server-time offset, request weights and error codes.

Everything that talks to Binance over HTTP goes through `RestClient`, so the rules live in one place:
- signed requests carry `timestamp` (local clock + the offset measured from /fapi/v1/time) and
  `recvWindow`, and `signature` = HMAC-SHA256(secret, the exact query string sent);
- -1021 (timestamp outside recvWindow) → resync the offset and retry once;
- 429 / 418 → wait what `Retry-After` says (418 is an IP ban: never hammer), then retry;
- `X-MBX-USED-WEIGHT-1M` close to the limit → wait for the next minute before the next request;
- 5xx, HTTP 408, -1007 and network errors: idempotent requests (GET) are retried with backoff; a request that
  changes state raises `UnknownOutcome`, because Binance documents that it may have been executed — the caller
  looks it up and never sends it blind again.
The API key and secret are never logged; neither is a signed query.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from streams import metrics

log = logging.getLogger(__name__)

EXECUTION_STATUS_UNKNOWN = -1007  # "Timeout waiting for response from backend server": it may have executed
TIMESTAMP_OUTSIDE_RECV_WINDOW = -1021
TOO_MANY_REQUESTS = -1003
ORDER_DOES_NOT_EXIST = -2013
MARGIN_INSUFFICIENT = -2019
LISTEN_KEY_DOES_NOT_EXIST = -1125
NO_NEED_TO_CHANGE_MARGIN_TYPE = -4046
DUPLICATED_CLIENT_ORDER_ID = -4116
USE_ALGO_ORDER_API = -4120


def sign(secret: str, query: str) -> str:
    return hmac.new(secret.encode(), query.encode(), hashlib.sha256).hexdigest()


class BinanceError(Exception):
    """Binance answered with an error code (`code` < 0) or an HTTP error without one (`code` = 0)."""

    def __init__(self, status: int, code: int, msg: str, path: str = ""):
        super().__init__(f"{path}: HTTP {status}, code {code}: {msg}")
        self.status, self.code, self.msg, self.path = status, code, msg, path


class UnknownOutcome(Exception):
    """A state-changing request timed out, lost its connection or got 5xx / 408 / -1007: it may or may not have
    been executed."""


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class RestClient:
    def __init__(self, base_url: str, api_key: str = "", api_secret: str = "", recv_window_ms: int = 5000,
                 timeout_s: float = 10.0, max_retries: int = 5, weight_limit_1m: int = 2400,
                 weight_headroom: float = 0.9):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._api_secret = api_secret
        self.recv_window_ms = recv_window_ms
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self.weight_limit_1m = weight_limit_1m
        self.weight_headroom = weight_headroom
        self.offset_ms = 0  # server time - local time
        self.used_weight_1m = 0
        self._blocked_until = 0.0  # monotonic: no request before this (Retry-After, weight budget)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the key or secret
        return f"RestClient({self.base_url!r})"

    async def __aenter__(self) -> RestClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    def use_limits(self, exchange_info: dict) -> None:
        """Take the request-weight limit per minute from exchangeInfo's rateLimits."""
        for r in exchange_info.get("rateLimits", []):
            if (r.get("rateLimitType"), r.get("interval"), r.get("intervalNum")) == ("REQUEST_WEIGHT", "MINUTE", 1):
                self.weight_limit_1m = int(r["limit"])

    # -- time ------------------------------------------------------------------------------
    def server_now_ms(self) -> int:
        return int(time.time() * 1000) + self.offset_ms

    async def sync_time(self) -> int:
        """Measure the server-time offset (half the round trip counts as latency)."""
        t0 = time.time()
        data = await self.get("/fapi/v1/time")
        t1 = time.time()
        self.offset_ms = int(data["serverTime"] - (t0 + t1) / 2 * 1000)
        return self.offset_ms

    # -- the verbs -------------------------------------------------------------------------
    async def get(self, path: str, params: dict | None = None, signed: bool = False):
        return await self._request("GET", path, params or {}, signed=signed, keyed=signed)

    async def signed(self, method: str, path: str, params: dict | None = None):
        return await self._request(method, path, params or {}, signed=True, keyed=True)

    async def keyed(self, method: str, path: str, params: dict | None = None):
        """API-key only (no signature): the listenKey endpoints."""
        return await self._request(method, path, params or {}, signed=False, keyed=True)

    async def _request(self, method: str, path: str, params: dict, signed: bool, keyed: bool):
        idempotent = method == "GET"
        attempt = 0
        resynced = False
        while True:
            await self._respect_budget()
            query = urlencode([(k, _fmt(v)) for k, v in params.items() if v is not None])
            if signed:
                stamp = f"recvWindow={self.recv_window_ms}&timestamp={self.server_now_ms()}"
                query = f"{query}&{stamp}" if query else stamp
                query += "&signature=" + sign(self._api_secret, query)
            url = URL(f"{self.base_url}{path}" + (f"?{query}" if query else ""), encoded=True)
            headers = {"X-MBX-APIKEY": self._api_key} if keyed else {}
            try:
                async with self._http().request(method, url, headers=headers) as resp:
                    self._note_weight(resp)
                    body = await resp.read()
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
            except (TimeoutError, aiohttp.ClientError) as exc:
                metrics.BINANCE_REST_ERRORS.labels(path, "network").inc()
                if not idempotent:
                    raise UnknownOutcome(f"{method} {path}: {type(exc).__name__}") from None
                attempt = await self._backoff(attempt, f"{method} {path}: {type(exc).__name__}")
                continue
            payload = _json(body)
            code = _code(payload)
            if status < 400 and code >= 0:
                return payload
            msg = payload.get("msg", body[:200].decode(errors="replace")) if isinstance(payload, dict) else ""
            metrics.BINANCE_REST_ERRORS.labels(path, str(code or status)).inc()
            if status in (418, 429):
                wait = float(retry_after) if retry_after else 60.0
                log.warning("Binance %s on %s: waiting %.1f s as told (Retry-After)",
                            "IP ban (418)" if status == 418 else "rate limit (429)", path, wait)
                self._blocked_until = max(self._blocked_until, time.monotonic() + wait)
                attempt += 1
                if attempt > self.max_retries:
                    raise BinanceError(status, code, msg, path)
                continue
            if code == TIMESTAMP_OUTSIDE_RECV_WINDOW and not resynced:
                resynced = True
                offset = await self.sync_time()
                log.warning("Binance -1021 on %s: clock resynced (offset %d ms), retrying once", path, offset)
                continue
            if status >= 500 or status == 408 or code == EXECUTION_STATUS_UNKNOWN:  # may have been executed
                if not idempotent:
                    raise UnknownOutcome(f"{method} {path}: HTTP {status}")
                attempt = await self._backoff(attempt, f"{method} {path}: HTTP {status}")
                continue
            raise BinanceError(status, code, msg, path)

    async def _backoff(self, attempt: int, what: str) -> int:
        attempt += 1
        if attempt > self.max_retries:
            raise BinanceError(0, 0, f"gave up after {self.max_retries} retries: {what}")
        delay = min(0.2 * 2 ** attempt, 10.0) * random.uniform(0.5, 1.0)
        log.info("%s; retry %d in %.2f s", what, attempt, delay)
        await asyncio.sleep(delay)
        return attempt

    def _note_weight(self, resp: aiohttp.ClientResponse) -> None:
        used = resp.headers.get("X-MBX-USED-WEIGHT-1M") or resp.headers.get("x-mbx-used-weight-1m")
        if used is None:
            return
        self.used_weight_1m = int(used)
        metrics.BINANCE_USED_WEIGHT.set(self.used_weight_1m)
        if self.used_weight_1m >= self.weight_limit_1m * self.weight_headroom:
            # the window is the server's calendar minute
            wait = 60 - (self.server_now_ms() / 1000) % 60 + 0.05
            log.info("request weight %d of %d used this minute: pausing %.1f s", self.used_weight_1m,
                     self.weight_limit_1m, wait)
            self._blocked_until = max(self._blocked_until, time.monotonic() + wait)

    async def _respect_budget(self) -> None:
        wait = self._blocked_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)


def _code(payload) -> int:
    """Binance's error code (negative); successes may carry {"code": 200} or {"code": "200"}."""
    try:
        return int(payload.get("code", 0)) if isinstance(payload, dict) else 0
    except (TypeError, ValueError):
        return 0


def _json(body: bytes):
    try:
        return json.loads(body) if body else {}
    except ValueError:
        return {}
