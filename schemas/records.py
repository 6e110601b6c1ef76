"""Market-data records built in one place for every producer (replay, Binance WebSocket, Binance REST), so
a bar archived from a backtest and the same bar seen live are the same record, up to `source`."""

from __future__ import annotations

from schemas import event_ids

INTERVAL_MS = {"1m": 60_000, "3m": 180_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000,
               "1h": 3_600_000, "2h": 7_200_000, "4h": 14_400_000, "8h": 28_800_000, "1d": 86_400_000}


def kline(symbol: str, interval: str, open_time: int, close_time: int, o: float, h: float, low: float, c: float,
          v: float, qv: float | None, trades: int | None, tbv: float | None, tbqv: float | None,
          source: str) -> dict:
    """A closed bar; its event time is its close (`close_time` = open + interval − 1 ms, as Binance reports)."""
    return {
        "event_id": event_ids.kline(symbol, interval, open_time), "event_time": close_time,
        "symbol": symbol, "interval": interval, "open_time": open_time, "close_time": close_time,
        "open": o, "high": h, "low": low, "close": c, "volume": v,
        "quote_volume": qv, "trades": trades, "taker_buy_volume": tbv,
        "taker_buy_quote_volume": tbqv, "is_closed": True, "source": source,
    }


def mark_price(symbol: str, event_time: int, mark: float, index: float | None, settle: float | None,
               funding_rate: float | None, next_funding_time: int | None, source: str) -> dict:
    return {
        "event_id": event_ids.mark_price(symbol, event_time), "event_time": event_time, "symbol": symbol,
        "mark_price": mark, "index_price": index, "estimated_settle_price": settle,
        "funding_rate": funding_rate, "next_funding_time": next_funding_time, "source": source,
    }


def funding(symbol: str, funding_time: int, rate: float, mark: float | None, source: str) -> dict:
    return {
        "event_id": event_ids.funding(symbol, funding_time), "event_time": funding_time, "symbol": symbol,
        "funding_time": funding_time, "funding_rate": rate, "mark_price": mark, "source": source,
    }
