"""Offline labeling, model training, the model registry and backtests (built on the ClickHouse archive)."""
