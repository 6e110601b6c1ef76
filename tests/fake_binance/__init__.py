"""A local fake of Binance USDT-M futures for the connector tests (see server.py)."""

from tests.fake_binance.server import API_KEY, API_SECRET, FakeBinance

__all__ = ["API_KEY", "API_SECRET", "FakeBinance"]
