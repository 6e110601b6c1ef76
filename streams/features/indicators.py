"""Incremental indicators over closed bars: O(1) per update, with their state as plain data.

Contract shared by every class:

- `update(...)` takes one closed bar (or one value) and returns the indicator's value, or None while it is
  not yet defined. Bars must be fed once each, in open-time order (the caller deduplicates); values are finite
  Python floats (pass `.tolist()` values from numpy/pandas in the batch path: numpy scalars are slower).
- `warmup` is the number of updates until the first defined value: the first value comes from update number
  `warmup`, i.e. at 0-based bar index `warmup - 1`.
- `to_state()` returns plain data (dicts, lists, floats, ints and None: JSON round-trips it exactly) and
  `cls.from_state(state)` rebuilds an object that continues bit for bit like the original. The streaming agent
  saves the state to its changelog after each bar; the offline batch path runs the same classes over history,
  so both produce identical values.

The per-bar path uses plain floats and the math module only (no numpy/pandas). Rolling mean/std/correlation
keep Welford-style running moments updated in O(1) and recompute them exactly (math.fsum, two-pass) from the
window contents every n updates, so rounding cannot accumulate over a long stream (amortised O(1)).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, NamedTuple

DAY_MS = 86_400_000
MINUTE_MS = 60_000


def _check_n(n: int, minimum: int = 1) -> int:
    if not isinstance(n, int) or n < minimum:
        raise ValueError(f"window length must be an integer >= {minimum}, got {n!r}")
    return n


def true_range(high: float, low: float, prev_close: float | None) -> float:
    """TR = max(high − low, |high − prev_close|, |low − prev_close|); high − low when there is no previous close."""
    if prev_close is None:
        return high - low
    return max(high - low, abs(high - prev_close), abs(low - prev_close))


class Ema:
    """EMA with α = 2/(n+1) seeded with the first value (pandas `ewm(span=n, adjust=False).mean()`); warmup 1."""

    __slots__ = ("n", "alpha", "warmup", "value", "_keep")

    def __init__(self, n: int) -> None:
        self.n = _check_n(n)
        self.alpha = 2.0 / (n + 1)
        self._keep = 1.0 - self.alpha
        self.warmup = 1
        self.value: float | None = None

    def update(self, x: float) -> float:
        v = self.value
        if v is None:
            self.value = x
        elif v != x:  # as pandas: an unchanged input leaves the average exactly as it is
            self.value = self._keep * v + self.alpha * x
        return self.value  # type: ignore[return-value]

    def to_state(self) -> dict[str, Any]:
        return {"n": self.n, "value": self.value}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Ema:
        obj = cls(state["n"])
        obj.value = state["value"]
        return obj


class WilderMean:
    """Wilder's smoothing, shared by ATR, RSI and ADX: the mean of the first n values, then (prev·(n−1) + x)/n;
    warmup n."""

    __slots__ = ("n", "warmup", "value", "_count", "_sum")

    def __init__(self, n: int) -> None:
        self.n = _check_n(n)
        self.warmup = n
        self.value: float | None = None
        self._count = 0
        self._sum = 0.0

    def update(self, x: float) -> float | None:
        n = self.n
        if self.value is not None:
            self.value = (self.value * (n - 1) + x) / n
        else:
            self._count += 1
            self._sum += x
            if self._count == n:
                self.value = self._sum / n
        return self.value

    def to_state(self) -> dict[str, Any]:
        return {"n": self.n, "value": self.value, "count": self._count, "sum": self._sum}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> WilderMean:
        obj = cls(state["n"])
        obj.value, obj._count, obj._sum = state["value"], state["count"], state["sum"]
        return obj


class WilderAtr:
    """ATR: first = mean of the first n true ranges (bar 0: high − low), then (prev·(n−1) + tr)/n; warmup n."""

    __slots__ = ("n", "warmup", "tr", "_prev_close", "_mean")

    def __init__(self, n: int = 14) -> None:
        self.n = _check_n(n)
        self.warmup = n
        self.tr: float | None = None  # the last bar's true range
        self._prev_close: float | None = None
        self._mean = WilderMean(n)

    @property
    def value(self) -> float | None:
        return self._mean.value

    def update(self, high: float, low: float, close: float) -> float | None:
        self.tr = true_range(high, low, self._prev_close)
        self._prev_close = close
        return self._mean.update(self.tr)

    def to_state(self) -> dict[str, Any]:
        return {"n": self.n, "tr": self.tr, "prev_close": self._prev_close, "mean": self._mean.to_state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> WilderAtr:
        obj = cls(state["n"])
        obj.tr, obj._prev_close = state["tr"], state["prev_close"]
        obj._mean = WilderMean.from_state(state["mean"])
        return obj


def _rsi(avg_gain: float, avg_loss: float) -> float:
    if avg_loss == 0.0:
        return 50.0 if avg_gain == 0.0 else 100.0
    return 100.0 - 100.0 / (1.0 + avg_gain / avg_loss)


class WilderRsi:
    """RSI: gain/loss averages seeded with the mean of the first n close changes, then (prev·(n−1) + x)/n;
    100 − 100/(1 + gain/loss), 100 when loss = 0, 50 when both are 0; warmup n+1 (n changes need n+1 closes)."""

    __slots__ = ("n", "warmup", "value", "_prev", "_gain", "_loss")

    def __init__(self, n: int = 14) -> None:
        self.n = _check_n(n)
        self.warmup = n + 1
        self.value: float | None = None
        self._prev: float | None = None
        self._gain = WilderMean(n)
        self._loss = WilderMean(n)

    @property
    def avg_gain(self) -> float | None:
        return self._gain.value

    @property
    def avg_loss(self) -> float | None:
        return self._loss.value

    def update(self, close: float) -> float | None:
        prev = self._prev
        self._prev = close
        if prev is None:
            return None
        change = close - prev
        gain = self._gain.update(change if change > 0.0 else 0.0)
        loss = self._loss.update(-change if change < 0.0 else 0.0)
        if gain is None or loss is None:
            return None
        self.value = _rsi(gain, loss)
        return self.value

    def to_state(self) -> dict[str, Any]:
        return {"n": self.n, "value": self.value, "prev": self._prev, "gain": self._gain.to_state(),
                "loss": self._loss.to_state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> WilderRsi:
        obj = cls(state["n"])
        obj.value, obj._prev = state["value"], state["prev"]
        obj._gain, obj._loss = WilderMean.from_state(state["gain"]), WilderMean.from_state(state["loss"])
        return obj


class Macd:
    """MACD = EMA_fast − EMA_slow, signal = EMA_signal of MACD seeded with the first MACD, hist = MACD − signal;
    update returns (macd, signal, hist); warmup 1."""

    __slots__ = ("warmup", "macd", "signal", "hist", "_fast", "_slow", "_sig")

    def __init__(self, fast: int = 12, slow: int = 26, signal: int = 9) -> None:
        self._fast, self._slow, self._sig = Ema(fast), Ema(slow), Ema(signal)
        self.warmup = 1
        self.macd: float | None = None
        self.signal: float | None = None
        self.hist: float | None = None

    def update(self, close: float) -> tuple[float, float, float]:
        m = self._fast.update(close) - self._slow.update(close)
        s = self._sig.update(m)
        self.macd, self.signal, self.hist = m, s, m - s
        return m, s, m - s

    def to_state(self) -> dict[str, Any]:
        return {"fast": self._fast.to_state(), "slow": self._slow.to_state(), "signal": self._sig.to_state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Macd:
        obj = cls(state["fast"]["n"], state["slow"]["n"], state["signal"]["n"])
        obj._fast = Ema.from_state(state["fast"])
        obj._slow = Ema.from_state(state["slow"])
        obj._sig = Ema.from_state(state["signal"])
        if obj._sig.value is not None:
            obj.macd = obj._fast.value - obj._slow.value  # type: ignore[operator]
            obj.signal = obj._sig.value
            obj.hist = obj.macd - obj.signal
        return obj


class WilderAdx:
    """ADX (Wilder): TR, +DM, −DM from bar 1 on (each needs the previous bar); their first smoothed value is the sum
    of the first n (bars 1..n), then s − s/n + x; ±DI = 100·s±DM/sTR (0 when sTR = 0); DX = 100·|+DI − −DI|/(+DI +
    −DI) (0 when the sum is 0), first at bar n; ADX first = mean of the first n DX (bars n..2n−1), then
    (prev·(n−1) + dx)/n. Warmup 2n (ADX first at 0-based bar 2n−1, i.e. bar 27 for n=14); ±DI and DX have
    warmup n+1 (`di_warmup`)."""

    __slots__ = ("n", "warmup", "di_warmup", "plus_di", "minus_di", "dx", "_prev_high", "_prev_low",
                 "_prev_close", "_count", "_s_tr", "_s_pdm", "_s_mdm", "_adx")

    def __init__(self, n: int = 14) -> None:
        self.n = _check_n(n)
        self.warmup = 2 * n
        self.di_warmup = n + 1
        self.plus_di: float | None = None
        self.minus_di: float | None = None
        self.dx: float | None = None
        self._prev_high: float | None = None
        self._prev_low: float | None = None
        self._prev_close: float | None = None
        self._count = 0
        self._s_tr = 0.0
        self._s_pdm = 0.0
        self._s_mdm = 0.0
        self._adx = WilderMean(n)

    @property
    def value(self) -> float | None:
        return self._adx.value

    def update(self, high: float, low: float, close: float) -> float | None:
        ph, pl, pc = self._prev_high, self._prev_low, self._prev_close
        self._prev_high, self._prev_low, self._prev_close = high, low, close
        if ph is None:
            return None
        up = high - ph
        down = pl - low  # type: ignore[operator]
        pdm = up if (up > down and up > 0.0) else 0.0
        mdm = down if (down > up and down > 0.0) else 0.0
        tr = true_range(high, low, pc)
        n = self.n
        if self._count >= n:
            s_tr = self._s_tr
            self._s_tr = s_tr - s_tr / n + tr
            self._s_pdm = self._s_pdm - self._s_pdm / n + pdm
            self._s_mdm = self._s_mdm - self._s_mdm / n + mdm
        else:
            self._count += 1
            self._s_tr += tr
            self._s_pdm += pdm
            self._s_mdm += mdm
            if self._count < n:
                return None
        s_tr = self._s_tr
        if s_tr > 0.0:
            pdi = 100.0 * self._s_pdm / s_tr
            mdi = 100.0 * self._s_mdm / s_tr
        else:
            pdi = mdi = 0.0
        total = pdi + mdi
        dx = 100.0 * abs(pdi - mdi) / total if total > 0.0 else 0.0
        self.plus_di, self.minus_di, self.dx = pdi, mdi, dx
        return self._adx.update(dx)

    def to_state(self) -> dict[str, Any]:
        return {"n": self.n, "plus_di": self.plus_di, "minus_di": self.minus_di, "dx": self.dx,
                "prev_high": self._prev_high, "prev_low": self._prev_low, "prev_close": self._prev_close,
                "count": self._count, "s_tr": self._s_tr, "s_pdm": self._s_pdm, "s_mdm": self._s_mdm,
                "adx": self._adx.to_state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> WilderAdx:
        obj = cls(state["n"])
        obj.plus_di, obj.minus_di, obj.dx = state["plus_di"], state["minus_di"], state["dx"]
        obj._prev_high, obj._prev_low, obj._prev_close = state["prev_high"], state["prev_low"], state["prev_close"]
        obj._count, obj._s_tr, obj._s_pdm, obj._s_mdm = state["count"], state["s_tr"], state["s_pdm"], state["s_mdm"]
        obj._adx = WilderMean.from_state(state["adx"])
        return obj


class Stochastic:
    """%K = 100·(close − lowest low n)/(highest high n − lowest low n), 50 when that range is 0; %D = SMA d of %K.
    Rolling max/min by monotonic deques (amortised O(1)). update returns (k, d); warmup n+d−1 (16 for 14/3);
    `k` alone is defined from bar n−1 (`k_warmup` = n)."""

    __slots__ = ("n", "d_n", "warmup", "k_warmup", "k", "d", "_i", "_max", "_min", "_ks")

    def __init__(self, n: int = 14, d: int = 3) -> None:
        self.n = _check_n(n)
        self.d_n = _check_n(d)
        self.warmup = n + d - 1
        self.k_warmup = n
        self.k: float | None = None
        self.d: float | None = None
        self._i = 0  # index of the next bar
        self._max: deque[tuple[int, float]] = deque()  # (index, high), highs strictly decreasing
        self._min: deque[tuple[int, float]] = deque()  # (index, low), lows strictly increasing
        self._ks: deque[float] = deque(maxlen=d)

    def update(self, high: float, low: float, close: float) -> tuple[float, float] | None:
        i = self._i
        self._i = i + 1
        mx, mn = self._max, self._min
        while mx and mx[-1][1] <= high:
            mx.pop()
        mx.append((i, high))
        if mx[0][0] <= i - self.n:  # indices advance by one, so at most one entry expires per bar
            mx.popleft()
        while mn and mn[-1][1] >= low:
            mn.pop()
        mn.append((i, low))
        if mn[0][0] <= i - self.n:
            mn.popleft()
        if i + 1 < self.n:
            return None
        hh, ll = mx[0][1], mn[0][1]
        rng = hh - ll
        k = 50.0 if rng == 0.0 else 100.0 * (close - ll) / rng
        self.k = k
        ks = self._ks
        ks.append(k)
        if len(ks) < self.d_n:
            return None
        self.d = sum(ks) / self.d_n
        return k, self.d

    def to_state(self) -> dict[str, Any]:
        return {"n": self.n, "d_n": self.d_n, "k": self.k, "d": self.d, "i": self._i,
                "max": [list(p) for p in self._max], "min": [list(p) for p in self._min], "ks": list(self._ks)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Stochastic:
        obj = cls(state["n"], state["d_n"])
        obj.k, obj.d, obj._i = state["k"], state["d"], state["i"]
        obj._max.extend((int(i), v) for i, v in state["max"])
        obj._min.extend((int(i), v) for i, v in state["min"])
        obj._ks.extend(state["ks"])
        return obj


class RollingWindow:
    """The last n values with O(1) running `mean()` and sample `std()` (ddof=1, as pandas `rolling(n).std()`);
    both None until n values arrived (warmup n). Welford add/replace updates, recomputed exactly from the window
    every n updates; a window of n identical values gives exactly that mean and std 0 (as pandas)."""

    __slots__ = ("n", "warmup", "_buf", "_mean", "_m2", "_since", "_run", "_last")

    def __init__(self, n: int) -> None:
        self.n = _check_n(n)
        self.warmup = n
        self._buf: deque[float] = deque(maxlen=n)
        self._mean = 0.0
        self._m2 = 0.0
        self._since = 0  # replacements since the last exact recomputation
        self._run = 0  # how many of the latest values are equal to the last one
        self._last: float | None = None

    def _recompute(self) -> None:
        buf = self._buf
        n = len(buf)
        mean = math.fsum(buf) / n
        dev = math.fsum(x - mean for x in buf)
        m2 = math.fsum((x - mean) * (x - mean) for x in buf) - dev * dev / n  # corrected two-pass
        self._mean = mean + dev / n
        self._m2 = m2 if m2 > 0.0 else 0.0
        self._since = 0

    def update(self, x: float) -> float | None:
        """Push one value; returns the mean of the window (None while not full)."""
        buf = self._buf
        n = self.n
        if x == self._last:
            self._run += 1
        else:
            self._run = 1
            self._last = x
        if len(buf) == n:
            old = buf[0]
            buf.append(x)  # drops `old`
            self._since += 1
            if self._since >= n:
                self._recompute()
            else:
                mean = self._mean
                delta = x - old
                new_mean = mean + delta / n
                self._m2 += delta * (x - new_mean + old - mean)
                self._mean = new_mean
        else:
            buf.append(x)
            k = len(buf)
            if k == n:
                self._recompute()
            else:
                d = x - self._mean
                self._mean += d / k
                self._m2 += d * (x - self._mean)
        return self.mean()

    @property
    def full(self) -> bool:
        return len(self._buf) == self.n

    @property
    def last(self) -> float | None:
        return self._last

    def mean(self) -> float | None:
        if len(self._buf) < self.n:
            return None
        if self._run >= self.n:
            return self._last
        return self._mean

    def var(self) -> float | None:
        """Sample variance (ddof=1); None until full or when n = 1."""
        n = self.n
        if len(self._buf) < n or n < 2:
            return None
        if self._run >= n:
            return 0.0
        m2 = self._m2
        return m2 / (n - 1) if m2 > 0.0 else 0.0

    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None until full or when n = 1."""
        v = self.var()
        return None if v is None else math.sqrt(v)

    def zscore(self, x: float | None = None) -> float | None:
        """(x − mean)/std over the window (x defaults to the last value pushed); None until full or when std = 0."""
        s = self.std()
        if not s:
            return None
        return ((self._last if x is None else x) - self.mean()) / s  # type: ignore[operator]

    def to_state(self) -> dict[str, Any]:
        return {"n": self.n, "buf": list(self._buf), "mean": self._mean, "m2": self._m2, "since": self._since,
                "run": self._run, "last": self._last}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RollingWindow:
        obj = cls(state["n"])
        obj._buf.extend(state["buf"])
        obj._mean, obj._m2, obj._since = state["mean"], state["m2"], state["since"]
        obj._run, obj._last = state["run"], state["last"]
        return obj


