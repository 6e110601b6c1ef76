"""A backtest run's records → trades and an event-time equity series. Pure: lists of dicts in, no store, no Kafka.

Input is what the run left on its topics: `user.events` (Binance-shaped, from the paper exchange or a live account),
the `md.klines` bars it replayed (reference prices, marks) and, optionally, `signals`, `predictions` and
`risk.verdicts` (why signals were refused; an approving verdict names the signal and the order intent, which links a
trade to its predicted probabilities).

Trades. Fills are ORDER_TRADE_UPDATE records with execution type TRADE (or CALCULATED: a liquidation), taken in the
order given — the topic's order, which holds per symbol (the key) — since a settlement at a bar's open is emitted after
the fill at that same open. A fill that is not reduce-only opens (or adds to) the symbol's position; a reduce-only one
closes it. The exit kind comes from the exchange ids of `connectors.binance.execution.client_ids` (`-tp`, `-sl`, `-x`),
else the order type (liquidations are `autoclose-…` / LIQUIDATION orders).

PnL split of a trade (USDT; `side` = +1 long, −1 short, q the quantity):
- reference prices: a market entry or close → the open of the bar the fill fell in (the paper exchange fills market
  orders at the open of the first bar whose open time is ≥ the order's time); a stop-loss or take-profit → its trigger
  (`stop_price` of the algo order), so a stop gapped through costs its gap as slippage; a liquidation → its own fill
  (the bankruptcy price: no slippage);
- gross = side·q·(exit reference − entry reference);
- slippage = Σ over fills of q·(fill − reference) for a buy, q·(reference − fill) for a sell (a cost when > 0);
- fees = Σ commission of the fills; funding = Σ FUNDING_FEE balance changes of the symbol while the trade is open;
- net = gross − fees − slippage + funding, which is what the trade did to the wallet.

So initial balance + Σ net + funding outside trades = final wallet balance, computed from prices on one side and read
from ACCOUNT_UPDATE `wallet_balance` on the other (tests hold it to the cent).

Equity (event time): wallet = initial balance + the ACCOUNT_UPDATE balance changes so far; unrealized = open
positions marked at their symbol's last bar close (the fill price before the first close after the entry);
equity = wallet + unrealized. Sampled at every account event and every bar close.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from connectors.binance.execution import client_ids
from connectors.paper.engine import ASSET, PaperConfig

TP, SL, CLOSE, LIQUIDATION, OPEN = "TP", "SL", "CLOSE", "LIQUIDATION", "OPEN"
EXIT_KINDS = (TP, SL, CLOSE, LIQUIDATION)
_BY_SUFFIX = {"-tp": TP, "-sl": SL, "-x": CLOSE}
_BY_ORDER_TYPE = {"TAKE_PROFIT_MARKET": TP, "TAKE_PROFIT": TP, "STOP_MARKET": SL, "STOP": SL,
                  "LIQUIDATION": LIQUIDATION, "MARKET": CLOSE}
_EPS = 1e-9  # a position whose quantity falls below this (relative) is flat


@dataclass
class Trade:
    symbol: str
    side: str  # LONG or SHORT
    quantity: float
    entry_time: int  # ms, the (first) entry fill
    entry_price: float  # average fill price
    entry_reference: float
    exit_time: int | None  # None: still open at the end of the run
    exit_price: float | None
    exit_reference: float | None
    exit_kind: str  # TP, SL, CLOSE, LIQUIDATION; OPEN while still open at the end
    bars_held: int
    gross_pnl: float
    fees: float
    funding: float
    slippage: float
    net_pnl: float
    notional: float  # entry notional at the fill price, USDT
    entry_client_id: str
    signal_id: str | None = None
    p_win: float | None = None  # the signal's P(TP) / (P(TP) + P(SL)) of the side
    p_tp: float | None = None  # the prediction's calibrated P(TP) of the side

    @property
    def closed(self) -> bool:
        return self.exit_time is not None

    @property
    def direction(self) -> int:
        return 1 if self.side == "LONG" else -1


@dataclass
class Ledger:
    initial_balance: float
    final_wallet: float  # wallet_balance of the last ACCOUNT_UPDATE (the initial balance without any)
    trades: list[Trade]  # by entry time; a position still open at the end is a trade OPEN, marked at its last close
    equity: pd.DataFrame  # time (ms), wallet, unrealized, equity, exposure, leverage, positions
    data_start: int  # ms: the first bar's open (or the first event)
    data_end: int  # ms: the end of the last bar (or the last event)
    funding_outside_trades: float = 0.0
    symbols: list[str] = field(default_factory=list)
    signals: dict[str, int] = field(default_factory=dict)  # counts: total, long, short, flat, approved, rejected
    rejections: dict[str, int] = field(default_factory=dict)  # violation → rejected verdicts naming it
    flat_reasons: dict[str, int] = field(default_factory=dict)
    expired_orders: int = 0  # entries or closes the exchange let expire (nothing to close, position already open)

    @property
    def closed_trades(self) -> list[Trade]:
        return [t for t in self.trades if t.closed]


def _bar_table(klines: list[dict], interval: str | None) -> dict[str, pd.DataFrame]:
    """symbol → its bars (open_time, close_time, open, close), sorted, one per open time."""
    rows = [k for k in klines if interval is None or k.get("interval", interval) == interval]
    if not rows:
        return {}
    df = pd.DataFrame(rows, columns=["symbol", "open_time", "close_time", "open", "close"])
    df = df.drop_duplicates(["symbol", "open_time"], keep="last").sort_values(["symbol", "open_time"])
    return {s: g.reset_index(drop=True) for s, g in df.groupby("symbol", sort=True)}


def _exit_kind(fill: dict) -> str:
    cid = fill.get("client_order_id") or ""
    if fill.get("execution_type") == "CALCULATED" or fill.get("order_type") == "LIQUIDATION" \
            or cid.startswith("autoclose"):
        return LIQUIDATION
    if cid.startswith("pf"):
        for suffix, kind in _BY_SUFFIX.items():
            if cid.endswith(suffix):
                return kind
    return _BY_ORDER_TYPE.get(fill.get("order_type") or "", CLOSE)


@dataclass
class _Open:
    """A position being built from fills."""

    direction: int
    entry_time: int
    entry_client_id: str
    qty: float = 0.0
    cost: float = 0.0  # Σ q·fill of the entries
    ref_cost: float = 0.0  # Σ q·reference of the entries
    closed_qty: float = 0.0
    exit_value: float = 0.0
    exit_ref_value: float = 0.0
    fees: float = 0.0
    slippage: float = 0.0
    funding: float = 0.0
    entry_bar: int | None = None  # open time of the entry's bar
    exit_time: int | None = None
    kind: str = OPEN


class _Builder:
    def __init__(self, bars: dict[str, pd.DataFrame]):
        self.bars = bars
        self.triggers: dict[str, float] = {}  # algo client id → trigger price
        self.triggered: dict[int, dict] = {}  # order id → the ALGO_UPDATE of the algo order that became it
        self.open: dict[str, _Open] = {}
        self.done: list[tuple[str, _Open]] = []
        self.funding_outside = 0.0
        self.expired = 0

    def _bar_at(self, symbol: str, t: int) -> int | None:
        """Row of the symbol's bar the time falls in (the last one opened at or before it)."""
        b = self.bars.get(symbol)
        if b is None:
            return None
        i = int(np.searchsorted(b["open_time"].to_numpy(), t, "right")) - 1
        return i if i >= 0 else None

    def _market_reference(self, symbol: str, t: int, fill: float) -> tuple[float, int | None]:
        i = self._bar_at(symbol, t)
        if i is None:  # no bar to refer to: the fill is its own reference (no slippage measurable)
            return fill, None
        b = self.bars[symbol]
        return float(b["open"].iat[i]), int(b["open_time"].iat[i])

    def algo(self, ev: dict) -> None:
        if ev.get("stop_price"):
            self.triggers[ev["client_order_id"]] = float(ev["stop_price"])
        if ev.get("actual_order_id"):  # triggered: the order it became, which is what fills
            self.triggered[int(ev["actual_order_id"])] = ev

    def fill(self, ev: dict) -> None:
        symbol, qty, price = ev["symbol"], float(ev["last_filled_qty"]), float(ev["last_filled_price"])
        t = int(ev.get("trade_time") or ev["event_time"])
        direction = 1 if ev["side"] == "BUY" else -1
        pos = self.open.get(symbol)
        if not ev.get("reduce_only") and (pos is None or pos.direction == direction):
            ref, bar = self._market_reference(symbol, t, price)
            if pos is None:
                pos = self.open[symbol] = _Open(direction, t, ev["client_order_id"], entry_bar=bar)
            pos.qty += qty
            pos.cost += qty * price
            pos.ref_cost += qty * ref
        else:  # an exit (a fill beyond the position, a flip on a netting account, is not split: one position a symbol)
            if pos is None:  # a reduce-only fill with no position we know of: nothing to attribute it to
                raise ValueError(f"{symbol}: an exit fill at {t} without an open position in the records; "
                                 "were the run's user.events read from their beginning?")
            # on Binance the fill of a triggered stop may carry an id of its own: the algo order tells what it was
            algo = self.triggered.get(ev.get("order_id"))
            kind = _exit_kind(algo if algo is not None and ev.get("execution_type") == "TRADE" else ev)
            if kind in (TP, SL):
                cid = algo["client_order_id"] if algo is not None else ev["client_order_id"]
                ref = self.triggers.get(cid) or ev.get("stop_price") or price
            elif kind == LIQUIDATION:
                ref = price
            else:
                ref, _ = self._market_reference(symbol, t, price)
            pos.closed_qty += qty
            pos.exit_value += qty * price
            pos.exit_ref_value += qty * ref
            pos.kind = kind
            pos.exit_time = t
        pos.fees += float(ev.get("commission") or 0.0)
        pos.slippage += direction * qty * (price - ref)  # buying above / selling below the reference costs
        if pos.closed_qty >= pos.qty * (1 - _EPS):
            self.done.append((symbol, self.open.pop(symbol)))

    def funding(self, symbol: str, amount: float) -> None:
        pos = self.open.get(symbol)
        if pos is None:
            self.funding_outside += amount
        else:
            pos.funding += amount


