"""Backtest accounting, metrics and the report of one run."""
