"""EV, decision and sizing on hand-computed cases (close 100, ATR 1, k_tp 2, k_sl 1: tp 2 %, sl 1 %)."""

from __future__ import annotations

from decimal import Decimal

import numpy as np
import pytest

from connectors.binance.rules import Bracket, bundled_brackets, bundled_rules, isolated_liquidation_price
from streams.policy.ev import (
    CostModel,
    SizingRules,
    Thresholds,
    decide,
    leverage,
    p_win,
    settlements_within,
    side_ev,
    size,
)
from training.labels import LabelSpec

COST = CostModel()  # fee 4 bps + slippage 15 bps per fill


def ev(side, p_tp=0.5, p_sl=0.3, p_to=0.2, tr=0.005, hold=100, rate=0.0001, mtf=60.0):
    return side_ev(side, [p_tp], [p_sl], [p_to], [tr], [hold], [100.0], [1.0], [rate], [mtf], COST)


def test_cost_model_is_the_label_spec():
    spec = LabelSpec()
    assert (COST.k_tp, COST.k_sl, COST.fee, COST.slippage) == (spec.k_tp, spec.k_sl, spec.fee, spec.slippage)


def test_long_ev_by_hand():
    got = ev(+1)
    # gross 0.5·0.02 − 0.3·0.01 + 0.2·0.005 = 0.008; costs 0.0019 · (1 + 1.008); 1 settlement paid at 1 bp
    assert got["gross"][0] == pytest.approx(0.008)
    assert got["costs"][0] == pytest.approx(0.0019 * 2.008)
    assert got["funding"][0] == pytest.approx(0.0001)
    assert got["ev"][0] == pytest.approx(0.0040848)


def test_short_ev_by_hand_receives_positive_funding():
    got = ev(-1)
    # a short's exit notional after a +0.8 % gross is 0.992 of the entry: costs 0.0019 · 1.992; funding received
    assert got["costs"][0] == pytest.approx(0.0019 * 1.992)
    assert got["funding"][0] == pytest.approx(-0.0001)
    assert got["ev"][0] == pytest.approx(0.008 - 0.0037848 + 0.0001)


def test_funding_sign_follows_rate_and_side():
    assert ev(+1, rate=-0.0003)["funding"][0] == pytest.approx(-0.0003)  # a long receives a negative rate
    assert ev(-1, rate=-0.0003)["funding"][0] == pytest.approx(0.0003)  # a short pays it
    assert ev(+1, rate=float("nan"))["funding"][0] == 0.0


def test_settlements_expected_within_the_hold():
    got = settlements_within(np.array([10, 100, 108, 96, 12]), np.array([60, 60, 60, np.nan, 60]))
    # 50 min < 60 → 0; 500 min → 1; 540 min → 2 (60 and 540); unknown next settlement: 480/480 → 1; 60 min → 1
    np.testing.assert_allclose(got, [0, 1, 2, 1, 1])


def test_timeout_term():
    got = ev(+1, p_tp=0.0, p_sl=0.0, p_to=1.0, tr=0.01, rate=0.0)
    assert got["gross"][0] == pytest.approx(0.01)
    assert got["ev"][0] == pytest.approx(0.01 - 0.0019 * 2.01)
    assert ev(+1, p_tp=0, p_sl=0, p_to=1, tr=float("nan"), rate=0)["ev"][0] == pytest.approx(-0.0038)


def test_decision_thresholds():
    th = Thresholds(min_ev=0.0, min_pwin=0.55)
    got = decide([0.001, 0.0, 0.001, 0.002, 0.001, -0.1, 0.003, np.nan],
                 [-0.1, -0.1, -0.1, 0.003, 0.004, 0.001, 0.002, 0.001],
                 [0.6, 0.9, 0.55, 0.7, 0.7, 0.9, 0.5, 0.9],
                 [0.0, 0.0, 0.0, 0.7, 0.5, 0.6, 0.6, 0.6], th)
    # EV must exceed MIN_EV; P(win) ≥ MIN_PWIN is enough; both qualify → higher EV; a failing pwin never wins
    assert got.tolist() == ["LONG", "FLAT", "LONG", "SHORT", "LONG", "SHORT", "SHORT", "SHORT"]
    assert p_win([0.5], [0.3])[0] == pytest.approx(0.625)
    assert p_win([0.0], [0.0])[0] == 0.0