def _bars_held(bars: pd.DataFrame | None, entry_bar: int | None, end: int) -> int:
    """Bars from the entry's bar to the last one closed by `end` (an exit on a bar's range holds it; a market close
    at a bar's open does not) — as the labels count `bars_held`."""
    if bars is None or entry_bar is None:
        return 0
    opens, closes = bars["open_time"].to_numpy(), bars["close_time"].to_numpy()
    return int(np.count_nonzero((opens >= entry_bar) & (closes <= end)))


def _trade(symbol: str, p: _Open, bars: pd.DataFrame | None, data_end: int) -> Trade:
    entry_price, entry_ref = p.cost / p.qty, p.ref_cost / p.qty
    if p.exit_time is not None:
        exit_price, exit_ref = p.exit_value / p.closed_qty, p.exit_ref_value / p.closed_qty
        gross = p.direction * p.qty * (exit_ref - entry_ref)
    else:  # still open: marked at the last close, no exit costs yet
        last = float(bars["close"].iat[-1]) if bars is not None and len(bars) else entry_price
        exit_price = exit_ref = None
        gross = p.direction * p.qty * (last - entry_ref)
    return Trade(symbol=symbol, side="LONG" if p.direction > 0 else "SHORT", quantity=p.qty, entry_time=p.entry_time,
                 entry_price=entry_price, entry_reference=entry_ref, exit_time=p.exit_time, exit_price=exit_price,
                 exit_reference=exit_ref, exit_kind=p.kind,
                 bars_held=_bars_held(bars, p.entry_bar, p.exit_time if p.exit_time is not None else data_end),
                 gross_pnl=gross, fees=p.fees, funding=p.funding, slippage=p.slippage,
                 net_pnl=gross - p.fees - p.slippage + p.funding, notional=p.cost, entry_client_id=p.entry_client_id)