class Bollinger:
    """Bollinger bands: middle = SMA n of close, upper/lower = middle ± k·std with the sample std (ddof=1, as pandas
    `rolling(n).std()`) of the same n closes; update returns (middle, upper, lower); warmup n."""

    __slots__ = ("k", "warmup", "window", "value")

    def __init__(self, n: int = 20, k: float = 2.0) -> None:
        self.window = RollingWindow(_check_n(n, 2))
        self.k = k
        self.warmup = n
        self.value: tuple[float, float, float] | None = None

    def update(self, close: float) -> tuple[float, float, float] | None:
        mid = self.window.update(close)
        if mid is None:
            return None
        width = self.k * self.window.std()  # type: ignore[operator]
        self.value = (mid, mid + width, mid - width)
        return self.value

    def to_state(self) -> dict[str, Any]:
        return {"k": self.k, "window": self.window.to_state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Bollinger:
        window = RollingWindow.from_state(state["window"])
        obj = cls(window.n, state["k"])
        obj.window = window
        if window.full:
            mid = window.mean()
            width = obj.k * window.std()  # type: ignore[operator]
            obj.value = (mid, mid + width, mid - width)  # type: ignore[operator]
        return obj


class RollingCorrelation:
    """Pearson correlation of two series over the last n pairs, O(1) per update (Welford co-moments, recomputed
    exactly every n updates); None until n pairs arrived or while either series is constant over the window;
    warmup n."""

    __slots__ = ("n", "warmup", "value", "_xs", "_ys", "_mx", "_my", "_m2x", "_m2y", "_cxy", "_since",
                 "_run_x", "_run_y", "_last_x", "_last_y")

    def __init__(self, n: int = 60) -> None:
        self.n = _check_n(n, 2)
        self.warmup = n
        self.value: float | None = None
        self._xs: deque[float] = deque(maxlen=n)
        self._ys: deque[float] = deque(maxlen=n)
        self._mx = self._my = self._m2x = self._m2y = self._cxy = 0.0
        self._since = 0
        self._run_x = self._run_y = 0
        self._last_x: float | None = None
        self._last_y: float | None = None

    def _recompute(self) -> None:
        xs, ys = self._xs, self._ys
        n = len(xs)
        mx = math.fsum(xs) / n
        my = math.fsum(ys) / n
        mx += math.fsum(x - mx for x in xs) / n
        my += math.fsum(y - my for y in ys) / n
        self._mx, self._my = mx, my
        self._m2x = math.fsum((x - mx) * (x - mx) for x in xs)
        self._m2y = math.fsum((y - my) * (y - my) for y in ys)
        self._cxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
        self._since = 0

    def update(self, x: float, y: float) -> float | None:
        n = self.n
        if x == self._last_x:
            self._run_x += 1
        else:
            self._run_x, self._last_x = 1, x
        if y == self._last_y:
            self._run_y += 1
        else:
            self._run_y, self._last_y = 1, y
        xs, ys = self._xs, self._ys
        if len(xs) == n:
            xo, yo = xs[0], ys[0]
            xs.append(x)
            ys.append(y)
            self._since += 1
            if self._since >= n:
                self._recompute()
            else:
                mx, my = self._mx, self._my
                dx, dy = x - xo, y - yo
                nmx, nmy = mx + dx / n, my + dy / n
                self._m2x += dx * (x - nmx + xo - mx)
                self._m2y += dy * (y - nmy + yo - my)
                self._cxy += dy * (x - nmx) + dx * (yo - my)
                self._mx, self._my = nmx, nmy
        else:
            xs.append(x)
            ys.append(y)
            k = len(xs)
            if k == n:
                self._recompute()
            else:
                dx = x - self._mx
                self._mx += dx / k
                dy = y - self._my
                self._my += dy / k
                self._m2x += dx * (x - self._mx)
                self._m2y += dy * (y - self._my)
                self._cxy += dx * (y - self._my)
        self.value = self._corr()
        return self.value

    def _corr(self) -> float | None:
        n = self.n
        if len(self._xs) < n or self._run_x >= n or self._run_y >= n or self._m2x <= 0.0 or self._m2y <= 0.0:
            return None
        r = self._cxy / math.sqrt(self._m2x * self._m2y)
        return 1.0 if r > 1.0 else -1.0 if r < -1.0 else r

    def to_state(self) -> dict[str, Any]:
        return {"n": self.n, "xs": list(self._xs), "ys": list(self._ys), "mx": self._mx, "my": self._my,
                "m2x": self._m2x, "m2y": self._m2y, "cxy": self._cxy, "since": self._since,
                "run_x": self._run_x, "run_y": self._run_y, "last_x": self._last_x, "last_y": self._last_y}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RollingCorrelation:
        obj = cls(state["n"])
        obj._xs.extend(state["xs"])
        obj._ys.extend(state["ys"])
        obj._mx, obj._my, obj._m2x, obj._m2y = state["mx"], state["my"], state["m2x"], state["m2y"]
        obj._cxy, obj._since = state["cxy"], state["since"]
        obj._run_x, obj._run_y, obj._last_x, obj._last_y = state["run_x"], state["run_y"], state["last_x"], \
            state["last_y"]
        obj.value = obj._corr()
        return obj


class AnchoredVwap:
    """VWAP anchored at 00:00 UTC of the bar's day (from open_time ms): Σ typical·volume / Σ volume with typical =
    (high+low+close)/3, reset when the UTC day changes; None while the day's volume is 0; warmup 1."""

    __slots__ = ("warmup", "value", "_day", "_pv", "_v")

    def __init__(self) -> None:
        self.warmup = 1
        self.value: float | None = None
        self._day: int | None = None
        self._pv = 0.0
        self._v = 0.0

    def update(self, open_time_ms: int, high: float, low: float, close: float, volume: float) -> float | None:
        day = open_time_ms // DAY_MS
        if day != self._day:
            self._day = day
            self._pv = 0.0
            self._v = 0.0
        self._pv += (high + low + close) / 3.0 * volume
        self._v += volume
        self.value = self._pv / self._v if self._v > 0.0 else None
        return self.value

    def to_state(self) -> dict[str, Any]:
        return {"day": self._day, "pv": self._pv, "v": self._v}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> AnchoredVwap:
        obj = cls()
        obj._day, obj._pv, obj._v = state["day"], state["pv"], state["v"]
        if obj._day is not None and obj._v > 0.0:
            obj.value = obj._pv / obj._v
        return obj


class HtfFeatures(NamedTuple):
    """Features of the last closed higher-timeframe bar."""

    rsi_14: float
    atr_pct: float  # ATR(14) / close, a fraction (0.004 = 0.4 %)
    r_1: float  # close / previous close − 1 (simple return over one higher-timeframe bar)


class HigherTimeframe:
    """Aggregates closed base (5m) bars into closed `minutes` bars aligned to UTC multiples of `minutes`, and gives
    rsi_14 (WilderRsi 14), atr_pct (WilderAtr 14 / close) and r_1 (close/prev close − 1) of the last closed one.

    An HTF bar closes when the base bar completing it arrives (open_time + base is a multiple of the period). If base
    bars of a bucket are missing, the HTF bar is built from those that arrived: a missing last bar means the bucket
    is closed when the first bar of a later bucket arrives (one bar late); a bucket with no bars yields no HTF bar.
    A bar not newer than the previous one is ignored. update returns HtfFeatures once all three are defined
    (15 HTF bars: warmup = 15·minutes/base base bars from an aligned start), else None; each field is also
    available alone (`rsi_14`, `atr_pct`, `r_1`), and `closed` says whether this update closed an HTF bar."""

    __slots__ = ("minutes", "base_minutes", "warmup", "value", "rsi_14", "atr_pct", "r_1", "closed", "last_bar",
                 "bars_closed", "_period", "_base", "_bucket", "_o", "_h", "_l", "_c", "_v", "_parts", "_last_open",
                 "_rsi", "_atr", "_prev_close")

    def __init__(self, minutes: int, base_minutes: int = 5) -> None:
        _check_n(minutes)
        _check_n(base_minutes)
        if minutes % base_minutes or DAY_MS % (minutes * MINUTE_MS):
            raise ValueError(f"{minutes}m must be a multiple of {base_minutes}m and divide a day")
        self.minutes, self.base_minutes = minutes, base_minutes
        self._period = minutes * MINUTE_MS
        self._base = base_minutes * MINUTE_MS
        self._rsi = WilderRsi(14)
        self._atr = WilderAtr(14)
        self.warmup = self._rsi.warmup * (minutes // base_minutes)
        self.value: HtfFeatures | None = None
        self.rsi_14: float | None = None
        self.atr_pct: float | None = None
        self.r_1: float | None = None
        self.closed = False
        self.last_bar: list | None = None  # [open_time, open, high, low, close, volume, base bars] of the last closed
        self.bars_closed = 0
        self._bucket: int | None = None  # open time of the bucket being aggregated
        self._o = self._h = self._l = self._c = self._v = 0.0
        self._parts = 0
        self._last_open: int | None = None
        self._prev_close: float | None = None

    def update(self, open_time_ms: int, open: float, high: float, low: float, close: float,
               volume: float) -> HtfFeatures | None:
        self.closed = False
        if self._last_open is not None and open_time_ms <= self._last_open:
            return self.value
        self._last_open = open_time_ms
        bucket = open_time_ms - open_time_ms % self._period
        if self._bucket is not None and bucket != self._bucket:
            self._close_bucket()  # its last base bar(s) never arrived
        if self._bucket is None:
            self._bucket = bucket
            self._o, self._h, self._l, self._c, self._v = open, high, low, close, volume
            self._parts = 1
        else:
            if high > self._h:
                self._h = high
            if low < self._l:
                self._l = low
            self._c = close
            self._v += volume
            self._parts += 1
        if (open_time_ms + self._base) % self._period == 0:
            self._close_bucket()
        return self.value

    def _close_bucket(self) -> None:
        h, low, c = self._h, self._l, self._c
        rsi = self._rsi.update(c)
        atr = self._atr.update(h, low, c)
        prev = self._prev_close
        self._prev_close = c
        self.rsi_14 = rsi
        self.atr_pct = atr / c if atr is not None else None
        self.r_1 = c / prev - 1.0 if prev is not None else None
        self.value = self._features()
        self.last_bar = [self._bucket, self._o, h, low, c, self._v, self._parts]
        self.bars_closed += 1
        self.closed = True
        self._bucket = None
        self._parts = 0

    def _features(self) -> HtfFeatures | None:
        if self.rsi_14 is None or self.atr_pct is None or self.r_1 is None:
            return None
        return HtfFeatures(self.rsi_14, self.atr_pct, self.r_1)

    def to_state(self) -> dict[str, Any]:
        return {"minutes": self.minutes, "base_minutes": self.base_minutes, "rsi": self._rsi.to_state(),
                "atr": self._atr.to_state(), "prev_close": self._prev_close, "rsi_14": self.rsi_14,
                "atr_pct": self.atr_pct, "r_1": self.r_1, "closed": self.closed, "last_bar": self.last_bar,
                "bars_closed": self.bars_closed, "bucket": self._bucket,
                "ohlcv": [self._o, self._h, self._l, self._c, self._v], "parts": self._parts,
                "last_open": self._last_open}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HigherTimeframe:
        obj = cls(state["minutes"], state["base_minutes"])
        obj._rsi = WilderRsi.from_state(state["rsi"])
        obj._atr = WilderAtr.from_state(state["atr"])
        obj._prev_close = state["prev_close"]
        obj.rsi_14, obj.atr_pct, obj.r_1 = state["rsi_14"], state["atr_pct"], state["r_1"]
        obj.closed, obj.last_bar, obj.bars_closed = state["closed"], state["last_bar"], state["bars_closed"]
        obj._bucket, obj._parts, obj._last_open = state["bucket"], state["parts"], state["last_open"]
        obj._o, obj._h, obj._l, obj._c, obj._v = state["ohlcv"]
        obj.value = obj._features()
        return obj
