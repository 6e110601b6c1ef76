"""Where the benchmarks' real data comes from, and the replay window they use."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "binance-um-futures"  # the full real history, beside a checkout
BUNDLED = ROOT / "data" / "binance-um-futures"  # the small real sample shipped with the repository
SYMBOLS = ["BTCUSDT", "ETHUSDT", "1000PEPEUSDT"]
START_MS = 1_685_577_600_000  # 2023-06-01 00:00 UTC: ~301k 5m bars for the three symbols


def choose(quick: bool) -> tuple[Path, list[str] | None, int | None]:
    """(data directory, symbols, start_ms): the shared history from 2023-06-01, or all of the bundled
    sample with --quick or when the shared directory does not exist."""
    if quick or not SHARED.is_dir():
        return BUNDLED, None, None
    return SHARED, SYMBOLS, START_MS


def replay_events(data, symbols: list[str] | None, start_ms: int | None, end_ms: int | None) -> list[tuple[int, dict]]:
    """The files' klines, marks and funding as the replay publishes them, in the features' event-time order."""
    from connectors.replay import ReplaySource
    from streams.features.offline import sort_events
    from streams.features.sequencer import KIND_FUNDING, KIND_KLINE, KIND_MARK

    src = ReplaySource("", str(data), symbols, start_ms, end_ms)
    prepared, _ = src.load()
    events = []
    for p in prepared:
        events += [(KIND_KLINE, src.kline_record(p, r)) for r in range(len(p.kline_rows))]
        events += [(KIND_MARK, src.mark_record(p, r)) for r in range(len(p.kline_rows))]
        events += [(KIND_FUNDING, src.funding_record(p, r)) for r in range(len(p.funding_rows))]
    return sort_events(events)


SAMPLE_FIRST_MS, SAMPLE_END_MS = 1_702_080_000_000, 1_704_758_400_000  # the bundled sample: 2023-12-09 → 2024-01-09
DAY_MS = 86_400_000


def sample_plan(quick: bool):
    """The split of the bundled sample the trained benchmarks use, as `make run` makes it (14+ days trained, 5 warm
    the indicators up, 7 traded); `--quick` (in `make test`): the fewest days that still train, warm up and trade —
    14, 5 and 2 — for a run that proves the benchmark works, not one whose figures say much."""
    from streams.demo import plan

    if quick:
        return plan(str(BUNDLED), SYMBOLS, SAMPLE_FIRST_MS, SAMPLE_FIRST_MS + 21 * DAY_MS, trade_days=2)
    return plan(str(BUNDLED), SYMBOLS, SAMPLE_FIRST_MS, SAMPLE_END_MS)


def training_rounds(quick: bool) -> int:
    """Boosting rounds for the benchmarks' models: enough for predictions that vary (and so for trades)."""
    return 15 if quick else 60
