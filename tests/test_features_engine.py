"""streams.features: the per-symbol engine on the bundled real data, driven by exactly the events the replay
publishes (in its order), against independent computations written here; no look-ahead; state round trips;
duplicates, gaps, funding as-of; the registry = the Avro schema; `perpflow features build` end to end."""

from __future__ import annotations

import fcntl
import io
import json
import math
from functools import cache

import numpy as np
import pandas as pd
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from connectors.history_files import load_history
from connectors.replay import KIND_KLINE, ReplaySource, build_timeline
from schemas import event_ids
from schemas.catalog import topic
from schemas.codec import default_codec
from schemas.tables import arrow_schema
from streams.features.engine import BtcSnapshot, SymbolFeatures
from streams.features.offline import FeatureRun, compute, sort_events
from streams.features.registry import FEATURES, NAMES, READY_BARS, SCHEMA_VERSION
from tests.conftest import SAMPLE, run_cli
from tests.test_indicators import ref_atr

REL, ABS = 1e-9, 1e-12
BAR, HOUR, DAY = 300_000, 3_600_000, 86_400_000
JAN1 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


@cache
def replay_events(symbols: tuple[str, ...], start_ms: int | None = None, end_ms: int | None = None) -> tuple:
    """(kind, record) exactly as the replay publishes them, in its order."""
    src = ReplaySource("", str(SAMPLE), list(symbols), start_ms, end_ms)
    prepared, _ = src.load()
    make = {0: src.kline_record, 1: src.mark_record, 2: src.funding_record}
    return tuple((kind, make[kind](prepared[s], row)) for _, kind, s, row in build_timeline(prepared).tolist())


@cache
def full_run() -> dict[str, list[dict]]:
    return compute(replay_events(("BTCUSDT", "ETHUSDT")))


@cache
def klines(symbol: str) -> pd.DataFrame:
    histories, _ = load_history(SAMPLE, [symbol])
    return histories[symbol].klines


def assert_close(rows: list[dict], name: str, want) -> None:
    """Same undefined pattern (None ↔ NaN), every value within REL relative or ABS absolute."""
    want = [None if w is None or (isinstance(w, float) and math.isnan(w)) else float(w) for w in want]
    got = [r[name] for r in rows]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g is None) == (w is None), f"{name}[{i}]: {g!r} vs {w!r}"
        assert g is None or math.isclose(g, w, rel_tol=REL, abs_tol=ABS), f"{name}[{i}]: {g!r} != {w!r}"
    assert sum(w is not None for w in want) > len(want) // 2, name


# ------------------------------------------------------------------------------------ independent references
def ref_rsi(c: list[float], n: int = 14) -> list[float | None]:
    changes = [c[i] - c[i - 1] for i in range(1, len(c))]
    gains, losses = [max(x, 0.0) for x in changes], [max(-x, 0.0) for x in changes]
    out: list[float | None] = [None] * len(c)
    ag, al = sum(gains[:n]) / n, sum(losses[:n]) / n
    for j in range(n - 1, len(changes)):
        if j >= n:
            ag, al = (ag * (n - 1) + gains[j]) / n, (al * (n - 1) + losses[j]) / n
        out[j + 1] = 100.0 if al == 0 else 100 - 100 / (1 + ag / al)
    return out


def sliding(x, n: int, fn) -> np.ndarray:
    """fn over each full window of n (rows of a sliding view), NaN before the first."""
    return np.concatenate([np.full(n - 1, np.nan), fn(sliding_window_view(np.asarray(x, dtype=float), n))])


def std(w: np.ndarray) -> np.ndarray:
    return w.std(axis=1, ddof=1)


