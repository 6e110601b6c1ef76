"""SymbolFeatures: the feature state of one symbol, updated in O(1) per closed 5m bar — the one implementation that
the streaming agent and the offline batch (`streams.features.offline`) both drive.

Inputs arrive as the Avro records of their topics, in event-time order (the driver's job):

- `on_kline(bar, btc)` takes a closed 5m bar and returns its `features` record (a dict ready to encode), or None
  for a bar whose open_time is not after the previous one (a duplicate or out of order: counted in `dropped`).
  A jump of open_time sets `gap_bars` = bars missing in between; indicators continue over received bars.
- `on_mark`, `on_funding`, `on_open_interest` update the context: the latest value known. A bar uses the context
  known at its close (an as-of join by arrival); a context value stamped after the bar's close is not used for it,
  so a race between topics can cost a value but never leaks the future.

Cross-symbol input is explicit: `btc` is a BtcSnapshot of BTC's own engine for the same bar (`BtcSnapshot.of`),
or None. The offline driver updates BTCUSDT first for each bar and hands its snapshot to the other symbols; a
streaming driver must bring BTC's snapshot to the other symbols' partitions (e.g. a small BTC-keyed topic or a
global table) and hold a bar until BTC's snapshot of that open_time arrived, or pass None (btc fields null). The
60 pairs behind btc_corr_60 are kept in this symbol's state, aligned by open_time: a bar without BTC's snapshot
adds no pair. BTCUSDT's own row uses its own values through the same code (its btc_corr_60 is the correlation of
its returns with themselves: 1.0 up to rounding, null for the first 60 returns like every symbol's).

`to_state()` is plain data (JSON round-trips it exactly) and `from_state` continues bit for bit.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, NamedTuple

from schemas import event_ids
from streams.features.indicators import (
    AnchoredVwap,
    Bollinger,
    Ema,
    HigherTimeframe,
    Macd,
    RollingCorrelation,
    RollingWindow,
    Stochastic,
    WilderAdx,
    WilderAtr,
    WilderRsi,
)
from streams.features.registry import READY_BARS, READY_HTF_BARS, SCHEMA_VERSION

INTERVAL = "5m"
BAR_MS = 300_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
BTC_SYMBOL = "BTCUSDT"
DEFAULT_FUNDING_INTERVAL_MS = 8 * HOUR_MS


class BtcSnapshot(NamedTuple):
    """What other symbols need of BTC's bar `open_time`."""

    open_time: int
    ema_50: float
    ema_200: float
    r_1: float | None

    @classmethod
    def of(cls, btc: SymbolFeatures) -> BtcSnapshot | None:
        """The snapshot of BTC's engine after its last bar (None before its first)."""
        if btc.last_open_time is None:
            return None
        return cls(btc.last_open_time, btc.ema_50.value, btc.ema_200.value, btc.last_r_1)  # type: ignore[arg-type]


def _regime(ema_50: float, ema_200: float) -> float:
    return 1.0 if ema_50 > ema_200 * 1.02 else -1.0 if ema_50 < ema_200 * 0.98 else 0.0


