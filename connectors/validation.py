"""Values a market-data record may carry, checked where records enter perpflow (the Binance publisher and the
replays) so that a NaN, a negative price or an absurd funding rate goes to the dead letters with its reason and
never reaches an md.* topic, the features or a model.

Bounds, per field:
- prices (kline open/high/low/close, mark, book bid/ask, liquidation price): finite, > 0 and < `MAX_PRICE`;
  index and estimated settle prices may be absent, but not ≤ 0; a funding settlement's mark may be absent or 0
  (unknown: Binance leaves it empty for older settlements);
- a kline: low ≤ open, close ≤ high; volume finite and ≥ 0; quote and taker volumes and the trade count ≥ 0, or
  unknown (None or NaN: history files without them);
- funding rates (a settlement's, and the one a mark carries): finite and |rate| ≤ `MAX_FUNDING_RATE` per funding
  interval — Binance caps USDT-M rates at ±3 % at most (±2 % or less on most symbols), so more is a corrupt value;
- open interest and its value: finite and ≥ 0;
- a book ticker: bid and ask prices > 0, bid ≤ ask, quantities ≥ 0.

One pure function per topic, `problem(topic, record)`: None when the record is fine, else (reason, detail)."""

from __future__ import annotations

import math
from collections.abc import Callable

MAX_PRICE = 1e9  # USDT per unit of a contract: above any listed contract by orders of magnitude
MAX_FUNDING_RATE = 0.05

Problem = tuple[str, str] | None


def _price(record: dict, name: str, optional: bool = False) -> Problem:
    x = record[name]
    if x is None and optional:
        return None
    if x is None or not math.isfinite(x):
        return "not_finite", f"{name}={x}"
    if x <= 0:
        return "not_positive", f"{name}={x}"
    if x >= MAX_PRICE:
        return "absurd", f"{name}={x} ≥ {MAX_PRICE:g}"
    return None


def _amount(record: dict, name: str, optional: bool = False) -> Problem:
    x = record[name]
    if x is None and optional:
        return None
    if x is None or not math.isfinite(x):
        return "not_finite", f"{name}={x}"
    if x < 0:
        return "negative", f"{name}={x}"
    return None


def _unknown_or_amount(record: dict, name: str) -> Problem:
    x = record[name]
    if x is None or x != x:  # NaN: not recorded
        return None
    if x < 0 or x == math.inf:
        return ("negative" if x < 0 else "not_finite"), f"{name}={x}"
    return None


def _rate(record: dict, name: str, optional: bool = False) -> Problem:
    x = record[name]
    if x is None and optional:
        return None
    if x is None or not math.isfinite(x):
        return "not_finite", f"{name}={x}"
    if abs(x) > MAX_FUNDING_RATE:
        return "absurd", f"{name}={x}: |rate| > {MAX_FUNDING_RATE} per funding interval"
    return None


def _first(*problems: Problem) -> Problem:
    return next((p for p in problems if p is not None), None)


def kline(r: dict) -> Problem:
    found = _first(_price(r, "open"), _price(r, "high"), _price(r, "low"), _price(r, "close"), _amount(r, "volume"),
                   _unknown_or_amount(r, "quote_volume"), _unknown_or_amount(r, "taker_buy_volume"),
                   _unknown_or_amount(r, "taker_buy_quote_volume"))
    if found is not None:
        return found
    if r["high"] < r["low"]:
        return "high_below_low", f"high={r['high']} < low={r['low']}"
    if not (r["low"] <= r["open"] <= r["high"] and r["low"] <= r["close"] <= r["high"]):
        return "outside_range", f"open={r['open']} close={r['close']} outside [{r['low']}, {r['high']}]"
    if r["trades"] is not None and r["trades"] < 0:
        return "negative", f"trades={r['trades']}"
    return None


def mark_price(r: dict) -> Problem:
    return _first(_price(r, "mark_price"), _price(r, "index_price", True), _price(r, "estimated_settle_price", True),
                  _rate(r, "funding_rate", True))


def funding(r: dict) -> Problem:
    return _first(_rate(r, "funding_rate"), _amount(r, "mark_price", True))


def open_interest(r: dict) -> Problem:
    return _first(_amount(r, "open_interest"), _amount(r, "open_interest_value", True))


def book_ticker(r: dict) -> Problem:
    found = _first(_price(r, "bid_price"), _price(r, "ask_price"), _amount(r, "bid_qty"), _amount(r, "ask_qty"))
    if found is None and r["bid_price"] > r["ask_price"]:
        return "crossed_book", f"bid={r['bid_price']} > ask={r['ask_price']}"
    return found


def liquidation(r: dict) -> Problem:
    return _first(_price(r, "price"), _amount(r, "quantity"), _amount(r, "average_price"),
                  _amount(r, "last_filled_qty"), _amount(r, "filled_qty"))


CHECKS: dict[str, Callable[[dict], Problem]] = {
    "md.klines": kline, "md.markprice": mark_price, "md.funding": funding, "md.openinterest": open_interest,
    "md.bookticker": book_ticker, "md.liquidations": liquidation,
}


def problem(topic: str, record: dict) -> Problem:
    """What is wrong with a record for `topic` (a catalog name); None when it may be published, or the topic's
    records are not market data."""
    check = CHECKS.get(topic)
    return None if check is None else check(record)
