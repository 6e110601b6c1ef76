"""The fake exchange's market: the real recorded 5m klines, funding and 8h mark files, served on a virtual
clock that runs `speed` times faster than the wall clock from `clock_start` and stops at `clock_end`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from connectors.history_files import load_history

FUNDING_STEP = 8 * 3_600_000

# exchangeInfo filters of the symbols in the sample (as on Binance)
FILTERS = {
    "BTCUSDT": {"tickSize": "0.10", "stepSize": "0.001", "minQty": "0.001", "notional": "100"},
    "ETHUSDT": {"tickSize": "0.01", "stepSize": "0.001", "minQty": "0.001", "notional": "20"},
    "1000PEPEUSDT": {"tickSize": "0.0000001", "stepSize": "1", "minQty": "1", "notional": "5"},
}


@dataclass
class Bars:
    open_time: np.ndarray
    rows: list  # REST kline rows as Binance sends them (strings for decimals)
    funding: list  # [{"symbol", "fundingRate", "fundingTime", "markPrice"}]


class Clock:
    def __init__(self, start_ms: int, end_ms: int | None, speed: float):
        self.start_ms, self.end_ms, self.speed = start_ms, end_ms, speed
        self.m0 = time.monotonic()
        self.skew_ms = 0  # injected clock error

    def now(self) -> int:
        t = self.start_ms + int((time.monotonic() - self.m0) * 1000 * self.speed)
        return (min(t, self.end_ms) if self.end_ms is not None else t) + self.skew_ms


def _s(x: float) -> str:
    return repr(float(x))


class MarketData:
    def __init__(self, data_dir: str, symbols: list[str]):
        histories, _ = load_history(data_dir, symbols, None, None)
        self.bars: dict[str, Bars] = {}
        for symbol, h in histories.items():
            k = h.klines
            step = 300_000
            rows = [[int(t), _s(o), _s(hh), _s(lo), _s(c), _s(v), int(t) + step - 1, _s(qv), int(n), _s(tb), _s(tq),
                     "0"]
                    for t, o, hh, lo, c, v, qv, n, tb, tq in zip(
                        k["open_time"], k["open"], k["high"], k["low"], k["close"], k["volume"], k["quote_volume"],
                        k["trades"].fillna(0), k["taker_buy_volume"], k["taker_buy_quote_volume"], strict=True)]
            f, m = h.funding, h.marks
            marks = dict(zip(m["open_time"].tolist(), m["open"].tolist(), strict=True)) if len(m) else {}
            funding = [{"symbol": symbol, "fundingRate": f"{r:.8f}", "fundingTime": int(t),
                        "markPrice": f"{marks.get(int(t) // 1000 * 1000, marks.get(int(t), 0.0)):.8f}"}
                       for t, r in zip(f["funding_time"].tolist(), f["funding_rate"].tolist(), strict=True)]
            self.bars[symbol] = Bars(k["open_time"].to_numpy(dtype=np.int64), rows, funding)

    def klines(self, symbol: str, start: int | None, end: int | None, limit: int, now: int) -> list:
        """Bars with open time in [start, end], the last one possibly still open at `now` (as Binance)."""
        b = self.bars.get(symbol)
        if b is None:
            return []
        end = min(end if end is not None else now, now)
        if start is None:
            hi = int(np.searchsorted(b.open_time, end, side="right"))
            return b.rows[max(hi - limit, 0):hi]
        lo = int(np.searchsorted(b.open_time, start, side="left"))
        hi = int(np.searchsorted(b.open_time, end, side="right"))
        return b.rows[lo:min(hi, lo + limit)]

    def closed_upto(self, symbol: str, now: int) -> int:
        """How many bars have closed by `now` (close_time < now)."""
        return int(np.searchsorted(self.bars[symbol].open_time + 300_000 - 1, now, side="left"))

    def price(self, symbol: str, now: int) -> float:
        """The last close at `now`: the mark and fill price of the fake."""
        i = max(self.closed_upto(symbol, now) - 1, 0)
        return float(self.bars[symbol].rows[i][4])

    def funding_at_or_before(self, symbol: str, now: int) -> dict | None:
        rows = [r for r in self.bars[symbol].funding if r["fundingTime"] <= now]
        return rows[-1] if rows else None