class SymbolFeatures:
    def __init__(self, symbol: str, source: str = "") -> None:
        self.symbol = symbol
        self.source = source
        self.is_btc = symbol == BTC_SYMBOL
        self.bars_seen = 0
        self.dropped = 0
        self.last_open_time: int | None = None
        self.last_r_1: float | None = None
        self.closes: deque[float] = deque(maxlen=12)  # for r_1, r_3, r_12
        self.ema_7, self.ema_21, self.ema_50, self.ema_200 = Ema(7), Ema(21), Ema(50), Ema(200)
        self.atr, self.rsi, self.macd, self.adx = WilderAtr(14), WilderRsi(14), Macd(12, 26, 9), WilderAdx(14)
        self.stoch = Stochastic(14, 3)
        self.ret_10, self.ret_30 = RollingWindow(10), RollingWindow(30)
        self.volume_12, self.volume_48 = RollingWindow(12), RollingWindow(48)
        self.bollinger = Bollinger(20, 2.0)
        self.vwap = AnchoredVwap()
        self.htf_15, self.htf_60 = HigherTimeframe(15), HigherTimeframe(60)
        self.btc_corr = RollingCorrelation(60)
        # context, latest known: [event_time, mark_price, funding_rate, next_funding_time]
        self.mark: list | None = None
        self.settlements: deque[list] = deque()  # [funding_time, rate, event_time] of the last 24 h
        self.last_settlement: list | None = None
        self.funding_interval = DEFAULT_FUNDING_INTERVAL_MS
        self.open_interest: list | None = None  # [event_time, open_interest]
        self.oi_at_close: deque[float | None] = deque(maxlen=13)

    # -- context ------------------------------------------------------------------------------------------------
    def on_mark(self, record: dict) -> None:
        t = record["event_time"]
        if self.mark is None or t >= self.mark[0]:
            self.mark = [t, record["mark_price"], record["funding_rate"], record["next_funding_time"]]

    def on_funding(self, record: dict) -> None:
        ft, rate = record["funding_time"], record["funding_rate"]
        last = self.last_settlement
        if last is not None:
            if ft < last[0]:
                return  # older than a settlement already known
            if ft == last[0]:  # the same settlement again: keep the latest report of it
                last[1] = rate
                return
            # the grid (8 h on most symbols, 4 h or 1 h on some; recorded times can be a few ms late); a longer
            # step means a settlement is missing from the input, not a new grid
            hours = round((ft - last[0]) / HOUR_MS)
            if hours in (1, 2, 4, 8):
                self.funding_interval = hours * HOUR_MS
        entry = [ft, rate, max(record["event_time"], ft)]
        self.settlements.append(entry)
        self.last_settlement = entry

    def on_open_interest(self, record: dict) -> None:
        t = record["event_time"]
        if self.open_interest is None or t >= self.open_interest[0]:
            self.open_interest = [t, record["open_interest"]]

    # -- the bar ------------------------------------------------------------------------------------------------
    @staticmethod
    def check_bar(bar: dict) -> None:
        """ValueError for a bar no indicator can take (the streaming agent dead-letters it before holding it)."""
        o, h, low, c, v = bar["open"], bar["high"], bar["low"], bar["close"], bar["volume"]
        if not (c > 0.0 and o > 0.0 and h >= low > 0.0 and v >= 0.0):
            raise ValueError(f"{bar['symbol']} bar {bar['open_time']}: invalid OHLCV {o}, {h}, {low}, {c}, {v}")

    def on_kline(self, bar: dict, btc: BtcSnapshot | None = None) -> dict | None:
        if bar["symbol"] != self.symbol or bar["interval"] != INTERVAL:
            raise ValueError(f"{self.symbol} {INTERVAL} engine got a {bar['symbol']} {bar['interval']} bar")
        self.check_bar(bar)
        ot, ct = bar["open_time"], bar["close_time"]
        o, h, low, c, v = bar["open"], bar["high"], bar["low"], bar["close"], bar["volume"]
        last = self.last_open_time
        if last is not None and ot <= last:
            self.dropped += 1
            return None
        gap = 0 if last is None else max((ot - last) // BAR_MS - 1, 0)
        self.last_open_time = ot
        self.bars_seen += 1

        closes = self.closes
        n_closes = len(closes)
        r_1 = c / closes[-1] - 1.0 if n_closes else None
        r_3 = c / closes[-3] - 1.0 if n_closes >= 3 else None
        r_12 = c / closes[-12] - 1.0 if n_closes >= 12 else None
        closes.append(c)
        self.last_r_1 = r_1

        ema_7 = self.ema_7.update(c)
        ema_21 = self.ema_21.update(c)
        ema_50 = self.ema_50.update(c)
        ema_200 = self.ema_200.update(c)
        atr = self.atr.update(h, low, c)
        rsi = self.rsi.update(c)
        macd, macd_signal, macd_hist = self.macd.update(c)
        adx = self.adx.update(h, low, c)
        stoch = self.stoch
        stoch.update(h, low, c)
        if r_1 is not None:
            self.ret_10.update(r_1)
            self.ret_30.update(r_1)
        volume_ma_12 = self.volume_12.update(v)
        self.volume_48.update(v)
        bands = self.bollinger.update(c)
        std_20 = self.bollinger.window.std() if bands is not None else None
        vwap = self.vwap.update(ot, h, low, c, v)
        h15, h60 = self.htf_15, self.htf_60
        h15.update(ot, o, h, low, c, v)
        h60.update(ot, o, h, low, c, v)

        # BTC: our own values on BTC's row, else the snapshot of the same bar (see the module doc)
        if self.is_btc:
            btc_ema_50, btc_ema_200, btc_r_1, has_btc = ema_50, ema_200, r_1, True
        elif btc is not None and btc.open_time == ot:
            btc_ema_50, btc_ema_200, btc_r_1, has_btc = btc.ema_50, btc.ema_200, btc.r_1, True
        else:
            btc_ema_50 = btc_ema_200 = btc_r_1 = None
            has_btc = False
        btc_corr = self.btc_corr.update(r_1, btc_r_1) if r_1 is not None and btc_r_1 is not None else None

        funding_rate, funding_ma, funding_z, to_funding, premium = self._funding_and_mark(ot, ct, c)
        oi_change_1, oi_change_12 = self._open_interest(ct)

        hour = ot // HOUR_MS % 24
        return {
            "event_id": event_ids.features(self.symbol, INTERVAL, ot), "event_time": ct, "symbol": self.symbol,
            "interval": INTERVAL, "open_time": ot, "close_time": ct, "schema_version": SCHEMA_VERSION,
            "ready": (self.bars_seen >= READY_BARS and h15.bars_closed >= READY_HTF_BARS[15]
                      and h60.bars_closed >= READY_HTF_BARS[60]),
            "gap_bars": gap,
            "r_1": r_1, "r_3": r_3, "r_12": r_12, "range_pct": (h - low) / c,
            "ema_7": ema_7, "ema_21": ema_21, "ema_50": ema_50, "ema_200": ema_200,
            "ema_dist_atr": (c - ema_21) / atr if atr else None,
            "atr_14": atr, "atr_pct": atr / c if atr is not None else None,
            "rsi_14": rsi, "macd": macd, "macd_signal": macd_signal, "macd_hist": macd_hist, "adx_14": adx,
            "stoch_k": stoch.k, "stoch_d": stoch.d,
            "volatility_10": self.ret_10.std(), "volatility_30": self.ret_30.std(),
            "volume_ma_12": volume_ma_12, "vol_z": self.volume_48.zscore(),
            "bb_upper": bands[1] if bands else None, "bb_middle": bands[0] if bands else None,
            "bb_lower": bands[2] if bands else None,
            "bb_z": (c - bands[0]) / (2.0 * std_20) if std_20 else None,  # type: ignore[index]
            "vwap_dist": (c - vwap) / atr if vwap is not None and atr else None,
            "funding_rate": funding_rate, "funding_ma_24h": funding_ma, "funding_z": funding_z,
            "minutes_to_funding": to_funding, "mark_premium": premium,
            "oi_change_1": oi_change_1, "oi_change_12": oi_change_12,
            "btc_regime": _regime(btc_ema_50, btc_ema_200) if has_btc else None,  # type: ignore[arg-type]
            "btc_corr_60": btc_corr,
            "rsi_14_15m": h15.rsi_14, "atr_pct_15m": h15.atr_pct, "r_1_15m": h15.r_1,
            "rsi_14_1h": h60.rsi_14, "atr_pct_1h": h60.atr_pct, "r_1_1h": h60.r_1,
            "hour_of_day": float(hour), "day_of_week": float((ot // DAY_MS + 3) % 7),  # 1970-01-01 was a Thursday
            "is_asian_session": 1.0 if hour < 8 else 0.0,
            "source": self.source,
        }

    def _funding_and_mark(self, ot: int, ct: int, close: float):
        """funding_rate, funding_ma_24h, funding_z, minutes_to_funding, mark_premium as known at the close ct."""
        mark = self.mark
        if mark is not None and mark[0] > ct:
            mark = None  # stamped after this bar: not known at its close
        rate, rate_time = (mark[2], mark[0]) if mark is not None and mark[2] is not None else (None, -1)
        settlements = self.settlements
        while settlements and settlements[0][0] <= ct - DAY_MS:
            settlements.popleft()
        known = [s for s in settlements if s[2] <= ct]
        last = self.last_settlement  # the newest, even when older than 24 h
        settled = last if last is not None and last[2] <= ct else (known[-1] if known else None)
        if settled is not None and settled[2] > rate_time:  # settled after the mark's rate was shown
            rate = settled[1]
        window = [s[1] for s in known]
        ma = z = None
        if window:
            ma = math.fsum(window) / len(window)
            if len(window) >= 2 and rate is not None:
                var = math.fsum((x - ma) * (x - ma) for x in window) / (len(window) - 1)
                z = (rate - ma) / math.sqrt(var) if var > 0.0 else None
        to_funding = premium = None
        if mark is not None:
            end = ot + BAR_MS
            nft = mark[3]
            if nft is not None:
                if nft < end:  # the mark predates a settlement that has passed: the next one is on the grid
                    step = self.funding_interval
                    nft += -((nft - end) // step) * step
                to_funding = (nft - end) / 60_000
            if mark[0] >= ot and mark[1] > 0.0:  # observed during the bar: an older mark would fake a premium
                premium = (close - mark[1]) / mark[1]
        return rate, ma, z, to_funding, premium

    def _open_interest(self, ct: int) -> tuple[float | None, float | None]:
        oi = self.open_interest
        now = oi[1] if oi is not None and oi[0] <= ct else None
        hist = self.oi_at_close
        hist.append(now)
        if now is None:
            return None, None
        prev = hist[-2] if len(hist) >= 2 else None
        old = hist[0] if len(hist) == 13 else None
        return (now / prev - 1.0 if prev else None), (now / old - 1.0 if old else None)

    # -- state --------------------------------------------------------------------------------------------------
    _INDICATORS = ("ema_7", "ema_21", "ema_50", "ema_200", "atr", "rsi", "macd", "adx", "stoch", "ret_10",
                   "ret_30", "volume_12", "volume_48", "bollinger", "vwap", "htf_15", "htf_60", "btc_corr")

    def to_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "symbol": self.symbol, "source": self.source,
            "bars_seen": self.bars_seen, "dropped": self.dropped, "last_open_time": self.last_open_time,
            "last_r_1": self.last_r_1, "closes": list(self.closes),
            "mark": None if self.mark is None else list(self.mark),
            "settlements": [list(s) for s in self.settlements], "funding_interval": self.funding_interval,
            "last_settlement": None if self.last_settlement is None else list(self.last_settlement),
            "open_interest": None if self.open_interest is None else list(self.open_interest),
            "oi_at_close": list(self.oi_at_close),
        }
        for name in self._INDICATORS:
            state[name] = getattr(self, name).to_state()
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SymbolFeatures:
        if state.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"feature state of schema {state.get('schema_version')}, this engine writes "
                             f"{SCHEMA_VERSION}: rebuild the state by replaying history")
        obj = cls(state["symbol"], state["source"])
        obj.bars_seen, obj.dropped = state["bars_seen"], state["dropped"]
        obj.last_open_time, obj.last_r_1 = state["last_open_time"], state["last_r_1"]
        obj.closes.extend(state["closes"])
        obj.mark = None if state["mark"] is None else list(state["mark"])
        obj.settlements.extend(list(s) for s in state["settlements"])
        last = state["last_settlement"]  # the same object as the window's newest entry while it is in the window
        in_window = obj.settlements and last is not None and obj.settlements[-1][0] == last[0]
        obj.last_settlement = obj.settlements[-1] if in_window else (None if last is None else list(last))
        obj.funding_interval = state["funding_interval"]
        obj.open_interest = None if state["open_interest"] is None else list(state["open_interest"])
        obj.oi_at_close.extend(state["oi_at_close"])
        for name in cls._INDICATORS:
            setattr(obj, name, type(getattr(obj, name)).from_state(state[name]))
        return obj
