"""A run's performance numbers (`metrics.json`) from its ledger (`training.backtest.accounting`).

Conventions:
- returns are of the mark-to-market equity (wallet + unrealized at the last bar close), in event time;
- daily returns: UTC calendar days from the day of the first bar to the day of the last; a day's return is its closing
  equity (the last value before midnight UTC) over the previous day's (the initial balance for the first day); days
  without trades count as 0 returns, so a quiet run is not flattered;
- Sharpe = mean(daily) / std(daily, ddof=1) · √365 and Sortino = mean(daily) / √mean(min(daily, 0)²) · √365: crypto
  trades every day of the year, and the risk-free rate is taken as 0; null with fewer than two days, or no dispersion
  (no down day for the Sortino);
- CAGR = (final / initial equity)^(365 days / span) − 1 over the data span (first bar open → last bar end): on short
  runs it is an extrapolation, not a forecast;
- max drawdown = the largest 1 − equity / running peak over the equity series; its duration runs from that peak to
  the equity's return to it (or the end of the run, if it never returned);
- trade statistics (win rate, profit factor, expectancy, hold) are of closed trades; money in USDT.

Values are full precision here; `to_json` rounds them, only for presentation, and sorts the keys.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from training.backtest.accounting import EXIT_KINDS, Ledger

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
PERIODS_PER_YEAR = 365
DECIMALS = 8


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def period_returns(ledger: Ledger, freq: str = "D") -> pd.Series:
    """Returns of the equity per UTC calendar period (`D` days, `M` months), indexed by the period; the first period's
    is against the initial balance."""
    eq = ledger.equity
    if eq.empty or ledger.data_end <= ledger.data_start:
        return pd.Series(dtype=np.float64)
    start = pd.Timestamp(ledger.data_start, unit="ms")
    end = pd.Timestamp(ledger.data_end - 1, unit="ms")
    periods = pd.period_range(start.to_period(freq), end.to_period(freq), freq=freq)
    # the end of each period in ms: the next period's start
    bounds = np.asarray([(p + 1).start_time.value // 1_000_000 for p in periods], dtype=np.int64)
    idx = np.searchsorted(eq["time"].to_numpy(), bounds, "left") - 1
    closing = eq["equity"].to_numpy()[np.maximum(idx, 0)]
    closing = np.where(idx >= 0, closing, ledger.initial_balance)
    previous = np.concatenate([[ledger.initial_balance], closing[:-1]])
    return pd.Series(closing / previous - 1.0, index=periods)


def drawdown(ledger: Ledger) -> pd.DataFrame:
    """time, equity, peak and drawdown (1 − equity / peak, ≥ 0) of the equity series."""
    eq = ledger.equity
    peak = np.maximum.accumulate(eq["equity"].to_numpy()) if len(eq) else np.empty(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        dd = np.where(peak > 0, 1.0 - eq["equity"].to_numpy() / peak, 0.0) if len(eq) else np.empty(0)
    return pd.DataFrame({"time": eq["time"].to_numpy(), "equity": eq["equity"].to_numpy(), "peak": peak,
                         "drawdown": dd})


def _max_drawdown(ledger: Ledger) -> tuple[float, float]:
    dd = drawdown(ledger)
    if dd.empty or dd["drawdown"].max() <= 0:
        return 0.0, 0.0
    eq, times = dd["equity"].to_numpy(), dd["time"].to_numpy()
    trough = int(np.argmax(dd["drawdown"].to_numpy()))
    top = int(np.argmax(eq[: trough + 1]))  # where the peak was first reached
    back = np.flatnonzero(eq[trough:] >= eq[top])
    recovered = int(times[trough + back[0]]) if len(back) else ledger.data_end
    return float(dd["drawdown"].iat[trough]), (recovered - int(times[top])) / HOUR_MS


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _time_in_market(ledger: Ledger) -> float:
    span = ledger.data_end - ledger.data_start
    if span <= 0:
        return 0.0
    spans = sorted((t.entry_time, t.exit_time if t.exit_time is not None else ledger.data_end) for t in ledger.trades)
    covered, reach = 0, ledger.data_start
    for a, b in spans:  # union of the holding intervals
        a = max(a, reach)
        if b > a:
            covered += b - a
            reach = b
    return covered / span


def compute(ledger: Ledger) -> dict:
    """The metrics of one run: a flat dict of numbers (None where undefined), plus counts by exit kind and, when the
    run's signals and verdicts were given, the signal counts and rejections by reason."""
    closed = ledger.closed_trades
    net = np.asarray([t.net_pnl for t in closed], dtype=np.float64)
    initial = ledger.initial_balance
    final_equity = float(ledger.equity["equity"].iat[-1]) if len(ledger.equity) else initial
    span_days = (ledger.data_end - ledger.data_start) / DAY_MS
    daily = period_returns(ledger, "D").to_numpy()
    sharpe = sortino = None
    if len(daily) >= 2:
        sd = float(np.std(daily, ddof=1))
        sharpe = float(np.mean(daily)) / sd * math.sqrt(PERIODS_PER_YEAR) if sd > 0 else None
        downside = math.sqrt(float(np.mean(np.minimum(daily, 0.0) ** 2)))
        sortino = float(np.mean(daily)) / downside * math.sqrt(PERIODS_PER_YEAR) if downside > 0 else None
    mdd, mdd_hours = _max_drawdown(ledger)
    wins, losses = net[net > 0].sum(), -net[net < 0].sum()
    turnover = sum(t.notional + (t.quantity * t.exit_price if t.closed else 0.0) for t in ledger.trades)
    lev = ledger.equity["leverage"].to_numpy() if len(ledger.equity) else np.empty(0)
    out = {
        "initial_balance": initial,
        "final_equity": final_equity,
        "final_wallet": ledger.final_wallet,
        "total_return": final_equity / initial - 1.0,
        "cagr": (final_equity / initial) ** (365.0 / span_days) - 1.0 if span_days > 0 and final_equity > 0
        else None,
        "sharpe": sharpe,
        "sortino": sortino,
        "days": len(daily),
        "max_drawdown": mdd,
        "max_drawdown_duration_hours": mdd_hours,
        "trades": len(closed),
        "open_trades": len(ledger.trades) - len(closed),
        "exits": {k: sum(t.exit_kind == k for t in closed) for k in EXIT_KINDS},
        "win_rate": float(np.mean(net > 0)) if len(net) else None,
        "profit_factor": _ratio(float(wins), float(losses)),
        "expectancy": float(net.mean()) if len(net) else None,
        "avg_hold_hours": float(np.mean([(t.exit_time - t.entry_time) / HOUR_MS for t in closed])) if closed else None,
        "avg_bars_held": float(np.mean([t.bars_held for t in closed])) if closed else None,
        # the split of closed trades: gross − fees − slippage + funding = net
        "gross_pnl": float(sum(t.gross_pnl for t in closed)),
        "fees": float(sum(t.fees for t in closed)),
        "slippage": float(sum(t.slippage for t in closed)),
        "funding": float(sum(t.funding for t in closed)),
        "net_pnl": float(net.sum()),
        "open_trades_pnl": float(sum(t.net_pnl for t in ledger.trades if not t.closed)),
        "funding_outside_trades": ledger.funding_outside_trades,
        "turnover": float(turnover),
        "turnover_ratio": float(turnover) / initial,
        "time_in_market": _time_in_market(ledger),
        "max_leverage": float(np.nanmax(lev)) if len(lev) and np.isfinite(lev).any() else 0.0,
        "expired_orders": ledger.expired_orders,
        "symbols": list(ledger.symbols),
        "data_start": _iso(ledger.data_start),
        "data_end": _iso(ledger.data_end),
    }
    if ledger.signals.get("total"):
        out["signals"] = dict(ledger.signals)
        out["flat_reasons"] = dict(ledger.flat_reasons)
    if "verdicts" in ledger.signals:
        out["rejected_by_reason"] = dict(ledger.rejections)
    return out


def _present(value):
    if isinstance(value, dict):
        return {k: _present(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_present(v) for v in value]
    if isinstance(value, float | np.floating):
        return round(float(value), DECIMALS) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def to_json(metrics: dict) -> str:
    """metrics.json: keys sorted, floats rounded to 8 decimals, non-finite values null — byte-identical for the same
    run."""
    return json.dumps(_present(metrics), sort_keys=True, indent=2) + "\n"