def _link_predictions(trades: list[Trade], signals: list[dict], predictions: list[dict], verdicts: list[dict],
                      orders: list[dict]) -> None:
    """Each trade's signal through the deterministic ids: the verdict that approved it (or the order intent) names the
    signal and the intent, whose entry clientOrderId the fills carry (`client_ids`)."""
    by_signal = {s["event_id"]: s for s in signals}
    by_entry = {client_ids(r["intent_id"])["entry"]: by_signal[r["signal_id"]] for r in [*orders, *verdicts]
                if r.get("intent_id") and r.get("signal_id") in by_signal}
    preds = {p["event_id"]: p for p in predictions}
    for t in trades:
        s = by_entry.get(t.entry_client_id)
        if s is None:
            continue
        side = "long" if t.side == "LONG" else "short"
        t.signal_id, t.p_win = s["event_id"], s.get(f"p_win_{side}")
        p = preds.get(s.get("prediction_id"))
        if p is not None:
            t.p_tp = p.get(f"p_tp_{side}")


def _signal_counts(signals: list[dict], verdicts: list[dict]) -> tuple[dict, dict, dict]:
    decisions = Counter(s.get("decision") for s in signals)
    counts = {"total": len(signals), "long": decisions["LONG"], "short": decisions["SHORT"],
              "flat": decisions["FLAT"]}
    rejections: Counter = Counter()
    if verdicts:
        entries = [v for v in verdicts if v.get("decision") in ("LONG", "SHORT")]
        rejected = [v for v in entries if v.get("verdict") == "REJECTED"]
        counts |= {"verdicts": len(verdicts), "approved_entries": len(entries) - len(rejected),
                   "rejected": len(rejected)}
        for v in rejected:  # a verdict lists every rule it breaks: each is counted
            rejections.update(v.get("violations") or ["unspecified"])
    flat = Counter(s.get("flat_reason") or "unspecified" for s in signals if s.get("decision") == "FLAT")
    return counts, dict(sorted(rejections.items())), dict(sorted(flat.items()))


