"""Cost-inclusive triple-barrier labels, per side, vectorized with numpy.

The decision is taken at the close of bar t, so the entry is that close. Barriers from that bar's ATR:
TP = entry ± k_tp·ATR, SL = entry ∓ k_sl·ATR (+ for a long's TP). Touches are judged on the *following* bars'
high/low, t+1 … t+h; a bar touching both counts as SL (the order inside a bar is unknown: assume the worse);
no touch → TIMEOUT, exit at the close of bar t+h. TP fills at the barrier; SL at the barrier or at the bar's
open when it opened beyond it (a gap through the stop is not filled at the stop).

Bars live on the complete 5m grid (`Bars.on_grid`): a missing bar is NaN and touches nothing. A row whose
outcome could hide in a missing bar (a gap, or the end of the data, before the first touch) gets no label.

Returns are per unit of entry notional. Costs: fee and slippage on the entry and on the exit notional;
funding = the actual settlements with funding time in [entry time, close of the exit bar), each
rate × mark at that settlement (the close of the bar ending there when no mark was recorded), paid by a long
when positive and received by a short: funding_return = −side · Σ rate·mark / entry.
net = gross − fee − slippage + funding. MAE ≤ 0 ≤ MFE are the worst/best excursions from the entry over the
bars held (signed returns of the side); they equal the exit return for an SL (MAE) and a TP (MFE).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

BAR_MS = 300_000
OUTCOMES = ("TP", "SL", "TIMEOUT")
TP, SL, TIMEOUT = 0, 1, 2
SIDES = {"long": 1, "short": -1}


@dataclass(frozen=True)
class LabelSpec:
    k_tp: float = 2.0
    k_sl: float = 1.0
    horizon: int = 48  # bars (4 h of 5m bars)
    fee: float = 0.0004  # taker fee per fill (entry and exit)
    slippage: float = 0.0015  # per fill (entry and exit), 15 bps

    def __post_init__(self) -> None:
        if not (self.k_tp > 0 and self.k_sl > 0):
            raise ValueError("k_tp and k_sl must be positive")
        if int(self.horizon) != self.horizon or self.horizon < 1:
            raise ValueError("the horizon is a positive whole number of bars")
        if self.fee < 0 or self.slippage < 0:
            raise ValueError("fee and slippage cannot be negative")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def id(self) -> str:
        """Identifies the spec by its parameters: the same parameters always give the same id."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    @classmethod
    def from_json(cls, text: str) -> LabelSpec:
        return cls(**json.loads(text))


@dataclass
class Bars:
    """One symbol's 5m bars on a gap-free grid of open times; missing bars are NaN."""

    open_time: np.ndarray  # int64 ms, step BAR_MS
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    atr: np.ndarray  # the features' atr_14 of each bar (NaN when unknown)

    @classmethod
    def on_grid(cls, open_time, open, high, low, close, atr) -> Bars:
        open_time = np.asarray(open_time, dtype=np.int64)
        if len(open_time) == 0:
            empty = np.empty(0)
            return cls(np.empty(0, np.int64), empty, empty, empty, empty, empty)
        if np.any(np.diff(open_time) <= 0) or np.any((open_time - open_time[0]) % BAR_MS):
            raise ValueError("open times must increase on the 5m grid")
        slot = (open_time - open_time[0]) // BAR_MS
        n = int(slot[-1]) + 1

        def place(values) -> np.ndarray:
            out = np.full(n, np.nan)
            out[slot] = np.asarray(values, dtype=np.float64)
            return out

        grid = open_time[0] + np.arange(n, dtype=np.int64) * BAR_MS
        return cls(grid, place(open), place(high), place(low), place(close), place(atr))


@dataclass
class Settlements:
    """Funding settlements of one symbol, sorted by time; mark is NaN where none was recorded."""

    time: np.ndarray  # int64 ms
    rate: np.ndarray
    mark: np.ndarray

    @classmethod
    def none(cls) -> Settlements:
        return cls(np.empty(0, np.int64), np.empty(0), np.empty(0))


LABEL_FIELDS = ("open_time", "outcome", "entry_price", "exit_price", "gross_return", "fee", "slippage",
                "funding", "net_return", "mae", "mfe", "bars_held", "minutes_to_event", "settlements")


def funding_paid(bars: Bars, funding: Settlements) -> tuple[np.ndarray, np.ndarray]:
    """(settlement times, cumulative rate·mark) with a missing mark replaced by the close of the bar ending
    at the settlement; a settlement with neither is skipped (it cannot be valued)."""
    mark = funding.mark.astype(np.float64).copy()
    slot = (funding.time - BAR_MS - (bars.open_time[0] if len(bars.open_time) else 0)) // BAR_MS
    inside = (slot >= 0) & (slot < len(bars.close))
    fill = np.isnan(mark) & inside
    mark[fill] = bars.close[slot[fill]]
    ok = np.isfinite(mark) & np.isfinite(funding.rate)
    return funding.time[ok], np.concatenate([[0.0], np.cumsum(funding.rate[ok] * mark[ok])])


