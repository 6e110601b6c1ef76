"""The paper exchange's matching and margin engine: pure and deterministic, no Kafka inside.

Fed bars, funding settlements and order intents (by the worker's risk agent, `streams/risk/paper_desk.py`, in
event time: each bar just before the signal of that bar is decided); answers with
`user.events` records built by the live user-data stream's own parsers from Binance-shaped payloads, so
paper and live events cannot drift apart.

Fill model (event time, the labels' rules):
- a market order at event time t fills at the open of the symbol's first bar processed after it arrived
  whose open time is ≥ t, moved against the order by the slippage;
- the stop-loss and take-profit trigger on the bars' low/high (the bars stand in for the mark price); a bar
  touching both fires the stop-loss (as `training/labels.py`); a stop gapped through fills at the bar's
  open, a take-profit at its trigger; the fired one finishes and its sibling is cancelled;
- every fill pays the taker fee; funding settles on an open position at each `md.funding` settlement
  (amount = −position amount × mark × rate, so a long pays a positive rate) from the isolated margin;
- isolated margin = entry notional / leverage; liquidation price (one-way, isolated) as Binance computes it,
  LP = (WB + cum − side·|q|·EP) / (|q|·MMR − side·|q|) with WB the isolated wallet, MMR/cum from the bracket
  of the position's notional; a bar reaching LP before the stop liquidates the position at its bankruptcy
  price: the isolated margin is lost.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from connectors.binance.execution import client_ids
from connectors.binance.rules import Bracket, bundled_brackets
from connectors.binance.user_stream import PARSERS

ASSET = "USDT"


@dataclass(frozen=True)
class PaperConfig:
    taker_fee: float = 0.0004  # per fill, as the labels' LabelSpec.fee
    slippage_bps: float = 15.0  # per market fill, against the order (LabelSpec.slippage = 15 bps)
    leverage: int = 5
    initial_balance: float = 10_000.0


def maintenance(brackets: dict[str, list[Bracket]], symbol: str, notional: float) -> tuple[float, float]:
    """(maintenance margin rate, maintenance amount `cum`) of the bracket holding this notional: the same table the
    policy and the risk guard check liquidation on. A symbol without brackets takes the most conservative known
    (the highest first-tier rate): a paper position should never outlive the real one."""
    tiers = brackets.get(symbol) or max(brackets.values(), key=lambda t: t[0].mmr)
    bracket = Bracket.for_notional(tiers, notional)
    return bracket.mmr, bracket.cum


def liquidation_price(side: int, qty: float, entry: float, wallet: float, mmr: float, cum: float) -> float:
    """Binance's isolated one-way liquidation price (side +1 long, −1 short; qty > 0)."""
    return (wallet + cum - side * qty * entry) / (qty * mmr - side * qty)


