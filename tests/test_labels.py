"""Triple-barrier labels on hand-made bars whose answers are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from training.labels import BAR_MS, SL, TIMEOUT, TP, Bars, LabelSpec, Settlements, label_side

T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
NO_COST = LabelSpec(k_tp=2.0, k_sl=1.0, horizon=4, fee=0.0, slippage=0.0)
FLAT = (100.0, 100.4, 99.6, 100.0)  # never reaches 102 / 99 (long) nor 98 / 101 (short)


def bars(*ohlc: tuple[float, float, float, float], missing: tuple[int, ...] = ()) -> Bars:
    """Bar 0 closes at 100 with ATR 1; other bars have no ATR (so only bar 0 is labeled)."""
    rows = [(100.0, 100.2, 99.8, 100.0), *ohlc]
    keep = [i for i in range(len(rows)) if i not in missing]
    o, h, lo, c = (np.array([rows[i][k] for i in keep]) for k in range(4))
    atr = np.where(np.array(keep) == 0, 1.0, np.nan)
    return Bars.on_grid(T0 + np.array(keep) * BAR_MS, o, h, lo, c, atr)


def row0(b: Bars, side: int, spec: LabelSpec = NO_COST, funding: Settlements | None = None) -> dict:
    out = label_side(b, funding or Settlements.none(), side, spec)
    rows = np.flatnonzero(out["open_time"] == T0)
    assert len(rows) == 1, "bar 0 must be labeled"
    return {k: v[rows[0]].item() for k, v in out.items()}


def test_long_take_profit_first():
    # TP = 100 + 2 = 102, SL = 99; bar 1 dips to 99.5 (no stop), bar 2 reaches 102.5 → TP at 102
    r = row0(bars((100.0, 101.0, 99.5, 100.5), (100.5, 102.5, 100.2, 102.2), FLAT, FLAT), +1)
    assert r["outcome"] == TP and r["exit_price"] == 102.0
    assert r["gross_return"] == pytest.approx(0.02) and r["net_return"] == pytest.approx(0.02)
    assert (r["bars_held"], r["minutes_to_event"]) == (2, 10)
    assert r["mae"] == pytest.approx(-0.005)  # the dip to 99.5
    assert r["mfe"] == pytest.approx(0.02)  # capped at the target: the position was closed there


def test_long_stop_loss_first():
    # bar 1 falls to 98.8 ≤ 99 before anything reaches 102 (bar 2 would): SL at 99
    r = row0(bars((100.0, 101.5, 98.8, 99.2), (99.2, 102.5, 99.0, 102.0), FLAT, FLAT), +1)
    assert r["outcome"] == SL and r["exit_price"] == 99.0
    assert r["gross_return"] == pytest.approx(-0.01)
    assert r["mae"] == pytest.approx(-0.01) and r["mfe"] == pytest.approx(0.015)  # up to 101.5 first
    assert r["bars_held"] == 1


def test_both_barriers_in_one_bar_count_as_stop_loss():
    r = row0(bars((100.0, 102.5, 98.5, 101.0), FLAT, FLAT, FLAT), +1)
    assert r["outcome"] == SL and r["gross_return"] == pytest.approx(-0.01)


def test_timeout_exits_at_the_close_of_bar_t_plus_h():
    r = row0(bars(FLAT, FLAT, FLAT, (100.0, 100.9, 99.5, 100.7), (100.7, 110, 90, 100)), +1)
    assert r["outcome"] == TIMEOUT and r["exit_price"] == 100.7  # bar 5 lies beyond the horizon
    assert r["gross_return"] == pytest.approx(0.007)
    assert (r["bars_held"], r["minutes_to_event"]) == (4, 20)
    assert r["mae"] == pytest.approx(-0.005) and r["mfe"] == pytest.approx(0.009)


def test_short_mirrors_the_barriers():
    # short: TP = 98, SL = 101; bar 1 rises to 100.6, bar 2 falls to 97.5 → TP at 98
    r = row0(bars((100.0, 100.6, 99.4, 99.5), (99.5, 99.8, 97.5, 98.0), FLAT, FLAT), -1)
    assert r["outcome"] == TP and r["exit_price"] == 98.0
    assert r["gross_return"] == pytest.approx(0.02)
    assert r["mae"] == pytest.approx(-0.006) and r["mfe"] == pytest.approx(0.02)
    # the same bars for a long: bar 2 falls through its 99 stop
    assert row0(bars((100.0, 100.6, 99.4, 99.5), (99.5, 99.8, 97.5, 98.0), FLAT, FLAT), +1)["outcome"] == SL


def test_stop_gapped_through_fills_at_the_open():
    r = row0(bars((98.5, 98.9, 98.0, 98.4), FLAT, FLAT, FLAT), +1)  # opens below the 99 stop
    assert r["outcome"] == SL and r["exit_price"] == 98.5 and r["gross_return"] == pytest.approx(-0.015)
    s = row0(bars((101.6, 102.0, 101.2, 101.5), FLAT, FLAT, FLAT), -1)  # opens above the short's 101 stop
    assert s["outcome"] == SL and s["exit_price"] == 101.6 and s["gross_return"] == pytest.approx(-0.016)


def test_funding_crossed_is_paid_by_a_long_and_received_by_a_short():
    b = bars(FLAT, FLAT, FLAT, (100.0, 100.4, 99.6, 100.0))  # timeout: held from 00:05 to 00:25
    entry, exit_ = T0 + BAR_MS, T0 + 5 * BAR_MS
    settlements = Settlements(
        time=np.array([T0, entry, T0 + 3 * BAR_MS, exit_], np.int64),  # before entry, at entry, inside, at exit
        rate=np.array([0.05, 0.0001, 0.0003, 0.07]),
        mark=np.array([100.0, 100.0, np.nan, 100.0]))  # no mark at 00:15: the close of the bar ending then (100)
    crossed = 0.0001 * 100 + 0.0003 * 100  # the ones at entry and inside; the one at the exit is not held
    spec = LabelSpec(k_tp=2.0, k_sl=1.0, horizon=4, fee=0.0004, slippage=0.0015)
    long, short = row0(b, +1, spec, settlements), row0(b, -1, spec, settlements)
    assert long["settlements"] == short["settlements"] == 2
    assert long["funding"] == pytest.approx(-crossed / 100) and short["funding"] == pytest.approx(crossed / 100)
    # fee and slippage on entry and exit notional (exit at 100: twice the rate)
    assert long["fee"] == pytest.approx(0.0008) and long["slippage"] == pytest.approx(0.003)
    assert long["net_return"] == pytest.approx(0.0 - 0.0008 - 0.003 - 0.0004)
    assert short["net_return"] == pytest.approx(0.0 - 0.0008 - 0.003 + 0.0004)


def test_negative_funding_is_received_by_a_long():
    b = bars(FLAT, FLAT, FLAT, FLAT)
    settlements = Settlements(np.array([T0 + 2 * BAR_MS], np.int64), np.array([-0.001]), np.array([110.0]))
    assert row0(b, +1, NO_COST, settlements)["funding"] == pytest.approx(0.001 * 110 / 100)
    assert row0(b, -1, NO_COST, settlements)["funding"] == pytest.approx(-0.001 * 110 / 100)


def test_a_stop_exit_stops_the_funding_clock():
    b = bars((100.0, 100.2, 98.9, 99.0), FLAT, FLAT, FLAT)  # SL in bar 1: held 00:05 → 00:10
    settlements = Settlements(np.array([T0 + 2 * BAR_MS], np.int64), np.array([0.01]), np.array([100.0]))
    r = row0(b, +1, NO_COST, settlements)
    assert r["outcome"] == SL and r["settlements"] == 0 and r["funding"] == 0.0


def test_a_gap_hides_the_outcome_unless_a_barrier_came_first():
    # bar 2 is missing: a window through it is only labeled when the outcome was decided before the gap
    spec = NO_COST
    gap = bars(FLAT, FLAT, FLAT, FLAT, FLAT, FLAT, missing=(2,))
    assert not (label_side(gap, Settlements.none(), +1, spec)["open_time"] == T0).any()
    decided = bars((100.0, 102.5, 100.0, 102.0), FLAT, FLAT, FLAT, missing=(2,))
    assert row0(decided, +1)["outcome"] == TP


def test_every_labeled_row_has_a_full_window_or_an_earlier_event():
    rng = np.random.default_rng(7)
    n = 500
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.003, n)))
    high, low = close * (1 + rng.uniform(0, 0.004, n)), close * (1 - rng.uniform(0, 0.004, n))
    opens = np.r_[close[0], close[:-1]]
    keep = np.ones(n, bool)
    keep[[100, 101, 300]] = False
    t = T0 + np.flatnonzero(keep) * BAR_MS
    b = Bars.on_grid(t, opens[keep], high[keep], low[keep], close[keep], np.full(keep.sum(), 0.3))
    for side in (+1, -1):
        out = label_side(b, Settlements.none(), side, LabelSpec(horizon=12))
        i = (out["open_time"] - T0) // BAR_MS
        exit_bar = i + out["bars_held"]
        assert exit_bar.max() < n  # nothing past the end of the data
        for missing in (100, 101, 300):  # no row decided on or after a missing bar
            assert not ((i < missing) & (exit_bar >= missing)).any()
        assert not np.isin(i, [100, 101, 300]).any()  # missing bars are not entries
        assert (out["mae"] <= 0).all() and (out["mfe"] >= 0).all()
        assert set(np.unique(out["outcome"])) <= {TP, SL, TIMEOUT}


def test_spec_id_depends_on_every_parameter():
    base = LabelSpec()
    assert base.id == LabelSpec.from_json(base.to_json()).id
    ids = {base.id, LabelSpec(k_tp=2.5).id, LabelSpec(k_sl=1.5).id, LabelSpec(horizon=24).id,
           LabelSpec(fee=0.0002).id, LabelSpec(slippage=0.001).id}
    assert len(ids) == 6
    with pytest.raises(ValueError):
        LabelSpec(horizon=0)


def test_vectorized_labels_equal_the_per_row_loop_on_real_bars():
    from benchmarks.labels import history_bars, loop_label_side
    from tests.conftest import SAMPLE

    (bars, funding), = history_bars(SAMPLE, ["1000PEPEUSDT"])
    rows = range(3000, 4500)
    for side in (+1, -1):
        vec = label_side(bars, funding, side, LabelSpec())
        loop = loop_label_side(bars, funding, side, LabelSpec(), rows)
        lo, hi = bars.open_time[rows[0]], bars.open_time[rows[-1]]
        sel = (vec["open_time"] >= lo) & (vec["open_time"] <= hi)
        assert sel.sum() == len(loop["open_time"]) > 1000
        assert (vec["outcome"][sel] == loop["outcome"]).all()
        assert len(np.unique(loop["outcome"])) == 3  # every outcome occurs in this stretch
        for k in ("open_time", "bars_held"):
            assert (vec[k][sel] == loop[k]).all(), k
        for k in ("exit_price", "gross_return", "funding", "net_return", "mae", "mfe"):
            np.testing.assert_allclose(vec[k][sel], loop[k], rtol=1e-12, atol=1e-15, err_msg=k)
        assert (loop["funding"] != 0).any()
