"""The policy: `predictions` → `signals`, exactly one per prediction (FLAT included; a bar that was not
predicted, `skip_reason`, is FLAT with that reason).

It runs in the predict agent's micro-batch (`streams.predict.agent`), on the very prediction records that agent
publishes, and the signals leave with them: a signal follows from its prediction alone, so a policy agent of its own,
reading the predictions back from the broker, only added a hop to every bar's path (~6 ms at p50 of the chain's
33-38 at live pacing, measured by the chain benchmark).

The EV, the decision and the sizing are `streams.policy.ev`, vectorized over the micro-batch; the prediction
carries what they need from its features record (close, ATR, funding rate, minutes to funding) and the barriers
of the models' label spec, so no join. Fee and slippage come from the settings, whose defaults are the label
spec's; tick/step rounding and liquidation use the bundled exchangeInfo and leverage-bracket snapshots.
A signal is a proposal: the risk agent has the last word and turns approved ones into orders."""

from __future__ import annotations

import numpy as np

from connectors.binance.rules import exchange_rules, leverage_brackets
from schemas import event_ids
from streams import metrics
from streams.policy import ev
from streams.settings import Settings

ORDER_SIDE = {ev.LONG: "BUY", ev.SHORT: "SELL"}


def _col(records: list[dict], name: str) -> np.ndarray:
    return np.array([np.nan if r[name] is None else r[name] for r in records], dtype=np.float64)


