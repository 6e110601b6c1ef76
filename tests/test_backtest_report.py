"""Backtest accounting, metrics and report on a hand-built run of the real paper exchange.

Three trades over three UTC days at the labels' costs (taker fee 0.04 % per fill, slippage 15 bps against each market
fill), 5x isolated, 10,000 USDT:

1. BTCUSDT long 10 @ next open 100 → take-profit 104 (day 1)
2. ETHUSDT short 1 @ next open 2000 → stop-loss 2040 gapped through: the bar opens at 2045 (day 2)
3. BTCUSDT long 5 @ next open 110, pays the 08:00 funding, closed by a CLOSE intent at the next open 112 (day 3)

Every expected number is worked out below from those prices, not read off the code.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from connectors.paper.engine import PaperConfig, PaperExchange
from schemas import event_ids
from training.backtest import accounting, metrics, report

BAR = 300_000
HOUR = 3_600_000
DAY = 86_400_000
T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
D2, D3 = T0 + DAY, T0 + 2 * DAY
FEE, SLIP = 0.0004, 0.0015


def paper(leverage: int = 5) -> PaperExchange:
    return PaperExchange(PaperConfig(taker_fee=FEE, slippage_bps=SLIP * 10_000, leverage=leverage,
                                     initial_balance=10_000))


def kline(symbol: str, t: int, o: float, h: float, low: float, c: float) -> dict:
    return {"symbol": symbol, "interval": "5m", "open_time": t, "close_time": t + BAR - 1, "open": o, "high": h,
            "low": low, "close": c}


def signal(symbol: str, open_time: int, decision: str, p_win: float) -> dict:
    side = decision.lower()
    return {"event_id": event_ids.signal(symbol, "5m", open_time), "symbol": symbol, "interval": "5m",
            "open_time": open_time, "decision": decision,
            "prediction_id": event_ids.prediction(symbol, "5m", open_time), f"p_win_{side}": p_win, "flat_reason": ""}


def intent_id(sig: dict) -> str:
    return f"open:{sig['symbol']}:5m:{sig['open_time']:013d}"


def intent(sig: dict, t: int, side: str, qty: float, sl: float, tp: float) -> dict:
    """The order intent the risk guard makes of an approved signal."""
    return {"event_id": f"order:{intent_id(sig)}", "event_time": t, "symbol": sig["symbol"],
            "intent_id": intent_id(sig), "action": "OPEN", "side": side, "quantity": qty, "stop_loss": sl,
            "take_profit": tp, "leverage": 5}


def close_intent(symbol: str, position_intent: str, t: int) -> dict:
    iid = f"close:{position_intent}:drawdown"
    return {"event_id": f"order:{iid}", "event_time": t, "symbol": symbol, "intent_id": iid,
            "action": "CLOSE", "side": "SELL", "quantity": None, "stop_loss": None, "take_profit": None}


def approved(sig: dict) -> dict:
    return {"signal_id": sig["event_id"], "decision": sig["decision"], "verdict": "APPROVED", "violations": [],
            "intent_id": intent_id(sig)}


SIG1 = signal("BTCUSDT", T0, "LONG", 0.70)
SIG2 = signal("ETHUSDT", D2, "SHORT", 0.60)
SIG3 = signal("BTCUSDT", D3 + 7 * HOUR + 55 * 60_000, "LONG", 0.55)
FLAT = {**signal("BTCUSDT", T0 + BAR, "FLAT", 0.4), "flat_reason": "thresholds"}
PREDICTIONS = [{"event_id": SIG1["prediction_id"], "p_tp_long": 0.5}]
VERDICTS = [
    approved(SIG1), approved(SIG2), approved(SIG3),
    {"signal_id": "x1", "decision": "SHORT", "verdict": "REJECTED", "violations": ["liq_distance", "margin_usage"],
     "intent_id": None},
    {"signal_id": "x2", "decision": "LONG", "verdict": "REJECTED", "violations": ["liq_distance"], "intent_id": None},
    {"signal_id": FLAT["event_id"], "decision": "FLAT", "verdict": "APPROVED", "violations": [], "intent_id": None},
]


def run_three_trades() -> tuple[list[dict], list[dict]]:
    """Feed the paper exchange as its connector does (intents and settlements before the bars they precede)."""
    ex = paper()
    events: list[dict] = []
    bars: list[dict] = []

    def bar(k: dict) -> None:
        bars.append(k)
        events.extend(ex.bar(k))

    # day 1: long TP
    bar(kline("BTCUSDT", T0, 100, 100, 100, 100))
    ex.order(intent(SIG1, T0 + BAR - 1, "BUY", 10, sl=98, tp=104))
    bar(kline("BTCUSDT", T0 + BAR, 100, 101, 99.5, 100.5))  # fills at the open
    bar(kline("BTCUSDT", T0 + 2 * BAR, 101, 104.5, 100.8, 104))  # high ≥ 104: take-profit
    # day 2: short stopped, the stop gapped through
    bar(kline("ETHUSDT", D2, 2000, 2000, 2000, 2000))
    ex.order(intent(SIG2, D2 + BAR - 1, "SELL", 1, sl=2040, tp=1920))
    bar(kline("ETHUSDT", D2 + BAR, 2000, 2010, 1990, 2005))
    bar(kline("ETHUSDT", D2 + 2 * BAR, 2045, 2050, 2042, 2048))  # opens beyond the stop
    # day 3: long through the 08:00 funding, closed at market
    t8 = D3 + 8 * HOUR
    bar(kline("BTCUSDT", t8 - BAR, 110, 110, 110, 110))
    ex.order(intent(SIG3, t8 - 1, "BUY", 5, sl=100, tp=130))
    ex.funding({"symbol": "BTCUSDT", "funding_time": t8, "funding_rate": 0.0001, "mark_price": 110.0})
    bar(kline("BTCUSDT", t8, 110, 111, 109, 111))  # fills at 08:00, then the settlement at 08:00
    ex.order(close_intent("BTCUSDT", intent_id(SIG3), t8 + BAR - 1))
    bar(kline("BTCUSDT", t8 + BAR, 112, 113, 111.5, 112.5))  # closes at the open
    return events, bars


# ---- the hand computation ------------------------------------------------------------------------------------------
# trade 1: entry 100·1.0015 = 100.15, fee 10·100.15·0.0004 = 0.4006; TP exit 104·0.9985 = 103.844,
#   fee 10·103.844·0.0004 = 0.415376. gross 10·(104 − 100) = 40; slippage 10·0.15 + 10·0.156 = 3.06;
#   net 40 − 0.815976 − 3.06 = 36.124024. Entry bar and TP bar: 2 bars held.
E1, X1 = 100 * (1 + SLIP), 104 * (1 - SLIP)
FEES1 = 10 * E1 * FEE + 10 * X1 * FEE
NET1 = 36.124024
# trade 2: entry 2000·0.9985 = 1997, fee 0.7988; the stop is gapped: fill at the open 2045·1.0015 = 2048.0675,
#   fee 0.819227. Reference = the trigger 2040: gross −(2040 − 2000) = −40; slippage 3 + 8.0675 = 11.0675;
#   net −40 − 1.618027 − 11.0675 = −52.685527. 2 bars held.
E2, X2 = 2000 * (1 - SLIP), 2045 * (1 + SLIP)
FEES2 = E2 * FEE + X2 * FEE
NET2 = -52.685527
# trade 3: entry 110·1.0015 = 110.165, fee 5·110.165·0.0004 = 0.22033; funding −5·110·0.0001 = −0.055;
#   close 112·0.9985 = 111.832, fee 0.223664. gross 5·2 = 10; slippage 0.825 + 0.84 = 1.665;
#   net 10 − 0.443994 − 1.665 − 0.055 = 7.836006. Held through the 08:00 bar, closed at the next open: 1 bar.
E3, X3 = 110 * (1 + SLIP), 112 * (1 - SLIP)
FEES3 = 5 * E3 * FEE + 5 * X3 * FEE
NET3 = 7.836006
FINAL = 10_000 + NET1 + NET2 + NET3  # 9,991.274503
DATA_END = D3 + 8 * HOUR + 2 * BAR  # end of the last bar


@pytest.fixture(scope="module")
def run():
    events, bars = run_three_trades()
    ledger = accounting.reconstruct(events, bars, signals=[SIG1, SIG2, SIG3, FLAT], predictions=PREDICTIONS,
                                    verdicts=VERDICTS)
    return events, bars, ledger


def test_trades_are_reconstructed_with_their_pnl_split(run):
    _, _, ledger = run
    got = [(t.symbol, t.side, t.quantity, t.exit_kind, t.bars_held) for t in ledger.trades]
    assert got == [("BTCUSDT", "LONG", 10, "TP", 2), ("ETHUSDT", "SHORT", 1, "SL", 2),
                   ("BTCUSDT", "LONG", 5, "CLOSE", 1)]
    t1, t2, t3 = ledger.trades
    assert (t1.entry_time, t1.exit_time) == (T0 + BAR, T0 + 3 * BAR - 1)  # the TP is known at its bar's close
    assert (t3.entry_time, t3.exit_time) == (D3 + 8 * HOUR, D3 + 8 * HOUR + BAR)
    assert (t1.entry_price, t1.exit_price, t1.entry_reference, t1.exit_reference) == pytest.approx((E1, X1, 100, 104))
    assert (t2.entry_price, t2.exit_price, t2.entry_reference, t2.exit_reference) == pytest.approx(
        (E2, X2, 2000, 2040))
    assert (t3.entry_price, t3.exit_price, t3.entry_reference, t3.exit_reference) == pytest.approx((E3, X3, 110, 112))
    cent = dict(abs=0.005)
    assert (t1.gross_pnl, t1.fees, t1.slippage, t1.funding) == pytest.approx((40, 0.815976, 3.06, 0), **cent)
    assert (t2.gross_pnl, t2.fees, t2.slippage, t2.funding) == pytest.approx((-40, 1.618027, 11.0675, 0), **cent)
    assert (t3.gross_pnl, t3.fees, t3.slippage, t3.funding) == pytest.approx((10, 0.443994, 1.665, -0.055), **cent)
    assert [t.fees for t in ledger.trades] == pytest.approx([FEES1, FEES2, FEES3])
    assert [round(t.net_pnl, 6) for t in ledger.trades] == [NET1, NET2, NET3]
    # the predictions reach their trades through the deterministic ids
    assert [(t.signal_id, t.p_win) for t in ledger.trades] == [(SIG1["event_id"], 0.70), (SIG2["event_id"], 0.60),
                                                               (SIG3["event_id"], 0.55)]
    assert [t.p_tp for t in ledger.trades] == [0.5, None, None]
    # the order intents link them as well as the verdicts do
    orders = [{"intent_id": intent_id(s), "signal_id": s["event_id"]} for s in (SIG1, SIG2, SIG3)]
    by_orders = accounting.reconstruct(run[0], run[1], signals=[SIG1, SIG2, SIG3], orders=orders)
    assert [t.p_win for t in by_orders.trades] == [0.70, 0.60, 0.55]
    assert [t.p_win for t in accounting.reconstruct(run[0], run[1], signals=[SIG1]).trades] == [None] * 3


def test_initial_balance_plus_net_pnl_is_the_final_wallet_to_the_cent(run):
    events, _, ledger = run
    last_wallet = [e for e in events if e["event_type"] == "ACCOUNT_UPDATE"][-1]["balances"][0]["wallet_balance"]
    assert ledger.initial_balance == 10_000 and ledger.final_wallet == last_wallet
    total = ledger.initial_balance + sum(t.net_pnl for t in ledger.trades) + ledger.funding_outside_trades
    assert round(total, 2) == round(last_wallet, 2) == round(FINAL, 2)
    assert ledger.funding_outside_trades == 0
    assert ledger.equity["wallet"].iat[-1] == pytest.approx(last_wallet)


def test_equity_is_marked_to_market_between_fills(run):
    _, _, ledger = run
    eq = ledger.equity.set_index("time")
    # trade 1 after its entry bar: wallet − entry fee, long 10 marked at the close 100.5
    assert eq.loc[T0 + 2 * BAR - 1, "equity"] == pytest.approx(10_000 - 0.4006 + 10 * (100.5 - E1))
    assert eq.loc[T0 + 2 * BAR - 1, "exposure"] == pytest.approx(10 * 100.5)
    assert eq.loc[T0 + 2 * BAR - 1, "leverage"] == pytest.approx(1005 / (10_000 - 0.4006 + 10 * (100.5 - E1)))
    # the short after its entry bar: marked at 2005
    after1 = 10_000 + NET1
    assert eq.loc[D2 + 2 * BAR - 1, "equity"] == pytest.approx(after1 - E2 * FEE - (2005 - E2))
    # trade 3 at its entry instant: fee and funding paid, no close yet after the fill: marked at the fill
    after2 = after1 + NET2
    assert eq.loc[D3 + 8 * HOUR, "equity"] == pytest.approx(after2 - 5 * E3 * FEE - 0.055)
    assert eq.loc[D3 + 8 * HOUR, "positions"] == 1
    assert eq["positions"].iat[-1] == 0 and eq["equity"].iat[-1] == pytest.approx(FINAL)


def test_metrics_match_the_hand_computation(run):
    _, _, ledger = run
    m = metrics.compute(ledger)
    # daily closing equity: 10,036.124024 / 9,983.438497 / 9,991.274503 against 10,000 at the start
    e = [10_000, 10_000 + NET1, 10_000 + NET1 + NET2, FINAL]
    r = [e[i + 1] / e[i] - 1 for i in range(3)]  # +0.36124 %, −0.52496 %, +0.07849 %
    mean = sum(r) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in r) / 2)
    downside = math.sqrt((r[1] ** 2) / 3)  # one down day of three
    span_days = (DATA_END - T0) / DAY  # 2 days 8 h 10 min
    # the peak is trade 1's exit (10,036.124024 at 00:14:59.999 on day 1); the trough is trade 3's entry instant,
    # 9,983.438497 − 0.22033 − 0.055 = 9,983.163167; never recovered by the end
    trough = e[2] - 5 * E3 * FEE - 0.055
    expected = {
        "trades": 3, "days": 3, "exits": {"TP": 1, "SL": 1, "CLOSE": 1, "LIQUIDATION": 0},
        "total_return": FINAL / 10_000 - 1,
        "cagr": (FINAL / 10_000) ** (365 / span_days) - 1,
        "sharpe": mean / sd * math.sqrt(365),
        "sortino": mean / downside * math.sqrt(365),
        "max_drawdown": 1 - trough / e[1],
        "max_drawdown_duration_hours": (DATA_END - (T0 + 3 * BAR - 1)) / HOUR,
        "win_rate": 2 / 3,
        "profit_factor": (NET1 + NET3) / -NET2,
        "expectancy": (NET1 + NET2 + NET3) / 3,
        "avg_bars_held": 5 / 3,
        "avg_hold_hours": ((2 * BAR - 1) + (2 * BAR - 1) + BAR) / 3 / HOUR,
        "gross_pnl": 10.0, "fees": 0.815976 + 1.618027 + 0.443994, "slippage": 3.06 + 11.0675 + 1.665,
        "funding": -0.055, "net_pnl": NET1 + NET2 + NET3,
        # fill notionals: 1001.5 + 1038.44 + 1997 + 2048.0675 + 550.825 + 559.16
        "turnover": 7194.9925, "turnover_ratio": 0.71949925,
        "time_in_market": ((2 * BAR - 1) + (2 * BAR - 1) + BAR) / (DATA_END - T0),
    }
    for key, want in expected.items():
        assert m[key] == (pytest.approx(want, abs=1e-6) if isinstance(want, float) else want), key
    assert m["signals"] == {"total": 4, "long": 2, "short": 1, "flat": 1, "verdicts": 6, "approved_entries": 3,
                            "rejected": 2}
    assert m["rejected_by_reason"] == {"liq_distance": 2, "margin_usage": 1}
    assert m["flat_reasons"] == {"thresholds": 1}
    assert (m["data_start"], m["data_end"]) == ("2024-01-01T00:00:00Z", "2024-01-03T08:10:00Z")
    text = metrics.to_json(m)
    assert text == metrics.to_json(metrics.compute(ledger))  # deterministic
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert json.loads(text)["net_pnl"] == round(NET1 + NET2 + NET3, 8)


def test_a_liquidation_loses_the_isolated_margin_with_no_slippage():
    ex = paper()
    bars = [kline("BTCUSDT", T0, 100, 100, 100, 100), kline("BTCUSDT", T0 + BAR, 100, 100, 100, 100),
            kline("BTCUSDT", T0 + 2 * BAR, 100, 100, 70, 75)]
    events = ex.bar(bars[0])
    ex.order({"event_id": "o", "event_time": T0 + BAR - 1, "symbol": "BTCUSDT", "intent_id": "liq", "action": "OPEN",
              "side": "BUY", "quantity": 10, "stop_loss": 50.0, "take_profit": 200.0})
    events += ex.bar(bars[1]) + ex.bar(bars[2])  # 5x: the margin is gone ~20 % below the entry
    (t,) = accounting.reconstruct(events, bars).trades
    margin = 10 * E1 / 5  # 200.3: what the isolated position can lose
    assert (t.exit_kind, t.slippage) == (accounting.LIQUIDATION, pytest.approx(10 * E1 - 1000))  # the entry's only
    assert t.exit_price == pytest.approx(E1 - margin / 10)  # the bankruptcy price
    assert t.net_pnl == pytest.approx(-margin - 10 * E1 * FEE)  # margin and entry fee; no exit fee


def test_a_position_open_at_the_end_is_an_open_trade_marked_at_the_last_close():
    ex = paper()
    bars = [kline("BTCUSDT", T0, 100, 100, 100, 100), kline("BTCUSDT", T0 + BAR, 100, 101, 99, 101)]
    events = ex.bar(bars[0])
    ex.order({"event_id": "o", "event_time": T0 + BAR - 1, "symbol": "BTCUSDT", "intent_id": "o1", "action": "OPEN",
              "side": "BUY", "quantity": 2, "stop_loss": 90.0, "take_profit": 120.0})
    events += ex.bar(bars[1])
    ledger = accounting.reconstruct(events, bars)
    (t,) = ledger.trades
    assert (t.exit_kind, t.closed, t.bars_held) == (accounting.OPEN, False, 1)
    assert t.net_pnl == pytest.approx(2 * (101 - 100) - 2 * E1 * FEE - 2 * (E1 - 100))
    m = metrics.compute(ledger)
    assert (m["trades"], m["open_trades"], m["win_rate"]) == (0, 1, None)
    assert m["final_equity"] == pytest.approx(10_000 - 2 * E1 * FEE + 2 * (101 - E1))


def test_a_run_without_trades():
    bars = [kline("BTCUSDT", T0 + i * BAR, 100, 101, 99, 100) for i in range(3)]
    ledger = accounting.reconstruct([], bars, initial_balance=5_000)
    assert ledger.trades == [] and ledger.final_wallet == 5_000
    m = metrics.compute(ledger)
    assert (m["trades"], m["total_return"], m["max_drawdown"], m["win_rate"], m["profit_factor"]) == (
        0, 0.0, 0.0, None, None)
    assert (m["sharpe"], m["sortino"], m["days"], m["time_in_market"]) == (None, None, 1, 0.0)
    json.loads(metrics.to_json(m))
    html = report.render(ledger, m, title="empty run")
    assert "No trades in this run" in html
    assert_self_contained(html)


def assert_self_contained(html: str) -> None:
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # no external scripts, styles or images


def test_report_html_has_the_sections_and_the_trade_rows(run, tmp_path):
    _, _, ledger = run
    m = metrics.compute(ledger)
    path = report.write(tmp_path / "run1", ledger, m, title="three trades", parameters={"symbols": ["BTCUSDT"]})
    html = path.read_text()
    assert path.name == "report.html" and (tmp_path / "run1" / "metrics.json").read_text() == metrics.to_json(m)
    assert_self_contained(html)
    for section in ("Equity", "Drawdown", "Monthly returns", "PnL split", "Exposure and leverage", "Calibration",
                    "Rejected signals", "Trades"):
        assert f">{section}<" in html, section
    rows = re.findall(r'<tr class="trade">(.*?)</tr>', html, re.S)
    assert len(rows) == 3
    assert "BTCUSDT" in rows[0] and ">TP<" in rows[0] and "36.12" in rows[0]
    assert "ETHUSDT" in rows[1] and ">SL<" in rows[1] and "-52.69" in rows[1]
    assert ">CLOSE<" in rows[2] and "7.84" in rows[2]
    assert "liq_distance" in html and "margin_usage" in html
    assert html.count("<svg") >= 4
    assert "2024-01" in html  # the month of the monthly returns


def test_a_run_is_recorded_in_backtest_runs(run, store, tmp_path):
    from training.backtest import runs

    _, _, ledger = run
    m = metrics.compute(ledger)
    path = report.write(tmp_path / "r1", ledger, m)
    kw = dict(created_at=T0 + 3 * DAY, parameters={"interval": "5m", "fee": FEE}, model_ids=["long-a", "short-b"],
              symbols=["BTCUSDT", "ETHUSDT"], data_start=ledger.data_start, data_end=ledger.data_end,
              report_path=str(path))
    runs.record(store, "run-1", metrics=m, **kw)
    runs.record(store, "run-1", metrics={**m, "trades": 99}, **kw)  # recorded again: replaces the row
    (row,) = runs.rows(store)
    assert (row["run_id"], row["model_ids"], row["symbols"], row["report_path"]) == (
        "run-1", ["long-a", "short-b"], ["BTCUSDT", "ETHUSDT"], str(path))
    assert (row["created_at"], row["data_start"], row["data_end"]) == (T0 + 3 * DAY, T0, DATA_END)
    assert row["parameters"] == {"fee": FEE, "interval": "5m"}
    assert row["metrics"]["trades"] == 99 and row["metrics"]["net_pnl"] == round(NET1 + NET2 + NET3, 8)


def random_run(seed: int, bars_per_symbol: int = 3000) -> tuple[list[dict], list[dict]]:
    """Random walks on two symbols through the paper exchange at 50x: entries both ways, a fifth of them with a stop
    beyond the liquidation price, funding every 8 h, and now and then a CLOSE intent."""
    import random

    rng = random.Random(seed)
    ex = paper(leverage=50)
    events: list[dict] = []
    bars: list[dict] = []
    price = {"BTCUSDT": 100.0, "ETHUSDT": 2000.0}
    for i in range(bars_per_symbol):
        t = T0 + i * BAR
        for symbol in price:
            if t % (8 * HOUR) == 0:
                ex.funding({"symbol": symbol, "funding_time": t, "funding_rate": rng.uniform(-3e-4, 5e-4),
                            "mark_price": None})
            o = price[symbol]
            c = o * (1 + rng.gauss(0, 0.004))
            hi, lo = max(o, c) * (1 + abs(rng.gauss(0, 0.002))), min(o, c) * (1 - abs(rng.gauss(0, 0.002)))
            price[symbol] = c
            k = kline(symbol, t, o, hi, lo, c)
            bars.append(k)
            events += ex.bar(k)
            u = rng.random()
            if u < 0.03:
                side, sign = rng.choice([("BUY", 1), ("SELL", -1)])
                far = rng.random() < 0.2  # a stop beyond the liquidation price
                sl, tp = c * (1 - sign * (0.5 if far else 0.01)), c * (1 + sign * 0.02)
                ex.order({"event_id": f"o{i}{symbol}", "event_time": t + BAR - 1, "symbol": symbol,
                          "intent_id": f"open:{symbol}:{i}", "action": "OPEN", "side": side,
                          "quantity": 1000 / c, "stop_loss": sl, "take_profit": tp, "leverage": 50})
            elif u < 0.04:
                ex.order({"event_id": f"c{i}{symbol}", "event_time": t + BAR - 1, "symbol": symbol,
                          "intent_id": f"close:{symbol}:{i}", "action": "CLOSE", "side": "SELL", "quantity": None,
                          "stop_loss": None, "take_profit": None})
    return events, bars


@pytest.mark.parametrize("seed", [1, 2])
def test_random_paper_runs_keep_the_wallet_invariant(seed, tmp_path):
    events, bars = random_run(seed)
    ledger = accounting.reconstruct(events, bars)
    fills = [e for e in events if e["event_type"] == "ORDER_TRADE_UPDATE" and e["execution_type"] == "TRADE"
             and not e["reduce_only"]]
    assert len(ledger.trades) == len(fills) > 20
    assert {t.exit_kind for t in ledger.closed_trades} == {"TP", "SL", "CLOSE", "LIQUIDATION"}
    last = [e for e in events if e["event_type"] == "ACCOUNT_UPDATE"][-1]["balances"][0]["wallet_balance"]
    realized = sum(t.net_pnl for t in ledger.closed_trades) + ledger.funding_outside_trades
    still_open = sum(-t.fees + t.funding for t in ledger.trades if not t.closed)  # paid so far by an open one
    assert round(ledger.initial_balance + realized + still_open, 2) == round(last, 2)
    for t in ledger.closed_trades:  # each trade's own wallet effect: Σ realized profit − fees + funding
        assert t.gross_pnl - t.slippage == pytest.approx(t.direction * t.quantity * (t.exit_price - t.entry_price))
        if t.exit_kind == "LIQUIDATION":
            assert t.fees == pytest.approx(t.notional * FEE)  # the entry's only
    m = metrics.compute(ledger)
    assert m["exits"]["TP"] + m["exits"]["SL"] + m["exits"]["CLOSE"] + m["exits"]["LIQUIDATION"] == m["trades"]
    assert m["days"] == math.ceil(3000 * BAR / DAY) and 0 < m["time_in_market"] < 1
    html = report.render(ledger, m)
    assert len(re.findall(r'<tr class="trade">', html)) == len(ledger.trades)


def test_a_triggered_stop_filled_under_another_id_is_still_the_stop(run):
    """Binance may fill a triggered algo order as an order of its own id and type: the ALGO_UPDATE's actual order id
    ties the fill back to the stop and its trigger."""
    events, bars, _ = run
    sl_id = [e for e in events if e["event_type"] == "ALGO_UPDATE" and e["order_status"] == "TRIGGERED"
             and e["symbol"] == "ETHUSDT"][0]["client_order_id"]
    live = [e | {"client_order_id": "web_x1", "order_type": "MARKET"}
            if e["event_type"] == "ORDER_TRADE_UPDATE" and e["client_order_id"] == sl_id else e for e in events]
    t2 = accounting.reconstruct(live, bars).trades[1]
    assert (t2.exit_kind, t2.exit_reference, round(t2.net_pnl, 6)) == ("SL", 2040, NET2)
