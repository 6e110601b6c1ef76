"""Exchange rules of USDT-M symbols: exchangeInfo filters (tick and step rounding, minimum notional) and leverage
brackets (maintenance margin), with snapshots bundled for offline use (`snapshots/`, their sources inside).

Shared by the execution connector (rounding the orders it sends), the policy (sizing signals) and the paper
exchange (liquidation)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from functools import cache
from pathlib import Path

SNAPSHOTS = Path(__file__).parent / "snapshots"


def plain(d: Decimal) -> str:
    return format(d.normalize(), "f") if d != 0 else "0"


@dataclass(frozen=True)
class SymbolRules:
    """exchangeInfo filters: quantities are floored to the step size, prices rounded to the tick size."""

    tick: Decimal
    step: Decimal
    min_qty: Decimal
    min_notional: Decimal

    @classmethod
    def from_exchange_info(cls, symbol_info: dict) -> SymbolRules:
        f = {x["filterType"]: x for x in symbol_info["filters"]}
        return cls(Decimal(f["PRICE_FILTER"]["tickSize"]), Decimal(f["LOT_SIZE"]["stepSize"]),
                   Decimal(f["LOT_SIZE"]["minQty"]), Decimal(f.get("MIN_NOTIONAL", {}).get("notional", "0")))

    def quantity(self, q: float) -> Decimal:
        return (Decimal(repr(q)) / self.step).to_integral_value(ROUND_DOWN) * self.step

    def price(self, p: float) -> Decimal:
        return (Decimal(repr(p)) / self.tick).to_integral_value(ROUND_HALF_UP) * self.tick


@dataclass(frozen=True)
class Bracket:
    floor: float  # notional from which this bracket applies
    cap: float
    mmr: float  # maintenance margin rate
    cum: float  # maintenance amount

    @classmethod
    def for_notional(cls, brackets: list[Bracket], notional: float) -> Bracket:
        return next((b for b in brackets if notional < b.cap), brackets[-1])


@cache
def bundled_rules() -> dict[str, SymbolRules]:
    info = json.loads((SNAPSHOTS / "exchange_info.json").read_text())
    return {s["symbol"]: SymbolRules.from_exchange_info(s) for s in info["symbols"]}


@cache
def bundled_brackets() -> dict[str, list[Bracket]]:
    doc = json.loads((SNAPSHOTS / "leverage_brackets.json").read_text())
    return {s["symbol"]: [Bracket(b["notionalFloor"], b["notionalCap"], b["maintMarginRatio"], b["cum"])
                          for b in s["brackets"]] for s in doc["brackets"]}


def isolated_liquidation_price(side: int, quantity: float, entry: float, leverage: float,
                               bracket: Bracket) -> float:
    """Binance's liquidation price of one isolated position (one-way mode), wallet balance = initial margin:
    LP = (WB + cum − side·Q·EP) / (Q·MMR − side·Q), with WB = Q·EP / leverage (no unrealized PnL at entry).
    side +1 long, −1 short; Q > 0."""
    wallet = quantity * entry / leverage
    return (wallet + bracket.cum - side * quantity * entry) / (quantity * bracket.mmr - side * quantity)
