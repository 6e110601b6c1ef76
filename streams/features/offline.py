"""The offline driver of the feature engine: history archived in ClickHouse → the `features` table, through the
same SymbolFeatures the streaming agent runs (one implementation, two drivers).

Events are merged in the replay's order (`connectors.replay.build_timeline`): event time, then klines, marks,
funding, open interest, then symbol — except that BTCUSDT's kline goes first among the klines of one close time, so
its snapshot is there for the other symbols of the same bar. BTCUSDT is read as context even when it is not asked
for (its rows are then not written); without BTC data the btc fields are null.

Warm-up: bars from MARGIN_BARS before `start` (and context from 24 h before that) warm the state; only rows with
open_time in [start, end) are written. Rows are written with kafka_partition = kafka_offset = -1 (they did not
come through Kafka); the table deduplicates on event_id, so building a window again replaces its rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from operator import itemgetter

from connectors.clickhouse_store import Store
from connectors.replay import KIND_FUNDING, KIND_KLINE, KIND_MARK
from schemas.catalog import topic
from schemas.tables import arrow_table, columns
from streams.console import ProgressLine
from streams.errors import PerpflowError
from streams.features.engine import BAR_MS, BTC_SYMBOL, DAY_MS, INTERVAL, BtcSnapshot, SymbolFeatures
from streams.features.registry import READY_BARS, READY_HTF_BARS
from streams.features.sequencer import KIND_OPEN_INTEREST

MARGIN_BARS = 2000  # ≥ the longest warm-up (1308 bars for the 1h RSI, plus an unaligned start)
assert MARGIN_BARS >= max(READY_BARS, READY_HTF_BARS[60] * 12 + 11)
INSERT_ROWS = 50_000
OFFLINE_SOURCE = "offline"
_SYMBOL = re.compile(r"^[A-Z0-9_]{1,40}$")


def sort_events(events: Iterable[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """(kind, record) in event-time order: time, kind, BTC's kline first, symbol; stable for equal keys."""
    def key(event: tuple[int, dict]) -> tuple:
        kind, record = event
        return record["event_time"], kind, record["symbol"] != BTC_SYMBOL, record["symbol"]

    return sorted(events, key=key)


class FeatureRun:
    """One SymbolFeatures per symbol, fed merged events; BTC's engine gives the other symbols its snapshot."""

    def __init__(self, source: str = OFFLINE_SOURCE) -> None:
        self.source = source
        self.engines: dict[str, SymbolFeatures] = {}

    def feed(self, kind: int, record: dict) -> dict | None:
        """The features record of a kline (None when the engine dropped it), None for a context event."""
        symbol = record["symbol"]
        engine = self.engines.get(symbol)
        if engine is None:
            engine = self.engines[symbol] = SymbolFeatures(symbol, self.source)
        if kind == KIND_KLINE:
            btc = self.engines.get(BTC_SYMBOL)
            return engine.on_kline(record, BtcSnapshot.of(btc) if btc is not None and btc is not engine else None)
        if kind == KIND_MARK:
            engine.on_mark(record)
        elif kind == KIND_FUNDING:
            engine.on_funding(record)
        elif kind == KIND_OPEN_INTEREST:
            engine.on_open_interest(record)
        else:
            raise ValueError(f"unknown event kind {kind}")
        return None

    def to_state(self) -> dict:
        return {"source": self.source, "engines": {s: e.to_state() for s, e in self.engines.items()}}

    @classmethod
    def from_state(cls, state: dict) -> FeatureRun:
        run = cls(state["source"])
        run.engines = {s: SymbolFeatures.from_state(e) for s, e in state["engines"].items()}
        return run


def compute(events: Iterable[tuple[int, dict]], source: str = OFFLINE_SOURCE,
            progress: ProgressLine | None = None) -> dict[str, list[dict]]:
    """Every features record per symbol, from events in any order (sorted here)."""
    run = FeatureRun(source)
    rows: dict[str, list[dict]] = {}
    for i, (kind, record) in enumerate(sort_events(events)):
        row = run.feed(kind, record)
        if row is not None:
            rows.setdefault(row["symbol"], []).append(row)
        if progress is not None and i % 2000 == 0:
            progress.update(i)
    return rows


# -- ClickHouse ---------------------------------------------------------------------------------------------------
def _ms(column: str) -> str:
    return f"toUnixTimestamp64Milli({column})"


