"""The paper exchange's engine on hand-computed cases: fills, fees, stop-first, gaps, funding, liquidation."""

from __future__ import annotations

import pytest

from connectors.binance.execution import client_ids
from connectors.binance.rules import Bracket, bundled_brackets, isolated_liquidation_price
from connectors.paper.engine import PaperConfig, PaperExchange, liquidation_price, maintenance

T0 = 1_700_000_100_000 - 1_700_000_100_000 % 300_000
FEE, SLIP = 0.0004, 0.001  # 10 bps


def bar(i: int, o: float, h: float, low: float, c: float, symbol: str = "BTCUSDT") -> dict:
    return {"symbol": symbol, "open_time": T0 + i * 300_000, "close_time": T0 + i * 300_000 + 299_999,
            "open": o, "high": h, "low": low, "close": c}


def order(intent: str, t: int, side: str = "BUY", qty: float = 10.0, sl: float | None = 98.0,
          tp: float | None = 104.0, action: str = "OPEN", symbol: str = "BTCUSDT") -> dict:
    return {"event_id": f"order:{intent}", "event_time": t, "symbol": symbol, "intent_id": intent, "action": action,
            "side": side, "quantity": qty, "stop_loss": sl, "take_profit": tp, "source": "test"}


def exchange(**kw) -> PaperExchange:
    return PaperExchange(PaperConfig(taker_fee=FEE, slippage_bps=SLIP * 10_000, leverage=5,
                                     initial_balance=kw.pop("balance", 10_000.0), **kw))


def kinds(events: list[dict]) -> list[tuple]:
    return [(e["event_type"], e["client_order_id"], e["execution_type"] or e["order_status"] or e["reason"])
            for e in events]


def opened(ex: PaperExchange, side: str = "BUY", **kw) -> list[dict]:
    ex.bar(bar(0, 100, 100, 100, 100))
    assert ex.order(order("i1", T0 + 299_999, side, **kw)) == []  # waits for the next bar's open
    return ex.bar(bar(1, 100, 101, 99.5, 100.5))


def test_entry_fills_at_the_next_open_with_slippage_fee_and_protective_orders():
    ex = exchange()
    events = opened(ex)
    ids = client_ids("i1")
    assert kinds(events) == [("ORDER_TRADE_UPDATE", ids["entry"], "NEW"), ("ORDER_TRADE_UPDATE", ids["entry"], "TRADE"),
                             ("ACCOUNT_UPDATE", None, "ORDER"), ("ALGO_UPDATE", ids["sl"], "NEW"),
                             ("ALGO_UPDATE", ids["tp"], "NEW")]
    fill, account, sl, tp = events[1], events[2], events[3], events[4]
    assert fill["last_filled_price"] == pytest.approx(100.1) and fill["filled_qty"] == 10.0
    assert fill["commission"] == pytest.approx(0.4004) and fill["trade_time"] == T0 + 300_000
    assert account["balances"][0]["wallet_balance"] == pytest.approx(10_000 - 0.4004)
    p = account["positions"][0]
    assert (p["position_amount"], p["entry_price"], p["isolated_wallet"]) == pytest.approx((10, 100.1, 200.2))
    assert (sl["order_type"], sl["stop_price"], sl["side"]) == ("STOP_MARKET", 98.0, "SELL")
    assert (tp["order_type"], tp["stop_price"], tp["working_type"]) == ("TAKE_PROFIT_MARKET", 104.0, "MARK_PRICE")
    assert all(e["source"] == "paper" for e in events)
    assert len({e["event_id"] for e in events}) == len(events)


def test_a_bar_touching_both_fires_the_stop_loss_and_cancels_the_take_profit():
    ex = exchange()
    opened(ex)
    events = ex.bar(bar(2, 100, 105, 97.5, 101))
    ids = client_ids("i1")
    assert kinds(events) == [("ALGO_UPDATE", ids["sl"], "TRIGGERED"), ("ORDER_TRADE_UPDATE", ids["sl"], "NEW"),
                             ("ORDER_TRADE_UPDATE", ids["sl"], "TRADE"), ("ACCOUNT_UPDATE", None, "ORDER"),
                             ("ALGO_UPDATE", ids["sl"], "FINISHED"), ("ALGO_UPDATE", ids["tp"], "CANCELED")]
    fill = events[2]
    assert fill["last_filled_price"] == pytest.approx(98 * 0.999)  # at the stop, slipped
    assert fill["realized_profit"] == pytest.approx(10 * (97.902 - 100.1))
    assert fill["commission"] == pytest.approx(10 * 97.902 * FEE)
    assert events[3]["positions"][0]["position_amount"] == 0
    assert ex.state.balance == pytest.approx(10_000 - 0.4004 - 21.98 - 0.391608)
    assert ex.bar(bar(3, 90, 110, 80, 100)) == []  # nothing left to trigger


