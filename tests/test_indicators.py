"""streams.features.indicators: each incremental indicator against an independent reference written here from its
definition (plain loops over lists, numpy over sliding windows, or pandas where the definition is pandas'), on the
bundled real 5m bars (BTC, and ETH for the correlation): every defined value within 1e-9 relative (or 1e-12
absolute) and the same undefined (warm-up) pattern. Plus: state round trips through JSON mid-stream continue
exactly like an uninterrupted run, and tiny hand-computed cases for ATR, RSI and ADX."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from fractions import Fraction
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from streams.features.indicators import (
    AnchoredVwap,
    Bollinger,
    Ema,
    HigherTimeframe,
    HtfFeatures,
    Macd,
    RollingCorrelation,
    RollingWindow,
    Stochastic,
    WilderAdx,
    WilderAtr,
    WilderRsi,
)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "binance-um-futures"
REL, ABS = 1e-9, 1e-12
# pandas' rolling std/var is an online algorithm whose own error reaches ~1e-9 relative on BTC closes (e.g. bar 6414
# of close std 20: pandas 19.489481663938875, exact 19.4894816436162…): the 1e-9 reference for rolling moments is a
# recomputation from scratch per window (numpy two-pass, and exact fractions on a sample); pandas is checked at 1e-8.
PANDAS_REL = 1e-8
MIN_MS = 60_000


# ---------------------------------------------------------------------------------------------------- data, helpers


@cache
def frame(symbol: str) -> pd.DataFrame:
    df = pd.read_feather(SAMPLE / f"{symbol}_USDT_USDT-5m-futures.feather")
    assert len(df) == 8928
    df["t"] = (df["date"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    return df


@cache
def bars(symbol: str) -> dict[str, list]:
    df = frame(symbol)
    return {k: df[k].tolist() for k in ("t", "open", "high", "low", "close", "volume")}


@cache
def funding_on_bars(symbol: str) -> list[float]:
    """The last known 8h funding rate at each 5m bar's open (freqtrade keeps the rate in `open`)."""
    f = pd.read_feather(SAMPLE / f"{symbol}_USDT_USDT-8h-funding_rate.feather")[["date", "open"]]
    merged = pd.merge_asof(frame(symbol)[["date"]], f.rename(columns={"open": "rate"}), on="date")
    assert merged["rate"].notna().all()
    return merged["rate"].tolist()


def returns(close: list[float]) -> list[float]:
    return [close[i] / close[i - 1] - 1.0 for i in range(1, len(close))]


