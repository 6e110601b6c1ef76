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
