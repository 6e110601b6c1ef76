"""FeatureSequencer: puts one symbol's streamed inputs back into event-time order before they reach its engine.

Kafka keeps order within a partition, not across topics: the features agent reads md.klines, md.markprice,
md.funding and md.openinterest, and a consumer that is behind can hand it a day of klines before the marks of
that day. Fed in arrival order, the engine would miss context (a funding settlement arriving after the bar it
belongs to) or be handed the future (a mark newer than the bar replaces the one known at its close). So the
sequencer holds events and releases them in the offline driver's order (`streams.features.offline.sort_events`):
a bar closing at ct after every context event stamped before ct, and the context stamped at ct or later after it.

A bar is released when, for each context kind, nothing stamped before its close can still arrive:
- the kind's watermark (its newest event time; each topic is in event-time order per symbol) reached ct, or
- the kind's next event is not due before ct: watermark + cadence ≥ ct, where the cadence is the smallest gap
  seen between two of its events (a missing settlement makes one gap longer, never the smallest one), or
- the driver says the kind's partition has nothing more to give now (`context_complete`): it is read up to its
  high-watermark, so the context is late or absent (a live feed that stalled, the end of a replay, a symbol
  without open interest). Only this last case depends on timing; the first two decide from the data alone.
Cross-symbol input: a bar of a symbol other than BTCUSDT also waits for BTC's snapshot of the same bar
(`btc_snapshot`, see the agent for how it gets there).

Duplicates and late bars (open_time not after the last released one) are passed on so the engine drops and
counts them. `to_state()` is plain data: pending events survive a restart with the engine state.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

from connectors.replay import KIND_FUNDING, KIND_KLINE, KIND_MARK
from streams.features.engine import BAR_MS, BtcSnapshot, SymbolFeatures

KIND_OPEN_INTEREST = 3  # after the replay's kinds: the offline sort order at equal event time
CONTEXT_KINDS = (KIND_MARK, KIND_FUNDING, KIND_OPEN_INTEREST)
INPUT_TOPICS = {"md.klines": KIND_KLINE, "md.markprice": KIND_MARK, "md.funding": KIND_FUNDING,
                "md.openinterest": KIND_OPEN_INTEREST}  # the features agent's inputs, besides BTC_TOPIC
TOPIC_OF_KIND = {kind: name for name, kind in INPUT_TOPICS.items()}
BTC_TOPIC = "features.btc"
# a bar from the exchange (source binance-ws or binance-rest) makes a features record of this source, which the
# chain carries on: the risk guard judges the freshness of live data by it (a replayed bar keeps the engine's)
EXCHANGE_SOURCE = "binance"

# btc_snapshot(open_time) → (decided, snapshot): (False, None) = wait; (True, None) = go on without BTC
BtcLookup = Callable[[int], tuple[bool, BtcSnapshot | None]]


class FeatureSequencer:
    def __init__(self, engine: SymbolFeatures) -> None:
        self.engine = engine
        self.klines: list[tuple[int, dict]] = []  # (open_time, bar), sorted; held until released
        self.context: list[tuple[int, int, int, dict]] = []  # (event_time, kind, seq, record), sorted
        self.seq = 0  # arrival number: equal (time, kind) keep their arrival order, as the stable offline sort
        self.watermark: dict[int, int] = {}  # kind → newest event_time seen
        self.cadence: dict[int, int] = {}  # kind → smallest positive gap between event times seen

    @property
    def symbol(self) -> str:
        return self.engine.symbol

    def add(self, kind: int, record: dict) -> None:
        if kind == KIND_KLINE:
            bisect.insort(self.klines, (record["open_time"], record), key=lambda x: x[0])
            return
        t = record["event_time"]
        last = self.watermark.get(kind)
        if last is None or t > last:
            if last is not None:
                gap = t - last
                self.cadence[kind] = min(self.cadence.get(kind, gap), gap)
            self.watermark[kind] = t
        self.seq += 1
        bisect.insort(self.context, (t, kind, self.seq, record), key=lambda x: x[:3])

    def pending(self) -> int:
        return len(self.klines)

    def oldest_pending(self) -> int | None:
        return self.klines[0][0] if self.klines else None

    def _context_known(self, kind: int, close_time: int, context_complete: Callable[[int], bool]) -> bool:
        mark = self.watermark.get(kind)
        if mark is not None and (mark >= close_time or mark + self.cadence.get(kind, -1) >= close_time):
            return True
        return context_complete(kind)

    def release(self, context_complete: Callable[[int], bool], btc_snapshot: BtcLookup) -> list[dict]:
        """The features records of every bar that can be released now, in order."""
        out: list[dict] = []
        engine = self.engine
        while self.klines:
            ot, bar = self.klines[0]
            ct = bar["close_time"]
            if not all(self._context_known(kind, ct, context_complete) for kind in CONTEXT_KINDS):
                break
            btc: BtcSnapshot | None = None
            if not engine.is_btc and (engine.last_open_time is None or ot > engine.last_open_time):
                decided, btc = btc_snapshot(ot)
                if not decided:
                    break
            self.klines.pop(0)
            self._apply_context(before=ct)
            record = engine.on_kline(bar, btc)
            if record is not None:
                if (bar.get("source") or "").startswith(EXCHANGE_SOURCE):
                    record["source"] = EXCHANGE_SOURCE
                out.append(record)
        if not self.klines and engine.last_open_time is not None:
            # context stamped up to the last bar's close belongs before the next bar, whichever it is
            self._apply_context(before=engine.last_open_time + BAR_MS)
        return out

    def _apply_context(self, before: int) -> None:
        context = self.context
        n = 0
        for t, kind, _, record in context:
            if t >= before:
                break
            if kind == KIND_MARK:
                self.engine.on_mark(record)
            elif kind == KIND_FUNDING:
                self.engine.on_funding(record)
            else:
                self.engine.on_open_interest(record)
            n += 1
        del context[:n]

    # -- state --------------------------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {
            "engine": self.engine.to_state(),
            "klines": [bar for _, bar in self.klines],
            "context": [[kind, record] for _, kind, _, record in self.context],
            "watermark": {str(k): v for k, v in self.watermark.items()},
            "cadence": {str(k): v for k, v in self.cadence.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureSequencer:
        seq = cls(SymbolFeatures.from_state(state["engine"]))
        seq.klines = [(bar["open_time"], bar) for bar in state["klines"]]
        for kind, record in state["context"]:
            seq.seq += 1
            seq.context.append((record["event_time"], kind, seq.seq, record))
        seq.watermark = {int(k): v for k, v in state["watermark"].items()}
        seq.cadence = {int(k): v for k, v in state["cadence"].items()}
        return seq