def _equity(trades: list[Trade], bars: dict[str, pd.DataFrame], changes: list[tuple[int, float]], initial: float,
            data_start: int, data_end: int) -> pd.DataFrame:
    times = [data_start, *(t for t, _ in changes), *(int(x) for b in bars.values() for x in b["close_time"])]
    grid = np.unique(np.asarray(times, dtype=np.int64))
    change_t = np.asarray([t for t, _ in changes], dtype=np.int64)
    order = np.argsort(change_t, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(np.asarray([c for _, c in changes], dtype=np.float64)[order])])
    wallet = initial + cum[np.searchsorted(change_t[order], grid, "right")]
    unrealized, exposure = np.zeros(len(grid)), np.zeros(len(grid))
    positions = np.zeros(len(grid), dtype=np.int64)
    for t in trades:
        end = t.exit_time if t.exit_time is not None else np.iinfo(np.int64).max
        # the exit's own instant is in the wallet already
        inside = slice(np.searchsorted(grid, t.entry_time, "left"), np.searchsorted(grid, end, "left"))
        if inside.stop <= inside.start:
            continue
        mark = np.full(inside.stop - inside.start, t.entry_price)
        b = bars.get(t.symbol)
        if b is not None:
            closes, close_t = b["close"].to_numpy(), b["close_time"].to_numpy()
            i = np.searchsorted(close_t, grid[inside], "right") - 1
            known = (i >= 0) & (close_t[np.maximum(i, 0)] >= t.entry_time)  # a close after the entry
            mark = np.where(known, closes[np.maximum(i, 0)], mark)
        unrealized[inside] += t.direction * t.quantity * (mark - t.entry_price)
        exposure[inside] += t.quantity * mark
        positions[inside] += 1
    equity = wallet + unrealized
    with np.errstate(divide="ignore", invalid="ignore"):
        leverage = np.where(equity > 0, exposure / equity, np.nan)
    return pd.DataFrame({"time": grid, "wallet": wallet, "unrealized": unrealized, "equity": equity,
                         "exposure": exposure, "leverage": leverage, "positions": positions})