def label_side(bars: Bars, funding: Settlements, side: int, spec: LabelSpec) -> dict[str, np.ndarray]:
    """The labels of every bar that can be labeled, for one side (+1 long, −1 short); arrays in LABEL_FIELDS.

    Vectorized over rows, stepping through the h following bars: at step j every still-open row looks at bar
    i + j at once, and rows leave as soon as they are decided. Most rows are decided within a few bars, so the
    work is (rows × mean bars held), not rows × h."""
    if side not in (1, -1):
        raise ValueError("side is +1 (long) or -1 (short)")
    h = int(spec.horizon)
    pad = np.full(h + 1, np.nan)  # past the end reads like a gap
    o, hi, lo, c = (np.concatenate([getattr(bars, k), pad]) for k in ("open", "high", "low", "close"))
    missing = np.isnan(hi) | np.isnan(lo) | np.isnan(c)
    with np.errstate(invalid="ignore"):
        rows = np.flatnonzero(np.isfinite(bars.close) & np.isfinite(bars.atr) & (bars.atr > 0))
    entry, atr = bars.close[rows], bars.atr[rows]
    tp, sl = entry + side * spec.k_tp * atr, entry - side * spec.k_sl * atr
    worst, best = entry.copy(), entry.copy()  # of the side: the low and the high for a long
    outcome = np.full(len(rows), -1, np.int8)  # -1: open, then hidden by a gap, or decided
    exit_price, held = np.full(len(rows), np.nan), np.zeros(len(rows), np.int32)
    active = np.arange(len(rows))
    for j in range(1, h + 1):
        k = rows[active] + j
        gone = missing[k]  # the outcome could hide in this bar: no label
        active, k = active[~gone], k[~gone]
        if side == 1:
            worst[active] = np.minimum(worst[active], lo[k])
            best[active] = np.maximum(best[active], hi[k])
            hit_sl, hit_tp = lo[k] <= sl[active], hi[k] >= tp[active]
            gap_fill = np.minimum(sl[active], o[k])
        else:
            worst[active] = np.maximum(worst[active], hi[k])
            best[active] = np.minimum(best[active], lo[k])
            hit_sl, hit_tp = hi[k] >= sl[active], lo[k] <= tp[active]
            gap_fill = np.maximum(sl[active], o[k])
        hit_tp &= ~hit_sl  # a bar touching both → SL
        timeout = ~(hit_sl | hit_tp) if j == h else np.zeros(len(active), bool)
        done = hit_sl | hit_tp | timeout
        d = active[done]
        outcome[d] = np.select([hit_sl[done], hit_tp[done]], [SL, TP], TIMEOUT)
        exit_price[d] = np.select([hit_sl[done], hit_tp[done]],
                                  [np.where(np.isnan(gap_fill[done]), sl[d], gap_fill[done]), tp[d]], c[k[done]])
        held[d] = j
        active = active[~done]
    keep = outcome >= 0
    rows, entry, outcome, exit_price, held = rows[keep], entry[keep], outcome[keep], exit_price[keep], held[keep]
    worst, best = worst[keep], best[keep]
    gross = side * (exit_price / entry - 1.0)
    turnover = 1.0 + exit_price / entry  # entry notional + exit notional, per unit of entry notional
    fee, slippage = spec.fee * turnover, spec.slippage * turnover

    open_time = bars.open_time[rows]
    entry_time = open_time + BAR_MS
    f_time, f_cum = funding_paid(bars, funding)
    a, b = np.searchsorted(f_time, entry_time, "left"), np.searchsorted(f_time, entry_time + held * BAR_MS, "left")
    funding_ret = -side * (f_cum[b] - f_cum[a]) / entry

    mae = np.where(outcome == SL, gross, np.minimum(0.0, side * (worst / entry - 1.0)))  # closed at the stop
    mfe = np.where(outcome == TP, gross, np.maximum(0.0, side * (best / entry - 1.0)))  # … at the target
    return {"open_time": open_time, "outcome": outcome, "entry_price": entry, "exit_price": exit_price,
            "gross_return": gross, "fee": fee, "slippage": slippage, "funding": funding_ret,
            "net_return": gross - fee - slippage + funding_ret, "mae": mae, "mfe": mfe, "bars_held": held,
            "minutes_to_event": held * 5, "settlements": (b - a).astype(np.int32)}