def test_a_stop_gapped_through_fills_at_the_open():
    ex = exchange()
    opened(ex)
    fill = ex.bar(bar(2, 97, 97.5, 96.5, 97))[2]
    assert fill["last_filled_price"] == pytest.approx(97 * 0.999)


def test_take_profit_fills_at_its_trigger_and_cancels_the_stop_loss():
    ex = exchange()
    opened(ex)
    events = ex.bar(bar(2, 100, 104.5, 99, 104))
    ids = client_ids("i1")
    assert [k[1:] for k in kinds(events)] == [(ids["tp"], "TRIGGERED"), (ids["tp"], "NEW"), (ids["tp"], "TRADE"),
                                               (None, "ORDER"), (ids["tp"], "FINISHED"), (ids["sl"], "CANCELED")]
    assert events[2]["last_filled_price"] == pytest.approx(104 * 0.999)
    assert events[2]["realized_profit"] == pytest.approx(10 * (103.896 - 100.1))


def test_a_short_stops_on_the_high():
    ex = exchange()
    opened(ex, "SELL", sl=102.0, tp=96.0)
    fill = ex.bar(bar(2, 100, 103, 95, 100))[2]  # both touched: the stop
    assert (fill["side"], fill["last_filled_price"]) == ("BUY", pytest.approx(102 * 1.001))
    assert fill["realized_profit"] == pytest.approx(-10 * (102.102 - 99.9))


@pytest.mark.parametrize("side,rate,expected", [("BUY", 0.0001, -0.1), ("SELL", 0.0001, 0.1),
                                                ("BUY", -0.0002, 0.2)])
def test_funding_sign_for_long_and_short(side, rate, expected):
    ex = exchange()
    opened(ex, side, sl=None, tp=None)
    before = ex.state.balance
    t = T0 + 2 * 300_000
    assert ex.funding({"symbol": "BTCUSDT", "funding_time": t, "funding_rate": rate, "mark_price": 100.0}) == []
    events = ex.bar(bar(2, 100, 100.2, 99.8, 100))  # settles at its open, the settlement time
    assert kinds(events) == [("ACCOUNT_UPDATE", None, "FUNDING_FEE")]
    assert events[0]["event_time"] == t
    assert events[0]["balances"][0]["balance_change"] == pytest.approx(expected)
    assert ex.state.balance == pytest.approx(before + expected)
    margin = 10 * (100.1 if side == "BUY" else 99.9) / 5
    assert events[0]["positions"][0]["isolated_wallet"] == pytest.approx(margin + expected)


def test_liquidation_price_matches_binances_isolated_formula():
    # 1 BTC at 50,000, 5x isolated: wallet 10,000; notional 50,000 → bracket MMR 0.5 %, cum 50
    tiers = [Bracket(0, 50_000, 0.004, 0), Bracket(50_000, 250_000, 0.005, 50)]
    assert maintenance({"BTCUSDT": tiers}, "BTCUSDT", 50_000) == (0.005, 50)
    assert liquidation_price(1, 1.0, 50_000, 10_000, 0.005, 50) == pytest.approx(39_950 / 0.995)  # 40,150.75
    assert liquidation_price(-1, 1.0, 50_000, 10_000, 0.005, 50) == pytest.approx(60_050 / 1.005)  # 59,751.24


@pytest.mark.parametrize("symbol, entry, qty", [("ETHUSDT", 2_000.0, 30.0), ("1000PEPEUSDT", 0.001, 8_000_000.0),
                                                ("BTCUSDT", 40_000.0, 0.5)])