def _since(column: str, ms: int) -> str:
    return f"{column} >= fromUnixTimestamp64Milli(toInt64({int(ms)}), 'UTC')"


def _before(column: str, ms: int) -> str:
    return f"{column} < fromUnixTimestamp64Milli(toInt64({int(ms)}), 'UTC')"


def read_events(store: Store, symbols: list[str], lo_ms: int, end_ms: int) -> list[tuple[int, dict]]:
    """Klines with open_time in [lo, end) and the context from 24 h before lo, of `symbols`, from the archive."""
    where = "symbol IN (" + ", ".join(f"'{s}'" for s in symbols) + ")"
    ctx = f"{where} AND {_since('event_time', lo_ms - DAY_MS)} AND {_before('event_time', end_ms + BAR_MS)}"
    events: list[tuple[int, dict]] = []
    for s, iv, ot, ct, o, h, low, c, v in store.query_rows(
            f"SELECT symbol, interval, {_ms('open_time')}, {_ms('close_time')}, open, high, low, close, volume "
            f"FROM md_klines FINAL WHERE {where} AND interval = '{INTERVAL}' AND {_since('open_time', lo_ms)} "
            f"AND {_before('open_time', end_ms)}"):
        events.append((KIND_KLINE, {"symbol": s, "interval": iv, "open_time": ot, "close_time": ct, "event_time": ct,
                                    "open": o, "high": h, "low": low, "close": c, "volume": v}))
    for s, t, mark, rate, nft in store.query_rows(
            f"SELECT symbol, {_ms('event_time')}, mark_price, funding_rate, {_ms('next_funding_time')} "
            f"FROM md_markprice FINAL WHERE {ctx}"):
        events.append((KIND_MARK, {"symbol": s, "event_time": t, "mark_price": mark, "funding_rate": rate,
                                   "next_funding_time": nft}))
    for s, t, ft, rate in store.query_rows(
            f"SELECT symbol, {_ms('event_time')}, {_ms('funding_time')}, funding_rate FROM md_funding FINAL "
            f"WHERE {ctx}"):
        events.append((KIND_FUNDING, {"symbol": s, "event_time": t, "funding_time": ft, "funding_rate": rate}))
    for s, t, oi in store.query_rows(
            f"SELECT symbol, {_ms('event_time')}, open_interest FROM md_openinterest FINAL WHERE {ctx}"):
        events.append((KIND_OPEN_INTEREST, {"symbol": s, "event_time": t, "open_interest": oi}))
    return events


def insert_rows(store: Store, rows: list[dict]) -> None:
    """Insert in chunks; offline rows did not come through Kafka: partition and offset are -1."""
    t = topic("features")
    values = itemgetter(*(c.name for c in columns(t)))
    for i in range(0, len(rows), INSERT_ROWS):
        chunk = [values(r) for r in rows[i:i + INSERT_ROWS]]
        store.insert_arrow(t.table, arrow_table(t, chunk, [-1] * len(chunk), [-1] * len(chunk)))


def build_features(store: Store, symbols: list[str], start_ms: int, end_ms: int, margin_bars: int = MARGIN_BARS,
                   show_progress: bool = True) -> dict[str, list[dict]]:
    """Compute the features of `symbols` for bars with open_time in [start, end), write them to `features` and
    return them per symbol (every requested symbol has an entry, maybe empty)."""
    bad = [s for s in symbols if not _SYMBOL.match(s)]
    if bad:
        raise PerpflowError(f"not a symbol: {', '.join(bad)} (use Binance names such as BTCUSDT)")
    if end_ms <= start_ms:
        raise PerpflowError("the end must be after the start")
    wanted = sorted(set(symbols))
    events = read_events(store, sorted(set(wanted) | {BTC_SYMBOL}), start_ms - margin_bars * BAR_MS, end_ms)
    progress = ProgressLine("features", total=len(events), unit="events") if show_progress else None
    computed = compute(events, OFFLINE_SOURCE, progress)
    rows = {s: [r for r in computed.get(s, []) if r["open_time"] >= start_ms] for s in wanted}
    if progress is not None:
        progress.done(len(events))
    store.ensure_tables([topic("features")])
    insert_rows(store, [r for s in wanted for r in rows[s]])
    return rows
