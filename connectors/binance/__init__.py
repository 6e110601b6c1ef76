"""Binance USDT-M connectors: REST client, market streams, user data stream, execution."""