class Policy:
    """Predictions → signals, one each, in order: what the predict agent runs on every micro-batch."""

    def __init__(self, settings: Settings) -> None:
        self.thresholds = ev.Thresholds(settings.min_ev, settings.min_pwin)
        self.sizing = ev.SizingRules(settings.risk_per_trade_usdt, settings.leverage_min, settings.leverage_max,
                                     settings.leverage_default, settings.leverage_ref_atr_pct)
        self.fee, self.slippage = settings.fee, settings.slippage
        # the bundled snapshots overlaid by `perpflow rules import`: one table, as the risk agent's
        self.rules, self.brackets = exchange_rules(settings.home_dir), leverage_brackets(settings.home_dir)
        for decision in (ev.LONG, ev.SHORT, ev.FLAT):
            metrics.SIGNALS.labels(decision)
        for side in ("long", "short"):
            metrics.SIGNAL_EV.labels(side)

    def signals(self, preds: list[dict]) -> list[dict]:
        """One signal per prediction, in order; a bar that was not predicted (`skip_reason`) is FLAT for it."""
        made = iter(self._decide([p for p in preds if not p["skip_reason"]]))
        out = [_not_predicted(p) if p["skip_reason"] else next(made) for p in preds]
        for signal in out:
            metrics.SIGNALS.labels(signal["decision"]).inc()
        return out

    def _decide(self, preds: list[dict]) -> list[dict]:
        if not preds:
            return []
        close, atr, rate, mtf = (_col(preds, n) for n in ("close", "atr_14", "funding_rate", "minutes_to_funding"))
        # one batch may straddle a promotion to a model of another label spec: barriers per row
        cost = ev.CostModel(_col(preds, "k_tp"), _col(preds, "k_sl"), self.fee, self.slippage)
        evs, pwin = {}, {}
        for side, sign in (("long", 1), ("short", -1)):
            evs[side] = ev.side_ev(sign, *(_col(preds, f"{n}_{side}") for n in (
                "p_tp", "p_sl", "p_timeout", "timeout_return", "hold_bars")), close, atr, rate, mtf, cost)
            pwin[side] = ev.p_win(_col(preds, f"p_tp_{side}"), _col(preds, f"p_sl_{side}"))
        decisions = ev.decide(evs["long"]["ev"], evs["short"]["ev"], pwin["long"], pwin["short"], self.thresholds)
        lev = ev.leverage(close, atr, self.sizing)
        out = []
        for i, p in enumerate(preds):
            decision = str(decisions[i])
            best = "long" if evs["long"]["ev"][i] >= evs["short"]["ev"][i] else "short"
            side = decision.lower() if decision != ev.FLAT else best
            signal = {
                "event_id": event_ids.signal(p["symbol"], p["interval"], p["open_time"]),
                "event_time": p["event_time"], "symbol": p["symbol"], "source": p["source"],
                "interval": p["interval"], "open_time": p["open_time"], "prediction_id": p["event_id"],
                "model_id_long": p["model_id_long"], "model_id_short": p["model_id_short"],
                "ev_long": float(evs["long"]["ev"][i]), "ev_short": float(evs["short"]["ev"][i]),
                "p_win_long": float(pwin["long"][i]), "p_win_short": float(pwin["short"][i]),
                "confidence": float(pwin[side][i]), "close": p["close"], "atr_14": p["atr_14"],
                "funding_rate": p["funding_rate"],
                "decision": ev.FLAT, "side": None, "flat_reason": "", "entry_price": None, "stop_loss": None,
                "take_profit": None, "quantity": None, "notional": None, "leverage": None, "liq_price": None,
                "liq_distance_atr": None,
                "reasons": self._reasons(p, evs, pwin, i, side)}
            if decision == ev.FLAT:
                signal["flat_reason"] = "thresholds"
            else:
                self._size(signal, decision, p, float(close[i]), float(atr[i]), int(lev[i]), cost, i)
            for s in ("long", "short"):
                if np.isfinite(evs[s]["ev"][i]):
                    metrics.SIGNAL_EV.labels(s).observe(evs[s]["ev"][i])
            out.append(signal)
        return out

    def _size(self, signal: dict, decision: str, p: dict, close: float, atr: float, lev: int,
              cost: ev.CostModel, i: int) -> None:
        rules, brackets = self.rules.get(p["symbol"]), self.brackets.get(p["symbol"])
        if rules is None or brackets is None:
            signal["flat_reason"] = "no_exchange_rules"
            return
        if not rules.trading:  # delisted, settling, not yet listed: no entries
            signal["flat_reason"] = "symbol_not_trading"
            return
        row_cost = ev.CostModel(float(cost.k_tp[i]), float(cost.k_sl[i]), cost.fee, cost.slippage)
        sized = ev.size(ev.SIDE[decision], close, atr, lev, rules, brackets, row_cost, self.sizing)
        if isinstance(sized, str):
            signal["flat_reason"] = sized
            return
        signal.update({"decision": decision, "side": ORDER_SIDE[decision], "entry_price": sized.entry,
                       "stop_loss": sized.stop_loss, "take_profit": sized.take_profit, "quantity": sized.quantity,
                       "notional": sized.notional, "leverage": sized.leverage, "liq_price": sized.liq_price,
                       "liq_distance_atr": sized.liq_distance_atr})

    @staticmethod
    def _reasons(p: dict, evs: dict, pwin: dict, i: int, side: str) -> list[str]:
        out = []
        for s in ("long", "short"):
            e = evs[s]
            out.append(f"{s}: EV {e['ev'][i]:+.5f} = gross {e['gross'][i]:+.5f} - costs {e['costs'][i]:.5f} "
                       f"- funding {e['funding'][i]:+.6f} ({e['settlements'][i]:g} settlements); "
                       f"P(TP) {p[f'p_tp_{s}']:.3f} P(SL) {p[f'p_sl_{s}']:.3f} P(timeout) {p[f'p_timeout_{s}']:.3f} "
                       f"P(win) {pwin[s][i]:.3f}")
        top = ", ".join(f"{c['feature']} {c['value']:+.3f}" for c in p[f"top_features_{side}"][:3])
        out.append(f"top features ({side}): {top}")
        return out


def _not_predicted(p: dict) -> dict:
    return {"event_id": event_ids.signal(p["symbol"], p["interval"], p["open_time"]),
            "event_time": p["event_time"], "symbol": p["symbol"], "source": p["source"], "interval": p["interval"],
            "open_time": p["open_time"], "prediction_id": p["event_id"], "model_id_long": "", "model_id_short": "",
            "ev_long": 0.0, "ev_short": 0.0, "p_win_long": 0.0, "p_win_short": 0.0, "confidence": 0.0,
            "close": p["close"] or None, "atr_14": p["atr_14"], "funding_rate": p["funding_rate"],
            "decision": ev.FLAT, "side": None, "flat_reason": p["skip_reason"], "entry_price": None,
            "stop_loss": None, "take_profit": None, "quantity": None, "notional": None, "leverage": None,
            "liq_price": None, "liq_distance_atr": None, "reasons": [f"not predicted: {p['skip_reason']}"]}

