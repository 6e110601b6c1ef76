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
from numpy.lib.stride_tricks import sliding_window_view

BAR_MS = 300_000
OUTCOMES = ("TP", "SL", "TIMEOUT")
TP, SL, TIMEOUT = 0, 1, 2
SIDES = {"long": 1, "short": -1}
CHUNK_ROWS = 65_536  # bounds the (rows × horizon) work arrays to a few tens of MB


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


def _funding_paid(bars: Bars, funding: Settlements) -> tuple[np.ndarray, np.ndarray]:
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
    """The labels of every bar that can be labeled, for one side (+1 long, −1 short); arrays in LABEL_FIELDS."""
    if side not in (1, -1):
        raise ValueError("side is +1 (long) or -1 (short)")
    h, n = int(spec.horizon), len(bars.close)
    pad = np.full(h, np.nan)
    # row i's window: bars i+1 … i+h (NaN past the end, which therefore reads like a gap)
    windows = {k: sliding_window_view(np.concatenate([getattr(bars, k)[1:], pad, [np.nan]]), h)[:n]
               for k in ("open", "high", "low", "close")}
    f_time, f_cum = _funding_paid(bars, funding)
    parts = [_label_chunk(bars, windows, f_time, f_cum, side, spec, lo, min(lo + CHUNK_ROWS, n))
             for lo in range(0, n, CHUNK_ROWS)]
    if not parts:
        return {k: np.empty(0) for k in LABEL_FIELDS}
    return {k: np.concatenate([p[k] for p in parts]) for k in LABEL_FIELDS}


def _first(hit: np.ndarray, h: int) -> np.ndarray:
    """Index of the first True per row, h when none."""
    return np.where(hit.any(axis=1), hit.argmax(axis=1), h)


def _label_chunk(bars, windows, f_time, f_cum, side, spec, lo, hi) -> dict[str, np.ndarray]:
    h = int(spec.horizon)
    entry, atr = bars.close[lo:hi], bars.atr[lo:hi]
    w_open, w_high, w_low, w_close = (windows[k][lo:hi] for k in ("open", "high", "low", "close"))
    tp = entry + side * spec.k_tp * atr
    sl = entry - side * spec.k_sl * atr
    with np.errstate(invalid="ignore"):  # NaN (missing bars) compares False: touches nothing
        if side == 1:
            first_tp, first_sl = _first(w_high >= tp[:, None], h), _first(w_low <= sl[:, None], h)
        else:
            first_tp, first_sl = _first(w_low <= tp[:, None], h), _first(w_high >= sl[:, None], h)
    first_missing = _first(np.isnan(w_high) | np.isnan(w_low) | np.isnan(w_close), h)
    outcome = np.where(first_sl <= first_tp, SL, TP)  # a bar touching both → SL
    outcome = np.where((first_sl == h) & (first_tp == h), TIMEOUT, outcome)
    j = np.where(outcome == TIMEOUT, h - 1, np.minimum(first_tp, first_sl))  # offset of the exit bar
    # known: the deciding bar comes before any missing one (a timeout needs all h bars)
    keep = np.isfinite(entry) & np.isfinite(atr) & (atr > 0) & (j < first_missing)
    rows = np.flatnonzero(keep)
    entry, tp, sl, outcome, j = entry[rows], tp[rows], sl[rows], outcome[rows], j[rows]
    exit_open = w_open[rows, j]
    gap_fill = np.minimum(sl, exit_open) if side == 1 else np.maximum(sl, exit_open)
    exit_price = np.select([outcome == TP, outcome == SL], [tp, np.where(np.isnan(exit_open), sl, gap_fill)],
                           w_close[rows, j])
    gross = side * (exit_price / entry - 1.0)
    turnover = 1.0 + exit_price / entry  # entry notional + exit notional, per unit of entry notional
    fee, slippage = spec.fee * turnover, spec.slippage * turnover

    open_time = bars.open_time[lo:hi][rows]
    entry_time = open_time + BAR_MS
    exit_time = entry_time + (j + 1) * BAR_MS
    a, b = np.searchsorted(f_time, entry_time, "left"), np.searchsorted(f_time, exit_time, "left")
    funding = -side * (f_cum[b] - f_cum[a]) / entry

    held = np.arange(h) <= j[:, None]
    low_min = np.where(held, w_low[rows], np.inf).min(axis=1)
    high_max = np.where(held, w_high[rows], -np.inf).max(axis=1)
    worst, best = (low_min, high_max) if side == 1 else (high_max, low_min)
    mae = np.minimum(0.0, side * (worst / entry - 1.0))
    mfe = np.maximum(0.0, side * (best / entry - 1.0))
    mae = np.where(outcome == SL, gross, mae)  # the position was closed at the stop
    mfe = np.where(outcome == TP, gross, mfe)  # … and at the target
    return {"open_time": open_time, "outcome": outcome.astype(np.int8), "entry_price": entry,
            "exit_price": exit_price, "gross_return": gross, "fee": fee, "slippage": slippage, "funding": funding,
            "net_return": gross - fee - slippage + funding, "mae": mae, "mfe": mfe,
            "bars_held": (j + 1).astype(np.int32), "minutes_to_event": ((j + 1) * 5).astype(np.int32),
            "settlements": (b - a).astype(np.int32)}
