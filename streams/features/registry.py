"""The feature registry: the one list of features — name, definition, warm-up — that the engine computes, the
`features` Avro schema declares (a test keeps them equal, in order) and training reads. Every feature is a double.

Warm-up is counted in 5m bars: a feature is warm from 0-based bar `warmup − 1` on (the indicators' convention).
Finite windows are warm once full. Recursive smoothers (EMAs, Wilder's RSI/ATR/ADX) never forget their start
completely, so they are warm once the start's weight (1 − α)^k is below TOLERANCE = 1e-3: k = 691 bars for
EMA200 (α = 2/201), 94 for Wilder's 14 (α = 1/14); a smoother fed by another one adds its k to its input's
warm-up (macd_signal, adx_14). The 15m/1h indicators count in their own bars (×3, ×12), from a UTC-aligned start.

`ready` (in every record) = every 5m and higher-timeframe window is warm: ≥ READY_BARS 5m bars seen (692, for
ema_200) and ≥ READY_HTF_BARS bars closed per higher timeframe (109 for the RSI: 1308 5m bars ≈ 4.5 days at
1h). Context features — funding, mark, open interest, BTC — do not gate `ready`: they are null while their input
is absent (no open interest stream, no BTC in the run, no mark observed during the bar) and otherwise take the
latest input known at the close. Every value is emitted as soon as it is defined, warm or not; `ready` says that
none depends any more on where the stream started (beyond the tolerance). A gap does not reset anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEMA_VERSION = 1
BAR_MINUTES = 5
TOLERANCE = 1e-3

# what a feature needs; only the symbol's own bars (5m and higher timeframes) gate `ready`
BARS, H15, H1, FUNDING, MARK, OPEN_INTEREST, BTC, CLOCK = "5m", "15m", "1h", "funding", "mark", "oi", "btc", "clock"
HTF_MINUTES = {H15: 15, H1: 60}


def forget(alpha: float) -> int:
    """Updates after which a recursive smoother's start weighs less than TOLERANCE: least k with (1 − α)^k < it."""
    return math.floor(math.log(TOLERANCE) / math.log(1.0 - alpha)) + 1


def ema_warmup(n: int) -> int:
    return 1 + forget(2.0 / (n + 1))  # seeded with the first value


WILDER = forget(1.0 / 14)  # 94
ATR = 14 + WILDER  # first value at bar 13 (the mean of 14 true ranges)
RSI = 15 + WILDER  # first value at bar 14 (14 changes)
MACD = ema_warmup(26)  # the slow EMA forgets last
MACD_SIGNAL = MACD + forget(2.0 / 10)
ADX = 15 + WILDER + WILDER  # ±DM/TR sums from bar 14, then ADX smooths DX once more


@dataclass(frozen=True)
class Feature:
    name: str
    warmup: int  # in 5m bars
    definition: str
    needs: str = BARS


def _htf(minutes: int, needs: str) -> list[Feature]:
    k = minutes // BAR_MINUTES
    tf = f"{minutes}m" if minutes < 60 else f"{minutes // 60}h"
    return [
        Feature(f"rsi_14_{tf}", RSI * k, f"rsi_14 of the last closed {tf} bar (built from the 5m bars)", needs),
        Feature(f"atr_pct_{tf}", ATR * k, f"atr_14 / close of the last closed {tf} bar", needs),
        Feature(f"r_1_{tf}", 2 * k, f"close / previous close - 1 of the last closed {tf} bar", needs),
    ]


