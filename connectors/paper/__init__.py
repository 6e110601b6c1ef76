"""The paper exchange: order intents and market data in, Binance-shaped user-data events out."""