def test_the_paper_exchange_liquidates_on_the_tiers_the_policy_checks(symbol, entry, qty):
    # one bracket table in the system: the policy's ≥ 2 ATR liquidation check and the paper exchange agree
    ex = PaperExchange(PaperConfig(taker_fee=FEE, slippage_bps=0, leverage=5, initial_balance=1_000_000))
    ex.bar(bar(0, entry, entry, entry, entry, symbol))
    ex.order(order("same", T0 + 299_999, qty=qty, sl=entry * 0.5, tp=entry * 2, symbol=symbol))
    ex.bar(bar(1, entry, entry, entry, entry, symbol))
    policy_view = isolated_liquidation_price(1, qty, entry, 5, Bracket.for_notional(bundled_brackets()[symbol],
                                                                                  qty * entry))
    assert ex.liquidation_price(symbol) == pytest.approx(policy_view)


def test_a_symbol_without_brackets_takes_the_most_conservative_tiers():
    tiers = {"A": [Bracket(0, 1e9, 0.004, 0)], "B": [Bracket(0, 1e9, 0.01, 0)]}
    assert maintenance(tiers, "UNKNOWNUSDT", 1_000) == (0.01, 0)


def test_liquidation_before_a_far_stop_loses_the_isolated_margin():
    ex = PaperExchange(PaperConfig(taker_fee=FEE, slippage_bps=0, leverage=5, initial_balance=100_000))
    ex.bar(bar(0, 50_000, 50_000, 50_000, 50_000))
    ex.order(order("liq", T0 + 299_999, qty=1.0, sl=39_000.0, tp=60_000.0))
    ex.bar(bar(1, 50_000, 50_100, 49_900, 50_000))
    assert ex.liquidation_price("BTCUSDT") == pytest.approx(40_150.7537, abs=1e-3)
    assert ex.bar(bar(2, 45_000, 45_000, 40_200, 41_000)) == []  # above the liquidation price
    events = ex.bar(bar(3, 41_000, 41_000, 40_100, 40_500))
    ids = client_ids("liq")
    assert [(e["event_type"], e["order_type"], e["execution_type"] or e["order_status"] or e["reason"])
            for e in events] == [("ORDER_TRADE_UPDATE", "LIQUIDATION", "NEW"),
                                 ("ORDER_TRADE_UPDATE", "LIQUIDATION", "CALCULATED"),
                                 ("ACCOUNT_UPDATE", None, "ORDER"), ("ALGO_UPDATE", "STOP_MARKET", "CANCELED"),
                                 ("ALGO_UPDATE", "TAKE_PROFIT_MARKET", "CANCELED")]
    assert events[0]["client_order_id"].startswith("autoclose-")
    assert events[1]["last_filled_price"] == pytest.approx(40_000)  # the bankruptcy price
    assert events[1]["realized_profit"] == pytest.approx(-10_000)
    assert [e["client_order_id"] for e in events[3:]] == [ids["sl"], ids["tp"]]
    assert ex.state.balance == pytest.approx(100_000 - 50_000 * FEE - 10_000)


def test_a_duplicated_order_opens_one_position_and_a_close_without_one_expires():
    ex = exchange()
    ex.bar(bar(0, 100, 100, 100, 100))
    ex.order(order("dup", T0 + 299_999))
    ex.order(order("dup", T0 + 299_999))
    ex.order(order("other", T0 + 299_999))  # a second position in the symbol is refused
    events = ex.bar(bar(1, 100, 101, 99.5, 100.5))
    trades = [e for e in events if e["execution_type"] == "TRADE"]
    assert len(trades) == 1 and ex.state.positions["BTCUSDT"].amount == 10
    assert [e["order_status"] for e in events if e["client_order_id"] == client_ids("other")["entry"]] == ["EXPIRED"]

    flat = exchange()
    flat.bar(bar(0, 100, 100, 100, 100))
    flat.order(order("close", T0 + 299_999, action="CLOSE", qty=0.0))
    events = flat.bar(bar(1, 100, 101, 99.5, 100.5))
    assert kinds(events) == [("ORDER_TRADE_UPDATE", client_ids("close")["close"], "EXPIRED")]
    assert events[0]["reduce_only"] is True and flat.state.balance == 10_000 and not flat.state.positions