def corr(wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    dx, dy = wx - wx.mean(axis=1, keepdims=True), wy - wy.mean(axis=1, keepdims=True)
    return (dx * dy).sum(axis=1) / np.sqrt((dx * dx).sum(axis=1) * (dy * dy).sum(axis=1))


# ------------------------------------------------------------------------------------ (a) reference values
@pytest.mark.parametrize("symbol", ["BTCUSDT", "ETHUSDT"])
def test_features_match_independent_computations(symbol):
    rows = full_run()[symbol]
    k = klines(symbol)
    assert [r["open_time"] for r in rows] == k["open_time"].tolist()
    h, lo, c = k["high"].tolist(), k["low"].tolist(), k["close"].tolist()
    close = k["close"]
    atr = ref_atr(h, lo, c, 14)
    assert_close(rows, "atr_14", atr)
    assert_close(rows, "rsi_14", ref_rsi(c))
    assert_close(rows, "ema_21", close.ewm(span=21, adjust=False).mean())
    assert_close(rows, "ema_200", close.ewm(span=200, adjust=False).mean())
    assert_close(rows, "macd", close.ewm(span=12, adjust=False).mean() - close.ewm(span=26, adjust=False).mean())
    mid, sd = sliding(c, 20, lambda w: w.mean(axis=1)), sliding(c, 20, std)
    assert_close(rows, "bb_z", (close.to_numpy() - mid) / (2 * sd))
    day = k["open_time"] // DAY
    tp = (k["high"] + k["low"] + k["close"]) / 3
    vwap = (tp * k["volume"]).groupby(day).cumsum() / k["volume"].groupby(day).cumsum()
    assert_close(rows, "vwap_dist", [(ci - v) / a if a else None for ci, v, a in zip(c, vwap, atr, strict=True)])
    r_1 = [None] + [c[i] / c[i - 1] - 1.0 for i in range(1, len(c))]
    assert_close(rows, "r_1", r_1)
    assert_close(rows, "volatility_30", np.concatenate([[np.nan], sliding(r_1[1:], 30, std)]))
    # btc_corr_60: pairs aligned by open_time (the sample has every bar of both symbols)
    b = klines("BTCUSDT")["close"].tolist()
    btc_r_1 = [b[i] / b[i - 1] - 1.0 for i in range(1, len(b))]
    wx, wy = (sliding_window_view(np.asarray(x), 60) for x in (r_1[1:], btc_r_1))
    want_corr = np.concatenate([np.full(60, np.nan), corr(wx, wy)])
    assert_close(rows, "btc_corr_60", want_corr)
    # r_1_1h: the last closed hour (closed once the bar ending it arrived)
    hourly = pd.Series(c, index=k["open_time"] // HOUR).groupby(level=0).last().pct_change()
    last_closed = (k["open_time"] + BAR) // HOUR - 1
    assert_close(rows, "r_1_1h", hourly.reindex(last_closed).tolist())
    # BTC's regime from its own EMAs; the first ready bar comes at the registry's warm-up (an aligned start)
    e50, e200 = (klines("BTCUSDT")["close"].ewm(span=n, adjust=False).mean() for n in (50, 200))
    assert [r["btc_regime"] for r in rows] == np.select([e50 > e200 * 1.02, e50 < e200 * 0.98], [1.0, -1.0],
                                                        0.0).tolist()
    assert next(i for i, r in enumerate(rows) if r["ready"]) == 1307 and all(r["ready"] for r in rows[1307:])
    assert all(r["gap_bars"] == 0 and r["schema_version"] == SCHEMA_VERSION for r in rows)


def test_btc_row_correlates_with_itself():
    corr_60 = [r["btc_corr_60"] for r in full_run()["BTCUSDT"]]
    assert corr_60[:60] == [None] * 60
    assert all(abs(x - 1.0) < 1e-12 for x in corr_60[60:])


def test_absent_inputs_are_null_and_do_not_block_ready():
    rows = compute(replay_events(("ETHUSDT",)))["ETHUSDT"]  # no BTC in the run, no open interest, replay marks
    for name in ("btc_regime", "btc_corr_60", "oi_change_1", "oi_change_12", "mark_premium"):
        assert all(r[name] is None for r in rows), name
    assert sum(r["ready"] for r in rows) == len(rows) - 1307
    # the replay's close-as-mark of a bar is published after its kline: never observed during the next bar
    assert all(r["funding_rate"] is not None for r in rows)


# ------------------------------------------------------------------------------------ (b) no look-ahead
@pytest.mark.parametrize("t_index", [2015, 4321, 7000])  # 2015: the bar right before the 2023-12-16 00:00 settlement
def test_no_look_ahead(t_index):
    opens = klines("BTCUSDT")["open_time"].tolist()
    t = opens[t_index]
    short = compute(replay_events(("BTCUSDT", "ETHUSDT"), None, t + BAR))
    longer = compute(replay_events(("BTCUSDT", "ETHUSDT"), None, t + 501 * BAR))
    for symbol in ("BTCUSDT", "ETHUSDT"):
        assert len(short[symbol]) == t_index + 1 and len(longer[symbol]) == t_index + 501
        assert short[symbol] == longer[symbol][: t_index + 1]


# ------------------------------------------------------------------------------------ (c) state round trip
def test_state_round_trip_mid_stream_continues_identically():
    events = sort_events(replay_events(("BTCUSDT", "ETHUSDT")))
    rng = np.random.default_rng(3)
    for stop in rng.integers(1, len(events), size=3).tolist():
        run, rows = FeatureRun(), []
        for i, (kind, record) in enumerate(events):
            if i == stop:
                run = FeatureRun.from_state(json.loads(json.dumps(run.to_state())))
            row = run.feed(kind, record)
            if row is not None:
                rows.append(row)
        assert rows == sorted(full_run()["BTCUSDT"] + full_run()["ETHUSDT"],
                              key=lambda r: (r["open_time"], r["symbol"] != "BTCUSDT")), stop


# ------------------------------------------------------------------------------------ (d) duplicates, gaps
def bars_of(symbol: str) -> list[dict]:
    return [r for kind, r in replay_events((symbol,)) if kind == KIND_KLINE]


def test_duplicates_and_out_of_order_are_dropped_and_gaps_flagged():
    bars = bars_of("ETHUSDT")[:1500]
    kept = [b for i, b in enumerate(bars) if i not in {300, 301, 302, 400}]  # gaps of 3 and 1 bars
    messy = kept[:101] + [kept[100]] + kept[101:200] + [kept[50], dict(kept[199], close=1.0)] + kept[200:]
    clean_engine, messy_engine = SymbolFeatures("ETHUSDT"), SymbolFeatures("ETHUSDT")
    clean = [clean_engine.on_kline(b) for b in kept]
    out = [messy_engine.on_kline(b) for b in messy]
    assert [r for r in out if r is not None] == clean  # dropping is idempotent: the state did not move
    assert out.count(None) == messy_engine.dropped == 3 and clean_engine.dropped == 0
    gaps = {r["open_time"]: r["gap_bars"] for r in clean if r["gap_bars"]}
    assert gaps == {bars[303]["open_time"]: 3, bars[401]["open_time"]: 1}
    assert clean[0]["gap_bars"] == 0
    assert messy_engine.bars_seen == len(kept) > READY_BARS
    # every 1h bucket still closed (from the bars that came), so ready comes with the 109th hour, as without gaps
    assert next(r["open_time"] for r in clean if r["ready"]) == bars[1307]["open_time"]


def test_bars_of_another_symbol_or_interval_are_refused():
    engine = SymbolFeatures("ETHUSDT")
    bar = bars_of("ETHUSDT")[0]
    for wrong in (dict(bar, symbol="BTCUSDT"), dict(bar, interval="1m"), dict(bar, close=float("nan"))):
        with pytest.raises(ValueError):
            engine.on_kline(wrong)
    assert engine.bars_seen == 0


# ------------------------------------------------------------------------------------ (e) funding and marks as-of
def test_funding_is_an_as_of_join():
    rows = {r["open_time"]: r for r in full_run()["ETHUSDT"]}
    f = load_history(SAMPLE, ["ETHUSDT"])[0]["ETHUSDT"].funding
    f = pd.Series(f["funding_rate"].tolist(), index=f["funding_time"] // HOUR * HOUR)  # some are recorded 1 ms late
    eight = JAN1 + 8 * HOUR
    before, at = rows[eight - BAR], rows[eight]  # the bar closing at 07:59:59.999, the bar opening at 08:00
    assert before["funding_rate"] == f[JAN1] != f[eight] == at["funding_rate"]
    assert (rows[eight - 2 * BAR]["minutes_to_funding"], before["minutes_to_funding"],
            at["minutes_to_funding"]) == (5.0, 0.0, 475.0)
    window = [f[eight - 16 * HOUR], f[JAN1], f[eight]]  # settlements in (close − 24 h, close]
    assert at["funding_ma_24h"] == pytest.approx(np.mean(window), rel=1e-12)
    assert at["funding_z"] == pytest.approx((f[eight] - np.mean(window)) / np.std(window, ddof=1), rel=1e-9)
    assert before["funding_ma_24h"] == pytest.approx(np.mean([f[eight - 24 * HOUR], f[eight - 16 * HOUR], f[JAN1]]),
                                                     rel=1e-12)


def test_context_stamped_after_the_close_is_not_used_and_marks_must_be_fresh():
    bars = bars_of("ETHUSDT")[:30]
    engine = SymbolFeatures("ETHUSDT")
    for b in bars[:20]:
        engine.on_kline(b)
    b = bars[20]
    engine.on_mark({"event_time": b["close_time"] + 1, "mark_price": 1.0, "funding_rate": 0.5,
                    "next_funding_time": b["close_time"] + HOUR})
    engine.on_funding({"event_time": b["close_time"] + 5, "funding_time": b["close_time"] + 5, "funding_rate": 0.7})
    engine.on_open_interest({"event_time": b["close_time"] + 1, "open_interest": 10.0})
    row = engine.on_kline(b)
    assert [row[k] for k in ("funding_rate", "funding_ma_24h", "mark_premium", "minutes_to_funding",
                             "oi_change_1")] == [None] * 5
    mark_time = bars[21]["open_time"] + 1000  # observed during bar 21
    engine.on_mark({"event_time": mark_time, "mark_price": 2000.0, "funding_rate": 0.1,
                    "next_funding_time": bars[22]["open_time"]})
    row = engine.on_kline(bars[21])
    assert row["mark_premium"] == (bars[21]["close"] - 2000.0) / 2000.0
    assert row["funding_rate"] == 0.1 and row["minutes_to_funding"] == 0.0  # the mark's rate is newer
    assert row["funding_ma_24h"] == 0.7  # the settlement, now known
    row = engine.on_kline(bars[22])  # the same mark: stale for bar 22, and its settlement time passed
    assert row["mark_premium"] is None and row["minutes_to_funding"] == 8 * 60 - 5


def test_open_interest_changes():
    bars = bars_of("ETHUSDT")[:20]
    engine = SymbolFeatures("ETHUSDT")
    rows = []
    for i, b in enumerate(bars):
        if i != 5:  # no new value before bar 5: the latest known (bar 4's) is used
            engine.on_open_interest({"event_time": b["close_time"] - 1000, "open_interest": 100.0 + i})
        rows.append(engine.on_kline(b))
    assert rows[0]["oi_change_1"] is None and rows[5]["oi_change_1"] == 0.0
    assert rows[3]["oi_change_1"] == 103.0 / 102.0 - 1.0
    assert [r["oi_change_12"] is None for r in rows] == [True] * 12 + [False] * 8
    assert rows[14]["oi_change_12"] == 114.0 / 102.0 - 1.0


def test_btc_snapshot_of_another_bar_is_ignored():
    btc, eth = SymbolFeatures("BTCUSDT"), SymbolFeatures("ETHUSDT")
    b_bars, e_bars = bars_of("BTCUSDT")[:3], bars_of("ETHUSDT")[:3]
    assert BtcSnapshot.of(btc) is None
    btc.on_kline(b_bars[0])
    snap = BtcSnapshot.of(btc)
    assert eth.on_kline(e_bars[0], snap)["btc_regime"] == 0.0
    assert eth.on_kline(e_bars[1], snap)["btc_regime"] is None  # BTC's bar 1 never came


# ------------------------------------------------------------------------------------ registry and schema
def test_schema_fields_are_the_registry():
    schema = default_codec().schema("features")
    fields = [f["name"] for f in schema["fields"]]
    head = ["event_id", "event_time", "symbol", "interval", "open_time", "close_time", "schema_version", "ready",
            "gap_bars"]
    assert fields == head + list(NAMES) + ["source"]
    docs = {f["name"]: f.get("doc") for f in schema["fields"]}
    assert all(docs[f.name] == f.definition and f.warmup >= 1 for f in FEATURES)
    assert len(set(NAMES)) == len(NAMES) == 45
    row = full_run()["ETHUSDT"][4000]
    assert list(row) == fields
    assert row["event_id"] == event_ids.features("ETHUSDT", "5m", row["open_time"]) == \
        f"features:ETHUSDT:5m:{row['open_time']:013d}"
    name, back = default_codec().decode(default_codec().encode("features", row))
    assert name == "perpflow.Features" and back == row
    assert arrow_schema(topic("features")).names[:len(fields)] == fields


# ------------------------------------------------------------------------------------ (f) through the CLI
@pytest.mark.e2e
def test_features_build_through_the_cli(tmp_path):
    home = tmp_path / "home"
    up = run_cli(home, "up", "--source", "replay", "--data", str(SAMPLE), "--symbols", "BTCUSDT,ETHUSDT",
                 "--start", "2024-01-01", "--end", "2024-01-08", "--speed", "max", "--until-drained",
                 PERPFLOW_RUN_WORKER="false")
    assert up.returncode == 0, up.stderr
    build = ["features", "build", "--symbols", "BTCUSDT,ETHUSDT", "--start", "2024-01-01", "--end", "2024-01-08"]
    for _ in range(2):  # building again replaces the rows
        result = run_cli(home, *build)
        assert result.returncode == 0, result.stderr
        assert "2,016" in result.stdout and "709" in result.stdout, result.stdout  # rows, ready rows
    counts = run_cli(home, "sql", "SELECT symbol, count(), uniqExact(open_time), min(open_time), max(open_time) "
                     "FROM features FINAL GROUP BY symbol ORDER BY symbol", "--format", "tsv")
    assert counts.stdout == ("BTCUSDT\t2016\t2016\t2024-01-01 00:00:00.000\t2024-01-07 23:55:00.000\n"
                             "ETHUSDT\t2016\t2016\t2024-01-01 00:00:00.000\t2024-01-07 23:55:00.000\n")
    for symbol in ("BTCUSDT", "ETHUSDT"):
        bars = pd.read_csv(io.StringIO(run_cli(home, "sql", "SELECT high, low, close FROM md_klines FINAL WHERE "
                                               f"symbol = '{symbol}' ORDER BY open_time", "--format", "csv").stdout))
        got = pd.read_csv(io.StringIO(run_cli(home, "sql", "SELECT rsi_14, atr_14, ema_21 FROM features FINAL "
                                              f"WHERE symbol = '{symbol}' ORDER BY open_time", "--format",
                                              "csv").stdout), na_values=["\\N"])
        rows = got.astype(object).where(got.notna(), None).to_dict("records")
        h, lo, c = bars["high"].tolist(), bars["low"].tolist(), bars["close"].tolist()
        assert_close(rows, "rsi_14", ref_rsi(c))
        assert_close(rows, "atr_14", ref_atr(h, lo, c, 14))
        assert_close(rows, "ema_21", bars["close"].ewm(span=21, adjust=False).mean())

    with open(home / "run" / "store.lock", "a+") as held:  # as `perpflow up` holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write("pid 4242")
        held.flush()
        busy = run_cli(home, *build)
    assert busy.returncode == 1
    assert "pid 4242" in busy.stderr and "Stop `perpflow up`" in busy.stderr and len(busy.stderr.splitlines()) == 1