def test_leverage_from_volatility():
    got = leverage([100.0] * 5, [0.3, 0.1, 1.0, 0.4, np.nan], SizingRules())
    # 5 at the reference 0.3 %; 15 → 8; 1.5 → 2; 3.75 → 4; unknown → the default
    assert got.tolist() == [5, 8, 2, 4, 5]


def test_liquidation_price_worked_example():
    # long 1 BTC at 50,000, 5×: WB 10,000, first bracket (MMR 0.4 %, cum 0): (10,000 − 50,000) / (0.004 − 1)
    b1 = bundled_brackets()["BTCUSDT"][0]
    assert isolated_liquidation_price(1, 1.0, 50_000, 5, b1) == pytest.approx(40_000 / 0.996)
    # short 2 BTC (100,000 notional, second bracket: MMR 0.5 %, cum 50): (20,000 + 50 + 100,000) / (0.01 + 2)
    b2 = Bracket.for_notional(bundled_brackets()["BTCUSDT"], 100_000)
    assert (b2.mmr, b2.cum) == (0.005, 50.0)
    assert isolated_liquidation_price(-1, 2.0, 50_000, 5, b2) == pytest.approx(120_050 / 2.01)


def test_brackets_maintenance_amounts_are_continuous():
    for symbol, brackets in bundled_brackets().items():
        for prev, cur in zip(brackets, brackets[1:], strict=False):
            assert cur.floor == prev.cap
            assert cur.cum == pytest.approx(prev.cum + cur.floor * (cur.mmr - prev.mmr)), symbol


def test_size_rounds_to_tick_and_step():
    rules = bundled_rules()["BTCUSDT"]
    assert (rules.tick, rules.step) == (Decimal("0.10"), Decimal("0.001"))
    got = size(1, 50_000.04, 123.456, 5, rules, bundled_brackets()["BTCUSDT"], COST, SizingRules(risk_usdt=50))
    # entry 50,000.0; SL 49,876.584 → 49,876.6; TP 50,246.952 → 50,247.0; 50 / 123.4 = 0.4051… → 0.405
    assert (got.entry, got.stop_loss, got.take_profit, got.quantity) == (50_000.0, 49_876.6, 50_247.0, 0.405)
    assert got.notional == pytest.approx(20_250.0)
    assert got.liq_price == pytest.approx(16_200 / 0.40338)
    assert got.liq_distance_atr == pytest.approx((50_000 - 16_200 / 0.40338) / 123.456)
    short = size(-1, 50_000.04, 123.456, 5, rules, bundled_brackets()["BTCUSDT"], COST, SizingRules())
    assert (short.stop_loss, short.take_profit) == (50_123.5, 49_753.1)  # 50,123.496 and 49,753.128
    assert short.liq_price > short.stop_loss > short.entry


def test_size_respects_min_notional_and_small_ticks():
    eth = bundled_rules()["ETHUSDT"]
    sized = size(1, 2000.0, 10.0, 5, eth, bundled_brackets()["ETHUSDT"], COST, SizingRules(risk_usdt=0.1))
    assert sized.quantity == 0.01 and sized.notional == pytest.approx(20.0)  # exactly the 20 USDT minimum
    assert size(1, 2000.0, 10.0, 5, eth, bundled_brackets()["ETHUSDT"], COST,
                SizingRules(risk_usdt=0.09)) == "below_min_notional"  # 0.009 ETH = 18 USDT
    pepe = size(1, 0.0012345678, 0.00001, 5, bundled_rules()["1000PEPEUSDT"], bundled_brackets()["1000PEPEUSDT"],
                COST, SizingRules(risk_usdt=50))
    assert pepe.entry == pytest.approx(0.0012346) and pepe.stop_loss == pytest.approx(0.0012246)
    assert pepe.quantity == float(int(50 / 0.00001))  # whole contracts



def prediction(symbol="ETHUSDT", long=(0.6, 0.3, 0.1), short=(0.2, 0.7, 0.1), **extra) -> dict:
    p = {"event_id": f"prediction:{symbol}:5m:1", "event_time": 2, "symbol": symbol, "source": "stream",
         "interval": "5m", "open_time": 1, "model_id_long": "long-a", "model_id_short": "short-b", "close": 2000.0,
         "atr_14": 10.0, "funding_rate": 0.0, "minutes_to_funding": 100.0, "k_tp": 2.0, "k_sl": 1.0,
         "skip_reason": ""}
    for side, (tp, sl, timeout) in (("long", long), ("short", short)):
        p.update({f"p_tp_{side}": tp, f"p_sl_{side}": sl, f"p_timeout_{side}": timeout, f"hold_bars_{side}": 10.0,
                  f"mae_{side}": -0.004, f"timeout_return_{side}": 0.0,
                  f"top_features_{side}": [{"feature": "rsi_14", "value": 0.25}]})
    return {**p, **extra}