def undefined(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def assert_matches(got: list, want, name: str, warmup: int | None = None, rel: float = REL) -> None:
    """Same undefined pattern, every defined value within `rel` relative or ABS absolute."""
    want = list(want)
    assert len(got) == len(want), name
    n_defined = 0
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if undefined(w):
            assert g is None, f"{name}[{i}]: expected undefined, got {g!r}"
        else:
            assert g is not None, f"{name}[{i}]: expected {w!r}, got None"
            assert math.isclose(g, w, rel_tol=rel, abs_tol=ABS), f"{name}[{i}]: {g!r} != {w!r}"
            n_defined += 1
    assert n_defined > len(want) // 2, f"{name}: only {n_defined} defined values compared"
    if warmup is not None:
        first = next(i for i, w in enumerate(want) if not undefined(w))
        assert first == warmup - 1, f"{name}: reference defined from bar {first}, warmup says {warmup - 1}"


# ---------------------------------------------------------------------------------------------------- references


def ref_true_ranges(h: list[float], low: list[float], c: list[float]) -> list[float]:
    trs = [h[0] - low[0]]
    for i in range(1, len(c)):
        trs.append(max(h[i] - low[i], abs(h[i] - c[i - 1]), abs(low[i] - c[i - 1])))
    return trs


def ref_atr(h: list[float], low: list[float], c: list[float], n: int) -> list[float | None]:
    trs = ref_true_ranges(h, low, c)
    out: list[float | None] = [None] * len(c)
    atr = sum(trs[:n]) / n
    out[n - 1] = atr
    for i in range(n, len(c)):
        atr = (atr * (n - 1) + trs[i]) / n
        out[i] = atr
    return out


def ref_rsi(c: list[float], n: int) -> list[float | None]:
    out: list[float | None] = [None] * len(c)
    gains = [max(c[i] - c[i - 1], 0.0) for i in range(1, len(c))]  # gains[j] is the change into bar j+1
    losses = [max(c[i - 1] - c[i], 0.0) for i in range(1, len(c))]

    def rsi(g: float, lo: float) -> float:
        if lo == 0:
            return 50.0 if g == 0 else 100.0
        return 100 - 100 / (1 + g / lo)

    ag, al = sum(gains[:n]) / n, sum(losses[:n]) / n
    out[n] = rsi(ag, al)
    for j in range(n, len(gains)):
        ag = (ag * (n - 1) + gains[j]) / n
        al = (al * (n - 1) + losses[j]) / n
        out[j + 1] = rsi(ag, al)
    return out


def ref_adx(h: list[float], low: list[float], c: list[float], n: int):
    """Returns (adx, +DI, −DI) lists, Wilder's original: sums of the first n (bars 1..n) then s − s/n + x."""
    size = len(c)
    tr, pdm, mdm = [0.0] * size, [0.0] * size, [0.0] * size
    for i in range(1, size):
        up, down = h[i] - h[i - 1], low[i - 1] - low[i]
        pdm[i] = up if up > down and up > 0 else 0.0
        mdm[i] = down if down > up and down > 0 else 0.0
        tr[i] = max(h[i] - low[i], abs(h[i] - c[i - 1]), abs(low[i] - c[i - 1]))
    pdi: list[float | None] = [None] * size
    mdi: list[float | None] = [None] * size
    dx: list[float | None] = [None] * size
    s_tr, s_p, s_m = sum(tr[1:n + 1]), sum(pdm[1:n + 1]), sum(mdm[1:n + 1])
    for i in range(n, size):
        if i > n:
            s_tr = s_tr - s_tr / n + tr[i]
            s_p = s_p - s_p / n + pdm[i]
            s_m = s_m - s_m / n + mdm[i]
        p, m = (100 * s_p / s_tr, 100 * s_m / s_tr) if s_tr > 0 else (0.0, 0.0)
        pdi[i], mdi[i] = p, m
        dx[i] = 100 * abs(p - m) / (p + m) if p + m > 0 else 0.0
    adx: list[float | None] = [None] * size
    a = sum(dx[n:2 * n]) / n  # type: ignore[arg-type]
    adx[2 * n - 1] = a
    for i in range(2 * n, size):
        a = (a * (n - 1) + dx[i]) / n  # type: ignore[operator]
        adx[i] = a
    return adx, pdi, mdi


def window_stats(x: list[float], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1) of each full window, recomputed from scratch; NaN before the first."""
    w = sliding_window_view(np.asarray(x, dtype=float), n)
    pad = np.full(n - 1, np.nan)
    return np.concatenate([pad, w.mean(axis=1)]), np.concatenate([pad, w.std(axis=1, ddof=1)])


def window_corr(x: list[float], y: list[float], n: int) -> np.ndarray:
    wx = sliding_window_view(np.asarray(x, dtype=float), n)
    wy = sliding_window_view(np.asarray(y, dtype=float), n)
    dx = wx - wx.mean(axis=1, keepdims=True)
    dy = wy - wy.mean(axis=1, keepdims=True)
    r = (dx * dy).sum(axis=1) / np.sqrt((dx * dx).sum(axis=1) * (dy * dy).sum(axis=1))
    return np.concatenate([np.full(n - 1, np.nan), r])


def run(ind, rows, call: Callable) -> list:
    return [call(ind, *row) for row in rows]


# ---------------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize("n", [9, 12, 20, 26, 50])
def test_ema_matches_pandas_ewm(n):
    close = bars("BTC")["close"]
    ema = Ema(n)
    got = [ema.update(x) for x in close]
    want = pd.Series(close).ewm(span=n, adjust=False).mean()
    assert_matches(got, want, f"ema{n}", warmup=ema.warmup)


def test_macd_matches_pandas_ewm():
    close = bars("BTC")["close"]
    macd = Macd(12, 26, 9)
    got = [macd.update(x) for x in close]
    s = pd.Series(close)
    line = s.ewm(span=12, adjust=False).mean() - s.ewm(span=26, adjust=False).mean()
    signal = line.ewm(span=9, adjust=False).mean()  # seeded with the first MACD value
    assert_matches([g[0] for g in got], line, "macd", warmup=macd.warmup)
    assert_matches([g[1] for g in got], signal, "signal", warmup=macd.warmup)
    assert_matches([g[2] for g in got], line - signal, "hist", warmup=macd.warmup)


@pytest.mark.parametrize("n", [3, 14])
def test_atr_matches_reference(n):
    b = bars("BTC")
    atr = WilderAtr(n)
    got = [atr.update(h, lo, c) for h, lo, c in zip(b["high"], b["low"], b["close"], strict=True)]
    assert_matches(got, ref_atr(b["high"], b["low"], b["close"], n), f"atr{n}", warmup=atr.warmup)
    assert atr.warmup == n


@pytest.mark.parametrize("n", [2, 14])
def test_rsi_matches_reference(n):
    close = bars("BTC")["close"]
    rsi = WilderRsi(n)
    got = [rsi.update(c) for c in close]
    assert_matches(got, ref_rsi(close, n), f"rsi{n}", warmup=rsi.warmup)
    assert rsi.warmup == n + 1


@pytest.mark.parametrize("n", [5, 14])
def test_adx_matches_reference(n):
    b = bars("BTC")
    adx = WilderAdx(n)
    got, pdi, mdi = [], [], []
    for h, lo, c in zip(b["high"], b["low"], b["close"], strict=True):
        got.append(adx.update(h, lo, c))
        pdi.append(adx.plus_di)
        mdi.append(adx.minus_di)
    want, want_p, want_m = ref_adx(b["high"], b["low"], b["close"], n)
    assert_matches(got, want, f"adx{n}", warmup=adx.warmup)
    assert_matches(pdi, want_p, f"+di{n}", warmup=adx.di_warmup)
    assert_matches(mdi, want_m, f"-di{n}", warmup=adx.di_warmup)
    assert adx.warmup == 2 * n and adx.di_warmup == n + 1


def test_stochastic_matches_pandas_rolling():
    df = frame("BTC")
    b = bars("BTC")
    st = Stochastic(14, 3)
    got, ks = [], []
    for h, lo, c in zip(b["high"], b["low"], b["close"], strict=True):
        got.append(st.update(h, lo, c))
        ks.append(st.k)
    hh, ll = df["high"].rolling(14).max(), df["low"].rolling(14).min()
    k = pd.Series(np.where(hh == ll, 50.0, 100 * (df["close"] - ll) / (hh - ll)))
    k[hh.isna()] = np.nan
    d = k.rolling(3).mean()
    assert_matches([g and g[0] for g in got], k.where(d.notna()), "%K", warmup=st.warmup)
    assert_matches([g and g[1] for g in got], d, "%D", warmup=st.warmup)
    assert_matches(ks, k, "k alone", warmup=st.k_warmup)
    assert (st.warmup, st.k_warmup) == (16, 14)


def window_run(x: list[float], n: int) -> tuple[RollingWindow, list, list]:
    """A RollingWindow fed x, with its mean and std after every value."""
    rw = RollingWindow(n)
    means, stds = [], []
    for v in x:
        means.append(rw.update(v))
        stds.append(rw.std())
    return rw, means, stds


def rolling_case(x: list[float], n: int, name: str) -> None:
    rw, means, stds = window_run(x, n)
    want_mean, want_std = window_stats(x, n)
    assert_matches(means, want_mean, f"{name} mean (numpy)", warmup=rw.warmup)
    assert_matches(stds, want_std, f"{name} std (numpy)", warmup=rw.warmup)
    s = pd.Series(x)
    assert_matches(means, s.rolling(n).mean(), f"{name} mean (pandas)", rel=PANDAS_REL)
    assert_matches(stds, s.rolling(n).std(), f"{name} std (pandas)", rel=PANDAS_REL)
    for i in range(n - 1, len(x), 97):  # exact rational arithmetic on a sample of windows
        w = [Fraction(v) for v in x[i - n + 1:i + 1]]
        mean = sum(w) / n
        var = sum((v - mean) ** 2 for v in w) / (n - 1)
        assert math.isclose(means[i], float(mean), rel_tol=1e-12, abs_tol=ABS), (name, i)
        assert math.isclose(stds[i], math.sqrt(float(var)), rel_tol=1e-11, abs_tol=ABS), (name, i)


def test_rolling_window_volatility_of_returns():
    r = returns(bars("BTC")["close"])
    rolling_case(r, 10, "volatility_10")
    rolling_case(r, 30, "volatility_30")


def test_rolling_window_volume_and_close():
    b = bars("BTC")
    rolling_case(b["volume"], 12, "volume_ma_12")
    rolling_case(b["volume"], 48, "volume 48")
    rolling_case(b["close"], 20, "close 20")


def test_rolling_window_funding_24h():
    rate = funding_on_bars("BTC")
    assert len(set(rate[-288:])) == 1  # the last day has one rate: the constant-window path is exercised
    rw = RollingWindow(288)
    got = [rw.update(x) for x in rate]
    assert_matches(got, pd.Series(rate).rolling(288).mean(), "funding_ma_24h", warmup=288)
    assert rw.mean() == rate[-1] and rw.std() == 0.0 and rw.zscore() is None


def test_vol_z_matches_pandas():
    v = bars("BTC")["volume"]
    rw = RollingWindow(48)
    got = []
    for x in v:
        rw.update(x)
        got.append(rw.zscore())
    mean, sd = window_stats(v, 48)
    assert_matches(got, (np.asarray(v) - mean) / sd, "vol_z", warmup=48)
    s = pd.Series(v)
    assert_matches(got, (s - s.rolling(48).mean()) / s.rolling(48).std(), "vol_z (pandas)", rel=PANDAS_REL)


def test_bollinger_matches_pandas_ddof1():
    close = bars("BTC")["close"]
    bb = Bollinger(20, 2.0)
    got = [bb.update(c) for c in close]
    mid, sd = window_stats(close, 20)  # sample std, ddof=1
    assert_matches([g and g[0] for g in got], mid, "bb middle", warmup=bb.warmup)
    assert_matches([g and g[1] for g in got], mid + 2 * sd, "bb upper", warmup=bb.warmup)
    assert_matches([g and g[2] for g in got], mid - 2 * sd, "bb lower", warmup=bb.warmup)
    s = pd.Series(close)
    pmid, psd = s.rolling(20).mean(), s.rolling(20).std(ddof=1)
    assert_matches([g and g[1] for g in got], pmid + 2 * psd, "bb upper (pandas)", rel=PANDAS_REL)
    assert_matches([g and g[2] for g in got], pmid - 2 * psd, "bb lower (pandas)", rel=PANDAS_REL)


def test_rolling_no_drift_over_half_a_year():
    """Six months of bars (the month of BTC and ETH data played six times, 53 568 bars): still 1e-9 against
    recomputation from scratch at every bar."""
    reps = 6
    b, e = bars("BTC"), bars("ETH")
    close = b["close"] * reps
    vol = b["volume"] * reps
    rb, re = returns(b["close"]) * reps, returns(e["close"]) * reps
    for x, n, name in ((close, 20, "close 20"), (vol, 48, "volume 48"), (rb, 30, "returns 30")):
        _, means, stds = window_run(x, n)
        want_mean, want_std = window_stats(x, n)
        assert_matches(means, want_mean, f"long {name} mean")
        assert_matches(stds, want_std, f"long {name} std")
    rc = RollingCorrelation(60)
    got = [rc.update(x, y) for x, y in zip(rb, re, strict=True)]
    assert_matches(got, window_corr(rb, re, 60), "long corr")


def test_rolling_correlation_btc_eth():
    b, e = bars("BTC"), bars("ETH")
    rb, re = returns(b["close"]), returns(e["close"])
    rc = RollingCorrelation(60)
    got = [rc.update(x, y) for x, y in zip(rb, re, strict=True)]
    assert_matches(got, window_corr(rb, re, 60), "corr returns", warmup=rc.warmup)
    rc = RollingCorrelation(60)  # the price levels: large means, so cancellation would show
    got = [rc.update(x, y) for x, y in zip(b["close"], e["close"], strict=True)]
    assert_matches(got, window_corr(b["close"], e["close"], 60), "corr closes", warmup=rc.warmup)
    plain = [x for x in got if x is not None]
    assert min(plain) < -0.5 and max(plain) > 0.99  # a meaningful range was exercised


def test_anchored_vwap_matches_pandas_daily_cumsum():
    df = frame("BTC")
    b = bars("BTC")
    vw = AnchoredVwap()
    got = [vw.update(*row) for row in zip(b["t"], b["high"], b["low"], b["close"], b["volume"], strict=True)]
    day = df["date"].dt.floor("D")
    tp = (df["high"] + df["low"] + df["close"]) / 3
    want = (tp * df["volume"]).groupby(day).cumsum() / df["volume"].groupby(day).cumsum()
    assert_matches(got, want, "vwap", warmup=vw.warmup)
    firsts = np.flatnonzero((df["t"] % 86_400_000 == 0).to_numpy())
    assert len(firsts) == 31
    for i in firsts:  # reset at 00:00 UTC: the day's first VWAP is that bar's typical price
        assert math.isclose(got[i], tp[i], rel_tol=1e-15), i


def htf_reference(df: pd.DataFrame, minutes: int) -> pd.DataFrame:
    """HTF bars by pandas resample of whatever 5m bars are present (empty buckets dropped) and their features by the
    reference loops."""
    agg = (df.set_index("date")[["open", "high", "low", "close", "volume"]]
           .resample(f"{minutes}min", label="left", closed="left")
           .agg({"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"})
           .dropna(subset=["close"]))
    h, lo, c = agg["high"].tolist(), agg["low"].tolist(), agg["close"].tolist()
    agg["rsi_14"] = ref_rsi(c, 14)
    agg["atr_pct"] = [a / cl if a is not None else None for a, cl in zip(ref_atr(h, lo, c, 14), c, strict=True)]
    agg["r_1"] = agg["close"].pct_change()
    agg["start"] = (agg.index - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    return agg.reset_index(drop=True)


def check_htf(df: pd.DataFrame, minutes: int) -> HigherTimeframe:
    period = minutes * MIN_MS
    ref = htf_reference(df, minutes)
    starts = ref["start"].to_numpy()
    htf = HigherTimeframe(minutes)
    got = {"rsi_14": [], "atr_pct": [], "r_1": [], "value": []}
    want = {"rsi_14": [], "atr_pct": [], "r_1": []}
    for row in df[["t", "open", "high", "low", "close", "volume"]].itertuples(index=False):
        t = int(row.t)
        got["value"].append(htf.update(t, row.open, row.high, row.low, row.close, row.volume))
        for k in want:
            got[k].append(getattr(htf, k))
        # closed so far: every bucket before this bar's bucket, plus this one if this bar completes it
        bucket = t - t % period
        n_closed = int(np.searchsorted(starts, bucket, side="left")) + ((t + 5 * MIN_MS) % period == 0)
        for k in want:
            want[k].append(ref[k].iloc[n_closed - 1] if n_closed else None)
        assert htf.bars_closed == n_closed
    for k in want:
        assert_matches(got[k], want[k], f"{minutes}m {k}")
    all_defined = [not any(undefined(want[k][i]) for k in want) for i in range(len(df))]
    assert [v is not None for v in got["value"]] == all_defined
    for v, r, a, r1 in zip(got["value"], got["rsi_14"], got["atr_pct"], got["r_1"], strict=True):
        assert v is None or (isinstance(v, HtfFeatures) and v == (r, a, r1))
    return htf


@pytest.mark.parametrize("minutes", [15, 60])
def test_higher_timeframe_matches_resample(minutes):
    df = frame("BTC")
    htf = check_htf(df, minutes)
    assert htf.bars_closed == len(df) * 5 // minutes
    # an aligned, complete start: the first features come exactly at the warm-up
    first = HigherTimeframe(minutes)
    b = bars("BTC")
    out = [first.update(*row) for row in zip(b["t"], b["open"], b["high"], b["low"], b["close"], b["volume"],
                                             strict=True)]
    assert next(i for i, v in enumerate(out) if v is not None) == first.warmup - 1 == 15 * minutes // 5 - 1


def test_higher_timeframe_missing_bars():
    """Bars missing: HTF bars are built from the bars that arrived; a bucket without its last bar closes when the
    next bucket's first bar arrives; a bucket with no bars gives no HTF bar."""
    df = frame("BTC")
    t0 = int(df["t"].iloc[0])
    at = {int(t): i for i, t in enumerate(df["t"])}
    q = 15 * MIN_MS
    drop = {at[t0 + 40 * q + 10 * MIN_MS],  # last bar of bucket 40
            at[t0 + 50 * q],  # first bar of bucket 50
            at[t0 + 60 * q], at[t0 + 60 * q + 5 * MIN_MS], at[t0 + 60 * q + 10 * MIN_MS],  # all of bucket 60
            at[t0 + 70 * q + 5 * MIN_MS]}  # middle bar of bucket 70
    rng = np.random.default_rng(7)
    drop |= set(rng.choice(len(df), size=300, replace=False).tolist())
    kept = df.drop(index=sorted(drop)).reset_index(drop=True)
    htf = check_htf(kept, 15)
    check_htf(kept, 60)

    # bucket 40 closes one bar late, on the first bar of bucket 41, with two parts
    h = HigherTimeframe(15)
    b = bars("BTC")
    for i in range(0, at[t0 + 41 * q]):
        if i != at[t0 + 40 * q + 10 * MIN_MS]:
            h.update(b["t"][i], b["open"][i], b["high"][i], b["low"][i], b["close"][i], b["volume"][i])
    assert h.last_bar[0] == t0 + 39 * q
    i = at[t0 + 41 * q]
    h.update(b["t"][i], b["open"][i], b["high"][i], b["low"][i], b["close"][i], b["volume"][i])
    assert h.closed and h.last_bar[0] == t0 + 40 * q and h.last_bar[6] == 2
    j = at[t0 + 40 * q]
    assert h.last_bar[1:6] == [b["open"][j], max(b["high"][j:j + 2]), min(b["low"][j:j + 2]), b["close"][j + 1],
                               b["volume"][j] + b["volume"][j + 1]]
    assert htf.bars_closed == len(htf_reference(kept, 15))


def test_higher_timeframe_ignores_a_repeated_or_older_bar():
    b = bars("BTC")
    a, r = HigherTimeframe(15), HigherTimeframe(15)
    rows = list(zip(b["t"], b["open"], b["high"], b["low"], b["close"], b["volume"], strict=True))[:400]
    out_a = [a.update(*row) for row in rows]
    out_r = []
    for i, row in enumerate(rows):
        out_r.append(r.update(*row))
        if i % 7 == 3:
            r.update(*rows[i])  # duplicate
            r.update(*rows[i - 2])  # older
    assert out_a == out_r and a.to_state() == r.to_state()


# ---------------------------------------------------------------------------------------------------- state


def _bar_rows(n: int) -> list[tuple]:
    b, e = bars("BTC"), bars("ETH")
    rate = funding_on_bars("BTC")
    return list(zip(b["t"][:n], b["open"][:n], b["high"][:n], b["low"][:n], b["close"][:n], b["volume"][:n],
                    e["close"][:n], rate[:n], strict=True))


def _rw_out(w: RollingWindow, x: float):
    return w.update(x), w.std(), w.zscore()


CASES: dict[str, tuple[Callable[[], object], Callable]] = {
    "ema": (lambda: Ema(12), lambda o, r: o.update(r[4])),
    "atr": (lambda: WilderAtr(14), lambda o, r: (o.update(r[2], r[3], r[4]), o.tr)),
    "rsi": (lambda: WilderRsi(14), lambda o, r: (o.update(r[4]), o.avg_gain, o.avg_loss)),
    "macd": (lambda: Macd(12, 26, 9), lambda o, r: o.update(r[4])),
    "adx": (lambda: WilderAdx(14), lambda o, r: (o.update(r[2], r[3], r[4]), o.plus_di, o.minus_di, o.dx)),
    "stoch": (lambda: Stochastic(14, 3), lambda o, r: (o.update(r[2], r[3], r[4]), o.k)),
    "volume48": (lambda: RollingWindow(48), lambda o, r: _rw_out(o, r[5])),
    "close20": (lambda: RollingWindow(20), lambda o, r: _rw_out(o, r[4])),
    "funding288": (lambda: RollingWindow(288), lambda o, r: _rw_out(o, r[7])),
    "bollinger": (lambda: Bollinger(20, 2.0), lambda o, r: o.update(r[4])),
    "corr": (lambda: RollingCorrelation(60), lambda o, r: o.update(r[4], r[6])),
    "vwap": (lambda: AnchoredVwap(), lambda o, r: o.update(r[0], r[2], r[3], r[4], r[5])),
    "htf15": (lambda: HigherTimeframe(15), lambda o, r: (o.update(*r[:6]), o.rsi_14, o.atr_pct, o.r_1, o.closed)),
    "htf60": (lambda: HigherTimeframe(60), lambda o, r: (o.update(*r[:6]), o.rsi_14, o.atr_pct, o.r_1, o.closed)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_state_round_trip_continues_exactly(name):
    """Recovery: at several points (inside and after the warm-up, at every phase of the exact recomputation) the
    state goes through JSON, a new object is built from it and continues: identical values, bit for bit, to the
    uninterrupted run."""
    make, step = CASES[name]
    rows = _bar_rows(1500)
    whole = make()
    expected = [step(whole, r) for r in rows]
    for split in (1, 2, 13, 15, 27, 28, 47, 60, 61, 100, 287, 288, 301, 777, 1499):
        obj = make()
        got = [step(obj, r) for r in rows[:split]]
        text = json.dumps(obj.to_state(), allow_nan=False)  # plain data
        state = json.loads(text)
        restored = type(obj).from_state(state)
        assert json.loads(json.dumps(restored.to_state())) == state, f"{name}: state changed by the round trip"
        got += [step(restored, r) for r in rows[split:]]
        assert got == expected, f"{name}: diverged after a restore at bar {split}"
    assert json.loads(json.dumps(whole.to_state())) == json.loads(json.dumps(type(whole).from_state(
        whole.to_state()).to_state()))


def test_restored_objects_report_the_current_value():
    rows = _bar_rows(400)
    for name, (make, step) in CASES.items():
        obj = make()
        for r in rows:
            step(obj, r)
        restored = type(obj).from_state(json.loads(json.dumps(obj.to_state())))
        for attr in ("value", "macd", "signal", "hist", "k", "d", "plus_di", "rsi_14", "atr_pct", "r_1"):
            if hasattr(obj, attr):
                assert getattr(restored, attr) == getattr(obj, attr), (name, attr)
        if isinstance(obj, RollingWindow):
            assert (restored.mean(), restored.std()) == (obj.mean(), obj.std())


# ---------------------------------------------------------------------------------------------------- by hand

# Six bars (high, low, close), used for ATR(3), RSI(3) and ADX(2):
HAND = [(10.0, 8.0, 9.0), (12.0, 9.0, 11.0), (11.0, 7.0, 8.0), (13.0, 8.0, 12.0), (14.0, 11.0, 13.0),
        (13.0, 10.0, 10.0)]


def test_atr_by_hand():
    # TR: bar0 10−8 = 2; bar1 max(3, |12−9|, |9−9|) = 3; bar2 max(4, |11−11|, |7−11|) = 4;
    #     bar3 max(5, |13−8|, |8−8|) = 5; bar4 max(3, |14−12|, |11−12|) = 3; bar5 max(3, |13−13|, |10−13|) = 3
    # ATR(3): bar2 (2+3+4)/3 = 3; bar3 (3·2+5)/3 = 11/3; bar4 (11/3·2+3)/3 = 31/9; bar5 (31/9·2+3)/3 = 89/27
    atr = WilderAtr(3)
    got = [atr.update(*bar) for bar in HAND]
    assert got[:2] == [None, None]
    assert got[2:] == pytest.approx([3.0, 11 / 3, 31 / 9, 89 / 27], rel=1e-15)


def test_rsi_by_hand():
    # closes 9, 11, 8, 12, 13, 10 → changes +2, −3, +4, +1, −3
    # bar3: avg gain (2+0+4)/3 = 2, avg loss (0+3+0)/3 = 1 → RS 2 → 100 − 100/3 = 200/3
    # bar4 (+1): gain (2·2+1)/3 = 5/3, loss (1·2+0)/3 = 2/3 → RS 2.5 → 100 − 100/3.5 = 500/7
    # bar5 (−3): gain (5/3·2+0)/3 = 10/9, loss (2/3·2+3)/3 = 13/9 → RS 10/13 → 100 − 100·13/23 = 1000/23
    rsi = WilderRsi(3)
    got = [rsi.update(c) for _, _, c in HAND]
    assert got[:3] == [None, None, None]
    assert got[3:] == pytest.approx([200 / 3, 500 / 7, 1000 / 23], rel=1e-15)


def test_rsi_degenerate():
    flat = WilderRsi(3)
    assert [flat.update(5.0) for _ in range(6)][3:] == [50.0, 50.0, 50.0]  # no gains, no losses
    up = WilderRsi(3)
    assert [up.update(float(c)) for c in range(6)][3:] == [100.0, 100.0, 100.0]  # no losses


def test_adx_by_hand():
    # bar1: up 12−10 = 2, down 8−9 = −1 → +DM 2, −DM 0, TR 3
    # bar2: up 11−12 = −1, down 9−7 = 2 → +DM 0, −DM 2, TR 4
    # bar3: up 13−11 = 2, down 7−8 = −1 → +DM 2, −DM 0, TR 5
    # bar4: up 14−13 = 1, down 8−11 = −3 → +DM 1, −DM 0, TR 3
    # bar5: up 13−14 = −1, down 11−10 = 1 → +DM 0, −DM 1, TR 3
    # n=2: bar2 sTR 3+4 = 7, s+ 2+0 = 2, s− 0+2 = 2 → +DI = −DI = 200/7, DX 0
    #      bar3 sTR 7−3.5+5 = 8.5, s+ 2−1+2 = 3, s− 2−1+0 = 1 → +DI 300/8.5, −DI 100/8.5, DX 100·2/4 = 50
    #           ADX = (0+50)/2 = 25 (first, at bar 2n−1 = 3)
    #      bar4 sTR 8.5−4.25+3 = 7.25, s+ 3−1.5+1 = 2.5, s− 1−0.5+0 = 0.5 → DX 100·2/3; ADX (25+200/3)/2 = 275/6
    #      bar5 sTR 7.25−3.625+3 = 6.625, s+ 2.5−1.25+0 = 1.25, s− 0.5−0.25+1 = 1.25 → DX 0; ADX 275/12
    adx = WilderAdx(2)
    got, pdi, mdi = [], [], []
    for bar in HAND:
        got.append(adx.update(*bar))
        pdi.append(adx.plus_di)
        mdi.append(adx.minus_di)
    assert got[:3] == [None, None, None]
    assert got[3:] == pytest.approx([25.0, 275 / 6, 275 / 12], rel=1e-15)
    assert pdi[:2] == [None, None] and mdi[:2] == [None, None]
    assert pdi[2:] == pytest.approx([200 / 7, 300 / 8.5, 250 / 7.25, 125 / 6.625], rel=1e-15)
    assert mdi[2:] == pytest.approx([200 / 7, 100 / 8.5, 50 / 7.25, 125 / 6.625], rel=1e-15)
    assert adx.dx == 0.0


def test_flat_bars():
    """No range anywhere: %K is 50, the ADX's DI and DX are 0, a constant window has std 0 and no z-score."""
    st, adx, rw = Stochastic(3, 2), WilderAdx(2), RollingWindow(4)
    for _ in range(6):
        k_d = st.update(7.0, 7.0, 7.0)
        a = adx.update(7.0, 7.0, 7.0)
        rw.update(0.1)
    assert k_d == (50.0, 50.0) and a == 0.0 and adx.plus_di == adx.minus_di == 0.0
    assert rw.mean() == 0.1 and rw.std() == 0.0 and rw.zscore() is None


def test_bad_parameters():
    for bad in (lambda: Ema(0), lambda: WilderAtr(0), lambda: RollingWindow(-1), lambda: RollingCorrelation(1),
                lambda: HigherTimeframe(7), lambda: HigherTimeframe(14 * 60)):
        with pytest.raises(ValueError):
            bad()