def _id(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def _s(x: float) -> str:
    return repr(float(x))


@dataclass
class Position:
    amount: float  # signed: > 0 long
    entry: float
    wallet: float  # isolated margin
    intent_id: str
    stop_loss: float | None
    take_profit: float | None
    realized: float = 0.0


def _legs(pos: Position) -> list[tuple[str, str, float]]:
    """The protective orders of a position: (leg, order type, trigger price)."""
    return [(leg, kind, trigger) for leg, kind, trigger in (("sl", "STOP_MARKET", pos.stop_loss),
                                                             ("tp", "TAKE_PROFIT_MARKET", pos.take_profit))
            if trigger is not None]


@dataclass
class PaperState:
    balance: float
    positions: dict[str, Position] = field(default_factory=dict)
    pending: dict[str, list[dict]] = field(default_factory=dict)  # symbol → order intents waiting for a bar
    funding: dict[str, list[dict]] = field(default_factory=dict)  # symbol → settlements waiting for a bar
    seen: list[str] = field(default_factory=list)  # intent ids handled (a duplicate is ignored)
    last_bar: dict[str, int] = field(default_factory=dict)  # symbol → open time of the last bar processed
    last_close: dict[str, float] = field(default_factory=dict)
    last_funding: dict[str, int] = field(default_factory=dict)  # symbol → the newest settlement time taken


class PaperExchange:
    def __init__(self, config: PaperConfig | None = None, brackets: dict[str, list[Bracket]] | None = None,
                 state: PaperState | None = None):
        self.config = config or PaperConfig()
        self.brackets = brackets or bundled_brackets()
        self.state = state or PaperState(balance=self.config.initial_balance)
        self._seen = set(self.state.seen)

    # -- persistence ---------------------------------------------------------------------------
    def dumps(self) -> str:
        return json.dumps(asdict(self.state), sort_keys=True)

    @classmethod
    def loads(cls, text: str, config: PaperConfig | None = None,
              brackets: dict[str, list[Bracket]] | None = None) -> PaperExchange:
        raw = json.loads(text)
        raw["positions"] = {s: Position(**p) for s, p in raw["positions"].items()}
        return cls(config, brackets, PaperState(**raw))

    # -- inputs --------------------------------------------------------------------------------
    def order(self, order: dict) -> list[dict]:
        """Accept an intent; it fills at the next bar. A duplicate intent id is ignored: no second position."""
        intent = order["intent_id"] or order["event_id"]
        if intent in self._seen:
            return []
        self._seen.add(intent)
        self.state.seen.append(intent)
        self.state.pending.setdefault(order["symbol"], []).append(
            {k: order.get(k) for k in ("event_time", "symbol", "action", "side", "quantity", "stop_loss",
                                       "take_profit", "leverage")} | {"intent_id": intent})
        return []

    def funding(self, rec: dict) -> list[dict]:
        symbol, t = rec["symbol"], rec["funding_time"]
        if t <= self.state.last_funding.get(symbol, -1):  # a settlement taken already (input delivered again)
            return []
        self.state.last_funding[symbol] = t
        if t <= self.state.last_bar.get(symbol, -1):  # arrived after its bar: settle on the position now
            return self._settle(symbol, rec)
        self.state.funding.setdefault(symbol, []).append(
            {"funding_time": t, "funding_rate": rec["funding_rate"], "mark_price": rec.get("mark_price")})
        return []

    def bar(self, k: dict) -> list[dict]:
        """One closed bar: fill the orders due at its open, settle funding due by then, then trigger the
        liquidation, stop-loss or take-profit on its range."""
        symbol, o = k["symbol"], k["open_time"]
        if o <= self.state.last_bar.get(symbol, -1):  # a bar seen already (replayed input)
            return []
        self.state.last_bar[symbol] = o
        out: list[dict] = []
        waiting = self.state.pending.get(symbol, [])
        due = sorted((x for x in waiting if x["event_time"] <= o), key=lambda x: (x["event_time"], x["intent_id"]))
        self.state.pending[symbol] = [x for x in waiting if x["event_time"] > o]
        for n, intent in enumerate(due):
            out += self._fill_intent(intent, k["open"], o + n)
        settlements = self.state.funding.get(symbol, [])
        for rec in sorted((f for f in settlements if f["funding_time"] <= o), key=lambda f: f["funding_time"]):
            out += self._settle(symbol, rec | {"symbol": symbol})
        self.state.funding[symbol] = [f for f in settlements if f["funding_time"] > o]
        out += self._trigger(symbol, k)
        self.state.last_close[symbol] = k["close"]
        return out

    # -- fills ---------------------------------------------------------------------------------
    def _price(self, side: str, price: float) -> float:
        slip = self.config.slippage_bps / 10_000
        return price * (1 + slip) if side == "BUY" else price * (1 - slip)

    def _fill_intent(self, intent: dict, open_price: float, t: int) -> list[dict]:
        symbol, ids = intent["symbol"], client_ids(intent["intent_id"])
        pos = self.state.positions.get(symbol)
        if intent["action"] == "CLOSE":
            if pos is None:  # a reduce-only order with nothing to reduce expires
                return [self._expired(symbol, ids["close"], "SELL", intent["quantity"] or 0.0, t, True)]
            side = "SELL" if pos.amount > 0 else "BUY"
            return self._close(symbol, ids["close"], side, "MARKET", self._price(side, open_price), t)
        if pos is not None or not intent["quantity"] or intent["quantity"] <= 0:
            # one position per symbol (the risk guard's rule); Binance would net it instead
            return [self._expired(symbol, ids["entry"], intent["side"], intent["quantity"] or 0.0, t, False)]
        side, qty = intent["side"], float(intent["quantity"])
        price = self._price(side, open_price)
        sign = 1 if side == "BUY" else -1
        notional = qty * price
        fee = notional * self.config.taker_fee
        leverage = intent.get("leverage") or self.config.leverage  # the order's, else the configured one
        pos = Position(sign * qty, price, notional / leverage, intent["intent_id"],
                       intent["stop_loss"], intent["take_profit"])
        self.state.positions[symbol] = pos
        self.state.balance -= fee
        out = [self._order_event(symbol, ids["entry"], side, "MARKET", qty, t, "NEW", "NEW"),
               self._order_event(symbol, ids["entry"], side, "MARKET", qty, t, "TRADE", "FILLED", price, fee, 0.0),
               self._account(symbol, t, "ORDER", -fee)]
        exit_side = "SELL" if sign > 0 else "BUY"
        for leg, kind, trigger in _legs(pos):
            out.append(self._algo(symbol, ids[leg], exit_side, kind, trigger, t, "NEW"))
        return out

    def _close(self, symbol: str, client_id: str, side: str, kind: str, price: float, t: int,
               liquidation: bool = False) -> list[dict]:
        pos = self.state.positions.pop(symbol)
        qty = abs(pos.amount)
        pnl = -pos.wallet if liquidation else pos.amount * (price - pos.entry)
        fee = 0.0 if liquidation else qty * price * self.config.taker_fee  # the clearance fee is the lost margin
        pos.realized += pnl
        self.state.balance += pnl - fee
        executed = ("CALCULATED", "FILLED") if liquidation else ("TRADE", "FILLED")
        out = [self._order_event(symbol, client_id, side, kind, qty, t, "NEW", "NEW", reduce_only=True),
               self._order_event(symbol, client_id, side, kind, qty, t, *executed, price, fee, pnl, reduce_only=True),
               self._account(symbol, t, "ORDER", pnl - fee, closed=pos)]
        ids = client_ids(pos.intent_id)
        for leg, kind_, trigger in _legs(pos):
            if ids[leg] != client_id:  # the orders guarding a position that is gone
                out.append(self._algo(symbol, ids[leg], side, kind_, trigger, t, "CANCELED"))
        return out

    def _trigger(self, symbol: str, k: dict) -> list[dict]:
        pos = self.state.positions.get(symbol)
        if pos is None:
            return []
        t = k["close_time"]  # known when the bar closes
        long = pos.amount > 0
        side = "SELL" if long else "BUY"
        lp = self.liquidation_price(symbol)
        sl = pos.stop_loss
        adverse, favourable = (k["low"], k["high"]) if long else (k["high"], k["low"])
        beyond = (lambda p, level: p <= level) if long else (lambda p, level: p >= level)
        # the level the price meets first on its way against the position: the stop or the liquidation
        stop_first = sl is not None and (sl >= lp if long else sl <= lp)
        if stop_first and beyond(adverse, sl):
            ids = client_ids(pos.intent_id)
            fill = min(sl, k["open"]) if long else max(sl, k["open"])  # gapped through: the open
            return self._fire(symbol, ids["sl"], "STOP_MARKET", side, sl, self._price(side, fill), t)
        if beyond(adverse, lp):
            bankrupt = pos.entry - pos.wallet / pos.amount
            return self._close(symbol, f"autoclose-{symbol}-{t}", side, "LIQUIDATION", bankrupt, t, liquidation=True)
        tp = pos.take_profit
        if tp is not None and (favourable >= tp if long else favourable <= tp):
            ids = client_ids(pos.intent_id)
            return self._fire(symbol, ids["tp"], "TAKE_PROFIT_MARKET", side, tp, self._price(side, tp), t)
        return []

    def _fire(self, symbol: str, client_id: str, kind: str, side: str, trigger: float, price: float,
              t: int) -> list[dict]:
        qty = abs(self.state.positions[symbol].amount)
        closed = self._close(symbol, client_id, side, kind, price, t)  # NEW, TRADE, ACCOUNT_UPDATE, sibling cancel
        return [self._algo(symbol, client_id, side, kind, trigger, t, "TRIGGERED", qty), *closed[:3],
                self._algo(symbol, client_id, side, kind, trigger, t, "FINISHED", qty), *closed[3:]]

    def _settle(self, symbol: str, rec: dict) -> list[dict]:
        pos = self.state.positions.get(symbol)
        if pos is None:
            return []
        mark = rec.get("mark_price") or self.state.last_close.get(symbol, pos.entry)
        amount = -pos.amount * mark * rec["funding_rate"]
        pos.wallet += amount  # isolated: funding moves the position's margin
        self.state.balance += amount
        return [self._account(symbol, rec["funding_time"], "FUNDING_FEE", amount)]

    def liquidation_price(self, symbol: str) -> float:
        pos = self.state.positions[symbol]
        qty = abs(pos.amount)
        mmr, cum = maintenance(self.brackets, symbol, qty * pos.entry)
        return liquidation_price(1 if pos.amount > 0 else -1, qty, pos.entry, pos.wallet, mmr, cum)

    # -- Binance-shaped events through the live parsers ----------------------------------------
    @staticmethod
    def _parse(payload: dict) -> dict:
        record = PARSERS[payload["e"]](payload)
        record["source"] = "paper"
        return record

    def _order_event(self, symbol: str, client_id: str, side: str, kind: str, qty: float, t: int, x: str, status: str,
                     price: float = 0.0, fee: float = 0.0, pnl: float = 0.0, reduce_only: bool = False) -> dict:
        filled = qty if x in ("TRADE", "CALCULATED") else 0.0
        return self._parse({"e": "ORDER_TRADE_UPDATE", "E": t, "T": t, "o": {
            "s": symbol, "c": client_id, "S": side, "o": kind, "f": "GTC", "q": _s(qty), "p": "0", "ap": _s(price),
            "sp": "0", "x": x, "X": status, "i": _id(client_id), "l": _s(filled), "z": _s(filled),
            "L": _s(price), "N": ASSET, "n": _s(fee), "T": t, "t": _id(f"{client_id}:trade") if filled else 0,
            "m": False, "R": reduce_only, "wt": "CONTRACT_PRICE", "ps": "BOTH", "rp": _s(pnl)}})

    def _expired(self, symbol: str, client_id: str, side: str, qty: float, t: int, reduce_only: bool) -> dict:
        return self._order_event(symbol, client_id, side, "MARKET", qty, t, "EXPIRED", "EXPIRED",
                                 reduce_only=reduce_only)

    def _algo(self, symbol: str, client_id: str, side: str, kind: str, trigger: float, t: int, status: str,
              filled: float = 0.0) -> dict:
        return self._parse({"e": "ALGO_UPDATE", "E": t, "T": t, "o": {
            "caid": client_id, "aid": _id(f"algo:{client_id}"), "at": "CONDITIONAL", "o": kind, "s": symbol,
            "S": side, "ps": "BOTH", "f": "GTC", "q": "0", "X": status, "ai": str(_id(client_id)) if filled else "",
            "ap": "0", "aq": _s(filled), "tp": _s(trigger), "p": "0", "wt": "MARK_PRICE", "cp": True, "R": True}})

    def _account(self, symbol: str, t: int, reason: str, change: float, closed: Position | None = None) -> dict:
        pos = self.state.positions.get(symbol)
        isolated = sum(p.wallet for p in self.state.positions.values())
        entry = {"s": symbol, "pa": "0", "ep": "0", "bep": "0", "cr": _s(closed.realized if closed else 0.0),
                 "up": "0", "mt": "isolated", "iw": "0", "ps": "BOTH"}
        if pos is not None:
            entry |= {"pa": _s(pos.amount), "ep": _s(pos.entry), "bep": _s(pos.entry), "cr": _s(pos.realized),
                      "iw": _s(pos.wallet)}
        return self._parse({"e": "ACCOUNT_UPDATE", "E": t, "T": t, "a": {
            "m": reason, "B": [{"a": ASSET, "wb": _s(self.state.balance), "cw": _s(self.state.balance - isolated),
                                "bc": _s(change)}], "P": [entry]}})