def test_close_intent_exits_at_the_next_open_and_cancels_both_protective_orders():
    ex = exchange()
    opened(ex)
    ex.order(order("bye", T0 + 2 * 300_000 - 1, action="CLOSE", qty=0.0))
    events = ex.bar(bar(2, 101, 101.5, 100.5, 101))
    ids, close = client_ids("i1"), client_ids("bye")["close"]
    assert [k[1:] for k in kinds(events)] == [(close, "NEW"), (close, "TRADE"), (None, "ORDER"),
                                               (ids["sl"], "CANCELED"), (ids["tp"], "CANCELED")]
    assert events[1]["last_filled_price"] == pytest.approx(101 * 0.999)


def test_state_survives_a_restart_and_replayed_input_changes_nothing():
    bars = [bar(2, 100, 100.5, 99.5, 100), bar(3, 100, 104.5, 99, 104)]
    straight = exchange()
    opened(straight)
    expected = [e for b in bars for e in straight.bar(b)]

    first = exchange()
    opened(first)
    restarted = PaperExchange.loads(first.dumps(), first.config)
    # input read again after the restart (at-least-once) is recognised and ignored
    assert restarted.order(order("i1", T0 + 299_999)) == [] and restarted.bar(bar(1, 100, 101, 99.5, 100.5)) == []
    assert [e for b in bars for e in restarted.bar(b)] == expected and len(expected) == 6
    assert restarted.state.balance == pytest.approx(straight.state.balance)


def test_exits_match_the_labels_on_random_bars():
    """Parity with `training/labels.py`: with no fee or slippage and each bar opening at the previous close,
    an entry at the bar after t with the labels' barriers exits where, when and how the label says."""
    import numpy as np

    from training.labels import SL, TP, Bars, LabelSpec, Settlements, label_side

    rng = np.random.default_rng(7)
    n = 400
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.004, n)))
    open_ = np.concatenate([[100.0], close[:-1]])
    jump = rng.random(n) < 0.1  # some gaps: bars opening away from the previous close
    open_[jump] *= 1 + rng.normal(0, 0.01, jump.sum())
    high = np.maximum(open_, close) * (1 + rng.exponential(0.006, n))
    low = np.minimum(open_, close) * (1 - rng.exponential(0.006, n))
    times = T0 + np.arange(n) * 300_000
    bars = Bars.on_grid(times, open_, high, low, close, np.full(n, 0.5))
    spec = LabelSpec(k_tp=2, k_sl=1, horizon=48, fee=0, slippage=0)
    checked, both, gapped = 0, 0, 0
    for side, name in ((1, "BUY"), (-1, "SELL")):
        labels = label_side(bars, Settlements.none(), side, spec)
        for i in range(0, n - 60, 7):
            row = np.flatnonzero(labels["open_time"] == times[i])
            if not len(row) or labels["outcome"][row[0]] not in (TP, SL) or jump[i + 1]:
                continue  # the labels enter at the close: compare where the next bar opens there
            r = row[0]
            entry = close[i]
            ex = PaperExchange(PaperConfig(taker_fee=0, slippage_bps=0, leverage=1, initial_balance=1e9))
            ex.order(order(f"p{i}", int(times[i]) + 299_999, name, qty=1.0, sl=entry - side * 0.5,
                           tp=entry + side * 1.0))
            for j in range(i + 1, n):
                events = ex.bar(bar(j, open_[j], high[j], low[j], close[j]))
                fills = [e for e in events if e["execution_type"] == "TRADE" and e["reduce_only"]]
                if fills:
                    break
            kind = "STOP_MARKET" if labels["outcome"][r] == SL else "TAKE_PROFIT_MARKET"
            assert (fills[0]["order_type"], j - i) == (kind, labels["bars_held"][r]), (side, i)
            assert fills[0]["last_filled_price"] == pytest.approx(labels["exit_price"][r])
            checked += 1
            stop, target = entry - side * 0.5, entry + side * 1.0
            adverse, favourable = (low[j], high[j]) if side > 0 else (high[j], low[j])
            both += side * adverse <= side * stop and side * favourable >= side * target
            gapped += kind == "STOP_MARKET" and side * open_[j] < side * stop
    assert checked > 40 and both and gapped  # the sample holds both-touch bars and gaps through the stop