def reconstruct(user_events: list[dict], klines: list[dict], *, signals: list[dict] = (),
                predictions: list[dict] = (), verdicts: list[dict] = (), orders: list[dict] = (),
                initial_balance: float | None = None, interval: str | None = "5m") -> Ledger:
    """The ledger of one run.

    `user_events` in topic order (per symbol, as consumed); `klines` any order (only `interval` bars are used:
    the paper exchange trades on one interval). `signals` with `verdicts` or `orders` link trades to their predicted
    probabilities (`predictions` add P(TP)); `verdicts` give the rejections. `initial_balance`: the run's starting
    wallet; by default read off the first ACCOUNT_UPDATE (wallet − change), and without any the paper exchange's
    default."""
    bars = _bar_table(list(klines), interval)
    b = _Builder(bars)
    changes: list[tuple[int, float]] = []
    first_wallet: float | None = None
    last_wallet: tuple[int, float] | None = None
    for ev in user_events:
        kind = ev["event_type"]
        if kind == "ALGO_UPDATE":
            b.algo(ev)
        elif kind == "ORDER_TRADE_UPDATE":
            if ev.get("execution_type") in ("TRADE", "CALCULATED") and (ev.get("last_filled_qty") or 0) > 0:
                b.fill(ev)
            elif ev.get("execution_type") == "EXPIRED":
                b.expired += 1
        elif kind == "ACCOUNT_UPDATE":
            balances = ev.get("balances") or []
            if isinstance(balances, str):  # read back from the archive, where nested values are JSON text
                balances = json.loads(balances)
            for bal in balances:
                if bal["asset"] != ASSET:
                    continue
                t = int(ev["event_time"])
                changes.append((t, float(bal["balance_change"])))
                if first_wallet is None:
                    first_wallet = float(bal["wallet_balance"]) - float(bal["balance_change"])
                if last_wallet is None or t >= last_wallet[0]:
                    last_wallet = (t, float(bal["wallet_balance"]))
                if ev.get("reason") == "FUNDING_FEE":
                    b.funding(ev["symbol"], float(bal["balance_change"]))
    if initial_balance is None:
        initial_balance = first_wallet if first_wallet is not None else PaperConfig().initial_balance

    event_times = [int(e["event_time"]) for e in user_events]
    starts = [int(x["open_time"].iat[0]) for x in bars.values()] + event_times
    ends = [int(x["close_time"].iat[-1]) + 1 for x in bars.values()] + event_times
    data_start, data_end = (min(starts), max(ends)) if starts else (0, 0)

    trades = sorted((_trade(s, p, bars.get(s), data_end) for s, p in [*b.done, *b.open.items()]),
                    key=lambda t: (t.entry_time, t.symbol))
    _link_predictions(trades, list(signals), list(predictions), list(verdicts), list(orders))
    counts, rejections, flat = _signal_counts(list(signals), list(verdicts))
    return Ledger(initial_balance=initial_balance,
                  final_wallet=last_wallet[1] if last_wallet is not None else initial_balance,
                  trades=trades, equity=_equity(trades, bars, changes, initial_balance, data_start, data_end),
                  data_start=data_start, data_end=data_end, funding_outside_trades=b.funding_outside,
                  symbols=sorted({*bars, *(t.symbol for t in trades)}), signals=counts, rejections=rejections,
                  flat_reasons=flat, expired_orders=b.expired)
