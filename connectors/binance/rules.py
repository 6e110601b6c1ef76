"""Exchange rules of USDT-M symbols: exchangeInfo filters (tick and step rounding, minimum notional, status) and
leverage brackets (maintenance margin), with snapshots bundled for offline use (`snapshots/`, their sources inside).

Shared by the execution connector (rounding the orders it sends), the policy (sizing signals), the risk guard and
the paper exchange (liquidation). Files saved from `GET /fapi/v1/exchangeInfo` and `GET /fapi/v1/leverageBracket`,
exactly as Binance returns them, are imported into `$PERPFLOW_HOME/rules/` (`perpflow rules import`) and win over
the bundled snapshots symbol by symbol."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from functools import cache
from pathlib import Path

from streams.errors import PerpflowError

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
    status: str = "TRADING"  # anything else (SETTLING, CLOSE, PENDING_TRADING, ...) takes no entries

    @classmethod
    def from_exchange_info(cls, symbol_info: dict) -> SymbolRules:
        f = {x["filterType"]: x for x in symbol_info["filters"]}
        return cls(Decimal(f["PRICE_FILTER"]["tickSize"]), Decimal(f["LOT_SIZE"]["stepSize"]),
                   Decimal(f["LOT_SIZE"]["minQty"]), Decimal(f.get("MIN_NOTIONAL", {}).get("notional", "0")),
                   symbol_info.get("status", "TRADING"))

    @property
    def trading(self) -> bool:
        return self.status == "TRADING"

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


EXCHANGE_INFO, LEVERAGE_BRACKETS = "exchange_info.json", "leverage_brackets.json"  # both dirs: bundled, imported
IMPORT_HINT = ("save GET /fapi/v1/exchangeInfo (and GET /fapi/v1/leverageBracket, signed) to files and run "
               "`perpflow rules import FILE...`")


class RulesFileError(PerpflowError):
    """A file that is neither an exchangeInfo nor a leverageBracket answer."""


class RulesMissing(PerpflowError):
    """Symbols asked for without exchange rules; the message says what to run."""


def _symbols_of(doc) -> tuple[str, list[dict]]:
    """(kind, per-symbol entries) of a file saved from one of the two endpoints: exchangeInfo is an object with
    `symbols` (each with `filters`); leverageBracket is a list of {symbol, brackets} (the bundled snapshot wraps
    that list in `brackets`, beside its `_source`)."""
    if isinstance(doc, dict) and isinstance(doc.get("symbols"), list):
        entries = doc["symbols"]
        if all(isinstance(e, dict) and "symbol" in e and isinstance(e.get("filters"), list) for e in entries):
            return EXCHANGE_INFO, entries
    listed = doc.get("brackets") if isinstance(doc, dict) else doc
    if isinstance(listed, list) and all(isinstance(e, dict) and "symbol" in e and isinstance(e.get("brackets"), list)
                                        for e in listed):
        return LEVERAGE_BRACKETS, listed
    raise RulesFileError("neither an exchangeInfo answer (an object with `symbols`, each with `filters`) nor a "
                         "leverageBracket answer (a list of {symbol, brackets})")


def _entries(home: Path | None, kind: str) -> dict[str, dict]:
    """symbol → its entry of `kind`, the bundled snapshot's overlaid by the imported file's."""
    found: dict[str, dict] = {}
    for path in (SNAPSHOTS / kind, *([home / "rules" / kind] if home else [])):
        if path.exists():
            found.update({e["symbol"]: e for e in _symbols_of(json.loads(path.read_text()))[1]})
    return found


def _parse_rules(entries: dict[str, dict]) -> dict[str, SymbolRules]:
    return {symbol: SymbolRules.from_exchange_info(e) for symbol, e in entries.items()}


def _parse_brackets(entries: dict[str, dict]) -> dict[str, list[Bracket]]:
    return {symbol: [Bracket(b["notionalFloor"], b["notionalCap"], b["maintMarginRatio"], b["cum"])
                     for b in e["brackets"]] for symbol, e in entries.items()}


def exchange_rules(home: Path | None = None) -> dict[str, SymbolRules]:
    """Every symbol's exchangeInfo rules: bundled, overlaid by what was imported into `home`."""
    return _parse_rules(_entries(home, EXCHANGE_INFO))


def leverage_brackets(home: Path | None = None) -> dict[str, list[Bracket]]:
    """Every symbol's leverage brackets: bundled, overlaid by what was imported into `home`."""
    return _parse_brackets(_entries(home, LEVERAGE_BRACKETS))


@cache
def bundled_rules() -> dict[str, SymbolRules]:
    return exchange_rules()


@cache
def bundled_brackets() -> dict[str, list[Bracket]]:
    return leverage_brackets()


def missing_rules(home: Path | None, symbols: list[str]) -> list[str]:
    """The symbols that could never trade: no exchangeInfo rules or no leverage brackets."""
    rules, brackets = exchange_rules(home), leverage_brackets(home)
    return [s for s in symbols if s not in rules or s not in brackets]


def require_rules(home: Path | None, symbols: list[str]) -> None:
    """Stop before a run whose symbols could never trade (they would be FLAT `no_exchange_rules` throughout)."""
    missing = missing_rules(home, symbols)
    if missing:
        raise RulesMissing(f"no exchange rules for {', '.join(missing)} (their signals could never trade): "
                           f"{IMPORT_HINT}")


def import_rule_files(home: Path, paths: list[Path]) -> dict[str, list[str]]:
    """Merge files saved from exchangeInfo / leverageBracket into `home/rules/` (a newer import of a symbol
    replaces its older entry; each file is checked whole, every symbol parsed, before anything is written).
    kind → the symbols imported."""
    staged: dict[str, dict[str, dict]] = {}
    for path in paths:
        try:
            kind, entries = _symbols_of(json.loads(Path(path).read_text()))
            (_parse_rules if kind == EXCHANGE_INFO else _parse_brackets)({e["symbol"]: e for e in entries})
        except (OSError, json.JSONDecodeError, RulesFileError, KeyError, TypeError, ArithmeticError) as exc:
            reason = (f"no field {exc}" if isinstance(exc, KeyError) else
                      f"not JSON ({exc})" if isinstance(exc, json.JSONDecodeError) else exc)
            raise RulesFileError(f"{path}: {reason}") from exc
        staged.setdefault(kind, {}).update({e["symbol"]: e for e in entries})
    folder = home / "rules"
    folder.mkdir(parents=True, exist_ok=True)
    for kind, entries in staged.items():
        target = folder / kind
        merged = {e["symbol"]: e for e in _symbols_of(json.loads(target.read_text()))[1]} if target.exists() else {}
        merged.update(entries)
        doc = {"symbols": list(merged.values())} if kind == EXCHANGE_INFO else list(merged.values())
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(target)  # atomic: a reader never sees half a file
    return {kind: sorted(entries) for kind, entries in staged.items()}


def isolated_liquidation_price(side: int, quantity: float, entry: float, leverage: float,
                               bracket: Bracket) -> float:
    """Binance's liquidation price of one isolated position (one-way mode), wallet balance = initial margin:
    LP = (WB + cum − side·Q·EP) / (Q·MMR − side·Q), with WB = Q·EP / leverage (no unrealized PnL at entry).
    side +1 long, −1 short; Q > 0."""
    wallet = quantity * entry / leverage
    return (wallet + bracket.cum - side * quantity * entry) / (quantity * bracket.mmr - side * quantity)
