"""Paper trading next to the risk guard: the paper exchange's engine (`connectors/paper/engine.py`) fed in event time
by the risk agent, so a replay fills exactly as live would, however fast it runs.

Why here and not as a connector reading `orders` over Kafka: a fill depends on which bar comes first — an entry
decided on bar t fills at the open of bar t+1 — and over topics that order is a race between the chain's latency
and the replay's speed (a fast replay lets bar t+1 reach the exchange before the order of bar t). Here the order is
fixed: the agent holds each symbol's bars (and funding settlements) and applies them to the engine just before the
signal of the same bar is decided, after the orders of the previous signal were handed to it. The engine's events
go to `user.events` as the live user data stream's would (same parsers), and to the guard at once.

A symbol's bars wait for its signals; while a symbol has none (indicators warming up, no model) they pile up, so
at most MAX_HELD bars are held: beyond that the oldest are applied (deterministic: by count, not by time)."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field

from connectors.binance.rules import Bracket
from connectors.paper.engine import PaperConfig, PaperExchange

INTERVAL = "5m"
BAR_MS = 300_000
MAX_HELD = 4032  # two weeks of 5m bars per symbol


@dataclass
class Held:
    # klines of INTERVAL by open time (arrival order among equal ones): a symbol without signals holds up to
    # MAX_HELD of them, and every bar then releases the oldest, so no step may scan the whole list
    bars: list[dict] = field(default_factory=list)
    funding: list[dict] = field(default_factory=list)
    # each bar's JSON, made once when it arrives: the desk is saved with every commit of the risk agent, and
    # re-encoding thousands of held bars each time was a tenth of the worker's CPU on a fast replay
    encoded: list[str] = field(default_factory=list)

    def add(self, bar: dict) -> None:
        at = bisect.bisect_right(self.bars, bar["open_time"], key=_open_time)
        self.bars.insert(at, bar)
        self.encoded.insert(at, json.dumps(bar))

    def has(self, open_time: int) -> bool:
        at = bisect.bisect_left(self.bars, open_time, key=_open_time)
        return at < len(self.bars) and self.bars[at]["open_time"] == open_time

    def take(self, cut: int) -> list[dict]:
        due = self.bars[:cut]
        del self.bars[:cut], self.encoded[:cut]
        return due

    def dumps(self) -> str:
        return f'{{"bars": [{", ".join(self.encoded)}], "funding": {json.dumps(self.funding)}}}'


class PaperDesk:
    def __init__(self, config: PaperConfig, state: str | dict | None = None,
                 brackets: dict[str, list[Bracket]] | None = None):
        raw = json.loads(state) if isinstance(state, str) else state
        self.exchange = (PaperExchange.loads(raw["exchange"], config, brackets) if raw
                         else PaperExchange(config, brackets))
        self.held: dict[str, Held] = {}
        for symbol, h in (raw["held"].items() if raw else ()):
            held = self.held[symbol] = Held(funding=h["funding"])
            for bar in h["bars"]:
                held.add(bar)

    def dumps(self) -> str:
        held = ", ".join(f"{json.dumps(s)}: {h.dumps()}" for s, h in self.held.items())
        return f'{{"exchange": {json.dumps(self.exchange.dumps())}, "held": {{{held}}}}}'

    def kline(self, k: dict) -> list[dict]:
        if k["interval"] != INTERVAL:
            return []
        held = self.held.setdefault(k["symbol"], Held())
        if k["open_time"] <= self.exchange.state.last_bar.get(k["symbol"], -1) or held.has(k["open_time"]):
            return []  # a bar applied or held already: input delivered again after a restart
        held.add(k)
        if len(held.bars) > MAX_HELD:
            return self.release(k["symbol"], held.bars[len(held.bars) - MAX_HELD - 1]["open_time"])
        return []

    def funding(self, rec: dict) -> None:
        held = self.held.setdefault(rec["symbol"], Held())
        if not any(f["funding_time"] == rec["funding_time"] for f in held.funding):  # not one delivered again
            held.funding.append(rec)

    def ready_for(self, symbol: str, open_time: int) -> bool:
        """Whether the bar a signal answers has arrived (its fills and triggers come before its verdict)."""
        held = self.held.get(symbol)
        newest = self.exchange.state.last_bar.get(symbol, -1)
        if held is not None and held.bars:
            newest = max(newest, held.bars[-1]["open_time"])
        return newest >= open_time

    def release(self, symbol: str, through_open_time: int) -> list[dict]:
        """Apply the held bars opened at or before `through_open_time` (and the settlements due by their close),
        in event time: the engine's events, in order."""
        held = self.held.get(symbol)
        if held is None:
            return []
        due = held.take(bisect.bisect_right(held.bars, through_open_time, key=_open_time))
        if not due:
            return []
        close = due[-1]["open_time"] + BAR_MS
        out: list[dict] = []
        for rec in sorted((f for f in held.funding if f["funding_time"] < close), key=lambda f: f["funding_time"]):
            out += self.exchange.funding(rec)
        held.funding = [f for f in held.funding if f["funding_time"] >= close]
        for bar in due:
            out += self.exchange.bar(bar)
        return out

    def passed(self, symbol: str, open_time: int) -> int:
        """How far (ms) the engine has gone past the bar opened at `open_time`: 0 normally, as a signal's bar is
        applied just before its verdict; more when bars were applied without their signals (MAX_HELD)."""
        return max(self.exchange.state.last_bar.get(symbol, open_time) - open_time, 0)

    def order(self, order: dict) -> None:
        self.exchange.order(order)  # fills at the next bar applied: events come with it


def _open_time(bar: dict) -> int:
    return bar["open_time"]