FEATURES: tuple[Feature, ...] = (
    Feature("r_1", 2, "close / close 1 bar earlier - 1 (bars as received: a gap lengthens the span)"),
    Feature("r_3", 4, "close / close 3 bars earlier - 1"),
    Feature("r_12", 13, "close / close 12 bars earlier - 1"),
    Feature("range_pct", 1, "(high - low) / close"),
    Feature("ema_7", ema_warmup(7), "EMA of close, alpha = 2/8, seeded with the first close (pandas ewm adjust=False)"),
    Feature("ema_21", ema_warmup(21), "EMA of close, alpha = 2/22, seeded with the first close"),
    Feature("ema_50", ema_warmup(50), "EMA of close, alpha = 2/51, seeded with the first close"),
    Feature("ema_200", ema_warmup(200), "EMA of close, alpha = 2/201, seeded with the first close"),
    Feature("ema_dist_atr", max(ema_warmup(21), ATR), "(close - ema_21) / atr_14"),
    Feature("atr_14", ATR, "Wilder's ATR: mean of the first 14 true ranges, then (prev*13 + tr)/14"),
    Feature("atr_pct", ATR, "atr_14 / close"),
    Feature("rsi_14", RSI, "Wilder's RSI: gain/loss averages seeded with the mean of 14 changes, Wilder-smoothed"),
    Feature("macd", MACD, "EMA12 - EMA26 of close"),
    Feature("macd_signal", MACD_SIGNAL, "EMA9 of macd, seeded with the first macd"),
    Feature("macd_hist", MACD_SIGNAL, "macd - macd_signal"),
    Feature("adx_14", ADX, "Wilder's ADX 14 (+DM/-DM exclusive, Wilder sums, ADX = Wilder average of DX)"),
    Feature("stoch_k", 14, "100*(close - lowest low 14)/(highest high 14 - lowest low 14); 50 when the range is 0"),
    Feature("stoch_d", 16, "mean of the last 3 stoch_k"),
    Feature("volatility_10", 11, "sample std (ddof 1) of the last 10 r_1"),
    Feature("volatility_30", 31, "sample std (ddof 1) of the last 30 r_1"),
    Feature("volume_ma_12", 12, "mean volume of the last 12 bars"),
    Feature("vol_z", 48, "(volume - mean) / sample std of the last 48 volumes (this bar included); null when std 0"),
    Feature("bb_upper", 20, "bb_middle + 2*sample std of the last 20 closes"),
    Feature("bb_middle", 20, "mean of the last 20 closes"),
    Feature("bb_lower", 20, "bb_middle - 2*sample std of the last 20 closes"),
    Feature("bb_z", 20, "(close - bb_middle) / (2*std); null when std 0"),
    Feature("vwap_dist", max(ATR, 288), "(close - VWAP anchored at 00:00 UTC of typical price) / atr_14"),
    Feature("funding_rate", 1, "the latest funding rate known at the close: predicted (md.markprice) or settled "
            "(md.funding), whichever is newer", FUNDING),
    Feature("funding_ma_24h", 288, "mean of the settled rates with funding time in (close - 24 h, close]", FUNDING),
    Feature("funding_z", 288, "(funding_rate - funding_ma_24h) / sample std of those settlements; null when fewer "
            "than 2 or std 0", FUNDING),
    Feature("minutes_to_funding", 1, "minutes from the bar's end to the next settlement (next_funding_time of the "
            "latest mark, moved on by the funding interval once passed)", FUNDING),
    Feature("mark_premium", 1, "(close - mark) / mark with the latest mark observed during the bar; null when none",
            MARK),
    Feature("oi_change_1", 2, "open interest at this close / at the previous bar's close - 1", OPEN_INTEREST),
    Feature("oi_change_12", 13, "open interest at this close / 12 bars earlier - 1", OPEN_INTEREST),
    Feature("btc_regime", ema_warmup(200), "+1 / -1 / 0 when BTC's ema_50 is above ema_200*1.02 / below "
            "ema_200*0.98 / between, for the same bar (BTC's own row included)", BTC),
    Feature("btc_corr_60", 61, "Pearson correlation of r_1 with BTC's r_1 over the last 60 bars both have "
            "(aligned by open_time)", BTC),
    *_htf(15, H15),
    *_htf(60, H1),
    Feature("hour_of_day", 1, "UTC hour of the bar's open time, 0-23", CLOCK),
    Feature("day_of_week", 1, "UTC weekday of the bar's open time, 0 = Monday ... 6 = Sunday", CLOCK),
    Feature("is_asian_session", 1, "1 when hour_of_day < 8 (00-08 UTC), else 0", CLOCK),
)

NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}
READY_BARS = max(f.warmup for f in FEATURES if f.needs == BARS)
READY_HTF_BARS = {minutes: max(f.warmup for f in FEATURES if f.needs == needs) // (minutes // BAR_MINUTES)
                  for needs, minutes in HTF_MINUTES.items()}
