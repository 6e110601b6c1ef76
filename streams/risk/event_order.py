"""EventTimeOrder: when the risk agent may decide a bar, so that every symbol is decided in event-time order.

The account couples the symbols (equity, today's loss, margin, exposure, the orders-per-minute cool-down), so which
symbol's bar is decided first changes the verdicts. Kafka keeps order within a partition only, and the chain's
hops deliver the symbols' signals in whatever interleaving the fetches made: decided on arrival, one backtest could
give 22 trades and the same backtest run again 37. So the agent holds the signals and decides them in
(open_time, symbol) order, each time only up to the *cursor*: the newest time that every symbol has passed.

A symbol has passed time T when none of its signals at or before T can still come. The chain makes one signal per
bar (features → predictions → signals, a FLAT marker for a bar that was not predicted), and each topic is in
event-time order per symbol, so:
- the bars received whose signal has not come yet (`pending`) say the symbol has passed the time just before the
  oldest of them;
- without pending bars, the symbol has passed its newest bar (a later signal answers a later bar).
A symbol with nothing pending whose market data is read to the end of its partition (`idle`: its feed ended, or a
symbol not listed yet) holds nobody back: its next bar, when one comes, is newer than anything already published.
Only that case depends on timing, as the features sequencer's `context_complete`; everything else decides from
the data alone, at any replay speed.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

NEVER = -1
EVERYTHING = 2**62  # the cursor when no symbol holds anyone back


@dataclass
class SymbolClock:
    newest_bar: int = NEVER
    newest_signal: int = NEVER
    pending: list[int] = field(default_factory=list)  # open times of bars newer than the newest signal, sorted

    def passed(self) -> int:
        return self.pending[0] - 1 if self.pending else self.newest_bar


class EventTimeOrder:
    def __init__(self, state: dict | None = None) -> None:
        self.clocks: dict[str, SymbolClock] = {
            s: SymbolClock(c["newest_bar"], c["newest_signal"], list(c["pending"])) for s, c in (state or {}).items()}

    def to_state(self) -> dict:
        return {s: {"newest_bar": c.newest_bar, "newest_signal": c.newest_signal, "pending": c.pending}
                for s, c in self.clocks.items()}

    def bar(self, symbol: str, open_time: int) -> None:
        """A bar of the decision interval arrived (a repeated or late one changes nothing)."""
        clock = self.clocks.setdefault(symbol, SymbolClock())
        clock.newest_bar = max(clock.newest_bar, open_time)
        if open_time > clock.newest_signal:
            at = bisect.bisect_left(clock.pending, open_time)
            if at == len(clock.pending) or clock.pending[at] != open_time:
                clock.pending.insert(at, open_time)

    def signal(self, symbol: str, open_time: int) -> None:
        """A signal arrived: its bar and every older one are answered."""
        clock = self.clocks.setdefault(symbol, SymbolClock())
        if open_time > clock.newest_signal:
            clock.newest_signal = open_time
            del clock.pending[:bisect.bisect_right(clock.pending, open_time)]

    def cursor(self, idle: Callable[[str], bool], owned: Callable[[str], bool] = lambda symbol: True) -> int:
        """The newest time every symbol has passed: signals opened at or before it may be decided. `idle(symbol)`:
        whether the symbol's market data is read to the end of its partition now; `owned(symbol)`: whether this
        worker has its partition (another worker's symbols, known from a book it took over, hold nobody back here)."""
        holding = [c.passed() for s, c in self.clocks.items() if owned(s) and (c.pending or not idle(s))]
        return min(holding, default=EVERYTHING)