def test_policy_turns_each_prediction_into_one_sized_signal():
    from schemas.codec import default_codec
    from streams.policy.signals import Policy
    from streams.settings import Settings

    preds = [prediction(), prediction(long=(0.2, 0.7, 0.1), short=(0.6, 0.3, 0.1)),
             prediction(long=(0.3, 0.3, 0.4)), prediction(symbol="XYZUSDT")]
    long, short, flat, unknown = Policy(Settings(risk_per_trade_usdt=50)).signals(preds)
    # tp 1 %, sl 0.5 %: gross 0.6·0.01 − 0.3·0.005 = 0.0045, costs 0.0019 · 2.0045, no settlement within 50 min
    assert long["ev_long"] == pytest.approx(0.0045 - 0.0019 * 2.0045)
    assert (long["decision"], long["side"], long["p_win_long"]) == ("LONG", "BUY", pytest.approx(2 / 3))
    assert (long["entry_price"], long["stop_loss"], long["take_profit"]) == (2000.0, 1990.0, 2020.0)
    # 50 USDT at a 10 USDT stop: 5 ETH; ATR 0.5 % of the price: leverage round(5 · 0.3 / 0.5) = 3
    assert (long["quantity"], long["notional"], long["leverage"]) == (5.0, 10_000.0, 3)
    assert long["liq_price"] == pytest.approx((2000 / 3 - 2000) / (0.004 - 1))
    assert long["liq_distance_atr"] == pytest.approx((2000 - long["liq_price"]) / 10)
    assert long["confidence"] == pytest.approx(2 / 3) and long["prediction_id"] == preds[0]["event_id"]
    assert long["event_id"] == "signal:ETHUSDT:5m:0000000000001" and long["model_id_long"] == "long-a"
    assert (short["decision"], short["side"], short["stop_loss"], short["take_profit"]) == \
        ("SHORT", "SELL", 2010.0, 1980.0)
    assert (flat["decision"], flat["flat_reason"], flat["quantity"], flat["side"]) == ("FLAT", "thresholds", None, None)
    assert (unknown["decision"], unknown["flat_reason"]) == ("FLAT", "no_exchange_rules")
    assert any("rsi_14" in r for r in long["reasons"]) and any("EV +0.00069" in r for r in long["reasons"])
    codec = default_codec()
    for signal in (long, flat):  # what the agent sends is a valid `signals` record
        assert codec.decode(codec.encode("signal", signal))[1] == signal
    tiny = Policy(Settings(risk_per_trade_usdt=0.09)).signals([prediction()])[0]
    assert (tiny["decision"], tiny["flat_reason"]) == ("FLAT", "below_min_notional")


def test_a_bar_that_was_not_predicted_is_flat_for_its_reason_in_its_place():
    from schemas.codec import default_codec
    from streams.policy.signals import Policy
    from streams.predict.agent import skipped
    from streams.settings import Settings

    features = {"event_id": "features:ETHUSDT:5m:0000000000001", "event_time": 2, "symbol": "ETHUSDT",
                "source": "stream", "interval": "5m", "open_time": 1, "atr_14": None, "atr_pct": None,
                "funding_rate": 0.0001, "minutes_to_funding": 100.0}
    marker = skipped(features, "not_ready")
    codec = default_codec()
    assert codec.decode(codec.encode("prediction", marker))[1] == marker  # a valid `predictions` record
    assert (marker["skip_reason"], marker["model_id_long"], marker["p_tp_short"], marker["close"]) == \
        ("not_ready", "", 0.0, 0.0)
    later = prediction()
    early, made = Policy(Settings(risk_per_trade_usdt=50)).signals([marker, later])
    assert (early["decision"], early["flat_reason"], early["close"], early["prediction_id"]) == \
        ("FLAT", "not_ready", None, marker["event_id"])
    assert early["event_id"] == "signal:ETHUSDT:5m:0000000000001" and early["model_id_long"] == ""
    assert codec.decode(codec.encode("signal", early))[1] == early
    assert made["decision"] == "LONG"  # the predicted one after it is decided as if alone
