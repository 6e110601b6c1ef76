"""Expected value per side, net of costs, the decision and the sizing: pure functions, vectorized over a batch.

All returns are per unit of entry notional, with the cost model of the labels (`training.labels`), so the EV is
the expectation of what the labels call `net_return`:

    tp = k_tp·ATR / close, sl = k_sl·ATR / close        (the label spec's barriers)
    gross = P(TP)·tp − P(SL)·sl + P(TIMEOUT)·E[gross return at timeout]
    costs = (fee + slippage) · (2 + side·gross)          (entry notional 1, exit notional 1 + side·gross)
    funding = side · rate · n                             (a long pays a positive rate, a short receives it)
    EV = gross − costs − funding

n, the settlements expected within the hold: the hold is the predicted mean hold H (bars × 5 minutes); a
settlement falls every 480 minutes, the next one `minutes_to_funding` away, so n = 0 when H < that, else
1 + ⌊(H − minutes_to_funding) / 480⌋; without `minutes_to_funding`, n = H / 480. The rate is the current
(last known) one: the best forecast of the next ones at a 5m horizon.

Decision: a side qualifies when EV > MIN_EV and P(win) = P(TP) / (P(TP) + P(SL)) ≥ MIN_PWIN (the chance the
trade ends at its target rather than its stop); LONG or SHORT, the higher EV when both qualify, else FLAT.

Sizing (`size`): entry = close, SL and TP at the barriers, all rounded to the tick; quantity = risk budget /
stop distance, floored to the step; under the minimum quantity or notional → FLAT. Leverage from volatility:
round(default · ref_atr_pct / (ATR / close)) within [min, max] — calm markets get more, wild ones less, the
default at the reference volatility. The isolated liquidation price follows Binance's formula
(`connectors.binance.rules`), and `liq_distance_atr` = |entry − liquidation| / ATR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from connectors.binance.rules import Bracket, SymbolRules, isolated_liquidation_price
from training.labels import LabelSpec

FUNDING_INTERVAL_MINUTES = 480  # Binance settles USDT-M funding at 00, 08 and 16 UTC
BAR_MINUTES = 5
LONG, SHORT, FLAT = "LONG", "SHORT", "FLAT"
SIDE = {LONG: 1, SHORT: -1}


@dataclass(frozen=True)
class CostModel:
    """The label spec's barriers and costs (floats, or arrays per row): the EV prices what the labels measured."""

    k_tp: float = LabelSpec.k_tp
    k_sl: float = LabelSpec.k_sl
    fee: float = LabelSpec.fee
    slippage: float = LabelSpec.slippage


@dataclass(frozen=True)
class Thresholds:
    min_ev: float = 0.0
    min_pwin: float = 0.55


@dataclass(frozen=True)
class SizingRules:
    risk_usdt: float = 50.0
    leverage_min: int = 2
    leverage_max: int = 8
    leverage_default: int = 5
    ref_atr_pct: float = 0.003


def settlements_within(hold_bars: np.ndarray, minutes_to_funding: np.ndarray) -> np.ndarray:
    hold = np.maximum(np.asarray(hold_bars, float), 0.0) * BAR_MINUTES
    mtf = np.asarray(minutes_to_funding, float)
    with np.errstate(invalid="ignore"):
        crossed = np.where(hold >= mtf, 1.0 + np.floor((hold - mtf) / FUNDING_INTERVAL_MINUTES), 0.0)
    return np.where(np.isfinite(mtf), crossed, hold / FUNDING_INTERVAL_MINUTES)


def side_ev(side: int, p_tp, p_sl, p_timeout, timeout_return, hold_bars, close, atr, funding_rate,
            minutes_to_funding, cost: CostModel) -> dict[str, np.ndarray]:
    """EV of one side (+1 long, −1 short) for every row, with its parts."""
    close, atr = np.asarray(close, float), np.asarray(atr, float)
    tp, sl = cost.k_tp * atr / close, cost.k_sl * atr / close
    timeout = np.nan_to_num(np.asarray(timeout_return, float))  # no timeout model: a timeout returns ~0
    gross = np.asarray(p_tp) * tp - np.asarray(p_sl) * sl + np.asarray(p_timeout) * timeout
    costs = (cost.fee + cost.slippage) * (2.0 + side * gross)
    n = settlements_within(hold_bars, minutes_to_funding)
    funding = side * np.nan_to_num(np.asarray(funding_rate, float)) * n
    return {"ev": gross - costs - funding, "gross": gross, "costs": costs, "funding": funding,
            "settlements": n, "tp": tp, "sl": sl}


def p_win(p_tp, p_sl) -> np.ndarray:
    p_tp, p_sl = np.asarray(p_tp, float), np.asarray(p_sl, float)
    total = p_tp + p_sl
    return np.divide(p_tp, total, out=np.zeros_like(total), where=total > 0)


def decide(ev_long, ev_short, pwin_long, pwin_short, th: Thresholds) -> np.ndarray:
    """LONG / SHORT / FLAT per row; NaN EVs never qualify."""
    ev_long, ev_short = np.asarray(ev_long, float), np.asarray(ev_short, float)
    with np.errstate(invalid="ignore"):
        long_ok = (ev_long > th.min_ev) & (np.asarray(pwin_long) >= th.min_pwin)
        short_ok = (ev_short > th.min_ev) & (np.asarray(pwin_short) >= th.min_pwin)
        pick_long = long_ok & (~short_ok | (ev_long >= ev_short))
    return np.where(pick_long, LONG, np.where(short_ok, SHORT, FLAT))


def leverage(close, atr, rules: SizingRules) -> np.ndarray:
    atr_pct = np.asarray(atr, float) / np.asarray(close, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.round(rules.leverage_default * rules.ref_atr_pct / atr_pct)
    raw = np.where(np.isfinite(raw), raw, rules.leverage_default)
    return np.clip(raw, rules.leverage_min, rules.leverage_max).astype(int)


@dataclass
class Sized:
    entry: float
    stop_loss: float
    take_profit: float
    quantity: float
    notional: float
    leverage: int
    liq_price: float
    liq_distance_atr: float


def size(side: int, close: float, atr: float, lev: int, rules: SymbolRules, brackets: list[Bracket],
         cost: CostModel, sizing: SizingRules) -> Sized | str:
    """The order a signal proposes, rounded to the exchange's rules; a reason string when none fits."""
    if not (np.isfinite(close) and np.isfinite(atr) and atr > 0 and close > 0):
        return "no_atr"
    entry = rules.price(close)
    sl = rules.price(close - side * cost.k_sl * atr)
    tp = rules.price(close + side * cost.k_tp * atr)
    stop_distance = abs(entry - sl)
    if stop_distance == 0:
        return "stop_within_one_tick"
    qty = rules.quantity(sizing.risk_usdt / float(stop_distance))
    notional = qty * entry
    if qty < rules.min_qty or qty == 0 or notional < rules.min_notional:
        return "below_min_notional"
    q, e = float(qty), float(entry)
    bracket = Bracket.for_notional(brackets, q * e)
    liq = isolated_liquidation_price(side, q, e, lev, bracket)
    liq = max(liq, 0.0)
    return Sized(e, float(sl), float(tp), q, float(notional), int(lev), liq, abs(e - liq) / atr)
