"""Historical market-data files → clean per-symbol arrays for the replay source.

Reads, recursively under one directory:

* the freqtrade futures layout (Feather): ``BTC_USDT_USDT-5m-futures.feather`` (klines),
  ``BTC_USDT_USDT-8h-funding_rate.feather`` (the rate is in ``open``), ``BTC_USDT_USDT-8h-mark.feather``
  (mark-price klines);
* Binance public dumps (data.binance.vision, futures/um) as ``.csv`` or a ``.zip`` holding one CSV, with
  or without a header row: ``BTCUSDT-5m-2024-01.csv`` (klines; mark-price klines when under a
  ``markPriceKlines`` directory) and ``BTCUSDT-fundingRate-2024-01.csv``.

Nothing is dropped silently: every skipped file or row is counted in the LoadReport with one sentence
that names the file.
"""

from __future__ import annotations

import io
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from streams.errors import PerpflowError

KLINES, MARKS, FUNDING = "klines", "marks", "funding"
_WHAT = {KLINES: "kline", MARKS: "mark-price kline", FUNDING: "funding"}
_TIME_COLUMN = {KLINES: "open_time", MARKS: "open_time", FUNDING: "funding_time"}

_TF = r"\d+(?:mo|[smhdwM])"
_FREQTRADE_RE = re.compile(
    rf"^(?P<base>[A-Za-z0-9]+)_(?P<quote>[A-Za-z0-9]+)_(?P<settle>[A-Za-z0-9]+)-(?P<tf>{_TF})"
    r"-(?P<kind>futures|funding_rate|mark|index|premiumIndex)\.feather$")
_BINANCE_FUNDING_RE = re.compile(r"^(?P<symbol>[A-Za-z0-9_]+)-fundingRate-\d{4}-\d{2}(?:-\d{2})?\.(?:csv|zip)$")
_BINANCE_KLINE_RE = re.compile(rf"^(?P<symbol>[A-Za-z0-9_]+)-(?P<tf>{_TF})-\d{{4}}-\d{{2}}(?:-\d{{2}})?\.(?:csv|zip)$")
_DATA_SUFFIXES = {".csv", ".zip", ".feather"}
_FREQTRADE_KIND = {"futures": KLINES, "funding_rate": FUNDING, "mark": MARKS}
_UNUSED_DUMP_DIRS = {"indexPriceKlines": "index-price klines", "premiumIndexKlines": "premium-index klines"}

BINANCE_KLINE_COLUMNS = ["open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume",
                         "count", "taker_buy_volume", "taker_buy_quote_volume", "ignore"]
BINANCE_FUNDING_COLUMNS = ["calc_time", "funding_interval_hours", "last_funding_rate"]
_PRICES = ["open", "high", "low", "close"]
_OPTIONAL = ["quote_volume", "taker_buy_volume", "taker_buy_quote_volume", "trades"]
_MICROS_ABOVE = 1e14          # an epoch timestamp above this is in µs (ms stays below it until year 5138)
_MAX_MS = 253_402_300_800_000  # year 10000: anything later is not a timestamp
_EPOCH = pd.Timestamp(0, tz="UTC")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 2_592_000, "mo": 2_592_000}


@dataclass
class SymbolHistory:
    symbol: str                 # Binance style, e.g. "BTCUSDT", "1000PEPEUSDT"
    interval: str               # kline interval code, e.g. "5m"
    klines: pd.DataFrame        # open_time (int64 ms), open..volume, quote_volume, taker_buy_volume,
                                # taker_buy_quote_volume (float64, NaN = unknown), trades ("Int64", <NA> = unknown)
    funding: pd.DataFrame       # funding_time (int64 ms), funding_rate (float64)
    marks: pd.DataFrame         # mark-price klines: open_time (int64 ms), open, high, low, close
    mark_interval: str | None   # e.g. "8h"; None when no mark file was read


@dataclass
class LoadReport:
    files_read: list[str] = field(default_factory=list)        # paths relative to data_dir, rows taken in
    problems: list[str] = field(default_factory=list)          # one sentence per problem, naming the file
    skipped_rows: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped_rows.values())

    def _skip(self, reason: str, count: int, problem: str) -> None:
        if count > 0:
            self.skipped_rows[reason] = self.skipped_rows.get(reason, 0) + count
        self.problems.append(problem)


class HistoryError(PerpflowError):
    """Nothing usable was found; the message says what was looked for and in which directory."""


@dataclass(frozen=True)
class _Source:
    path: Path
    rel: str
    symbol: str
    kind: str
    timeframe: str | None
    layout: str  # "freqtrade" | "binance"


@dataclass(frozen=True)
class _Unused:
    symbol: str | None
    problem: str


@dataclass
class _Parsed:
    frame: pd.DataFrame  # "ts" (float64 ms, NaN = unusable), the kind's value columns, "_row"
    unit: str            # what "_row" counts: "row" (Feather), "line" (CSV file line), "data row" (parsed row)
    bad_lines: list[int] = field(default_factory=list)  # CSV lines skipped by the parser: too many fields


class _SkipFile(Exception):
    def __init__(self, reason: str, rows: int, message: str):
        super().__init__(message)
        self.reason, self.rows = reason, rows


# --------------------------------------------------------------------------------------------- discovery

def _classify(path: Path, rel: str) -> _Source | _Unused | None:
    name = path.name
    m = _FREQTRADE_RE.match(name)
    if m:
        symbol = (m["base"] + m["quote"]).upper()
        kind = _FREQTRADE_KIND.get(m["kind"])
        if kind is None:
            return _Unused(symbol, f"{rel}: freqtrade {m['kind']} candles are not used; file skipped.")
        return _Source(path, rel, symbol, kind, m["tf"], "freqtrade")
    m = _BINANCE_FUNDING_RE.match(name)
    if m:
        return _Source(path, rel, m["symbol"].upper(), FUNDING, None, "binance")
    m = _BINANCE_KLINE_RE.match(name)
    if m:
        symbol = m["symbol"].upper()
        dirs = set(path.parent.parts)
        for dirname, what in _UNUSED_DUMP_DIRS.items():
            if dirname in dirs:
                return _Unused(symbol, f"{rel}: {what} (a '{dirname}' dump) are not used; file skipped.")
        kind = MARKS if "markPriceKlines" in dirs else KLINES
        return _Source(path, rel, symbol, kind, m["tf"], "binance")
    if path.suffix.lower() in _DATA_SUFFIXES:
        return _Unused(None, f"{rel}: file name not recognised as a freqtrade futures or Binance kline, "
                             "mark-price or funding file; file skipped.")
    return None


def _discover(root: Path) -> tuple[list[_Source], list[_Unused]]:
    sources: list[_Source] = []
    unused: list[_Unused] = []
    for path in sorted(root.rglob("*")):
        rel_path = path.relative_to(root)
        if any(part.startswith(".") for part in rel_path.parts) or not path.is_file():
            continue
        found = _classify(path, rel_path.as_posix())
        if isinstance(found, _Source):
            sources.append(found)
        elif isinstance(found, _Unused):
            unused.append(found)
    return sources, unused


def _file_order(src: _Source) -> tuple[str, str]:
    return src.path.name, src.rel


def _tf_seconds(tf: str) -> int:
    unit = "mo" if tf.endswith("mo") else tf[-1]
    return int(tf[: -len(unit)]) * _UNIT_SECONDS[unit]


# --------------------------------------------------------------------------------------------- readers

def _numeric(s: pd.Series) -> np.ndarray:
    return pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def _epoch_to_ms(values: np.ndarray) -> np.ndarray:
    """Epoch numbers in ms, or µs when above 1e14 (some newer spot dumps), as float64 ms (NaN kept)."""
    with np.errstate(invalid="ignore"):
        return np.where(values > _MICROS_ABOVE, np.floor(values / 1000.0), values)


def _datetimes_to_ms(s: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        return _epoch_to_ms(_numeric(s))
    if not pd.api.types.is_datetime64_any_dtype(s):
        s = pd.to_datetime(s, utc=True, errors="coerce")
    elif s.dt.tz is None:
        s = s.dt.tz_localize("UTC")
    ms = (s - _EPOCH) // pd.Timedelta(milliseconds=1)
    return ms.to_numpy(dtype="float64", na_value=np.nan)


def _missing(columns: list[str], required: list[str]) -> list[str]:
    return [c for c in required if c not in columns]


def _missing_columns(src: _Source, missing: list[str], columns: list[str], rows: int) -> _SkipFile:
    return _SkipFile("missing_columns", rows,
                     f"{src.rel}: missing required column(s) {', '.join(missing)} (found: "
                     f"{', '.join(map(str, columns)) or 'none'}); file skipped with its {rows} row(s).")


def _read_freqtrade(src: _Source) -> _Parsed:
    df = pd.read_feather(src.path)
    columns = [str(c) for c in df.columns]
    required = {KLINES: ["date", *_PRICES, "volume"], MARKS: ["date", *_PRICES], FUNDING: ["date", "open"]}
    missing = _missing(columns, required[src.kind])
    if missing:
        raise _missing_columns(src, missing, columns, len(df))
    out = pd.DataFrame({"ts": _datetimes_to_ms(df["date"]), "_row": np.arange(1, len(df) + 1)})
    if src.kind == FUNDING:
        out["funding_rate"] = _numeric(df["open"])
        return _Parsed(out, "row")
    for c in _PRICES:
        out[c] = _numeric(df[c])
    if src.kind == KLINES:
        out["volume"] = _numeric(df["volume"])
        for c in _OPTIONAL:
            out[c] = np.nan
        out["_optbad"] = False
    return _Parsed(out, "row")


def _raw_bytes(path: Path) -> bytes:
    if path.suffix.lower() != ".zip":
        return path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        members = [i for i in zf.infolist() if not i.is_dir() and i.filename.lower().endswith(".csv")]
        if len(members) != 1:
            raise ValueError(f"expected exactly one CSV inside the zip, found {len(members)}")
        return zf.read(members[0])


def _looks_numeric(text: str) -> bool:
    try:
        float(text.strip().strip('"'))
    except ValueError:
        return False
    return True


def _line_numbers(raw: bytes, has_header: bool, bad_lines: list[int], rows: int) -> np.ndarray | None:
    """The file line of each parsed row (header, blank and skipped lines left out); None if unsure."""
    data = np.frombuffer(raw, dtype=np.uint8)
    ends = np.flatnonzero(data == 10)
    if len(data) and data[-1] != 10:
        ends = np.append(ends, len(data))
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else ends
    length = ends - starts
    first = data[np.minimum(starts, max(len(data) - 1, 0))] if len(data) else starts
    blank = (length == 0) | ((length == 1) & (first == 13))
    numbers = np.flatnonzero(~blank) + 1
    if has_header:
        numbers = numbers[1:]
    if bad_lines:
        numbers = numbers[~np.isin(numbers, bad_lines)]
    return numbers if len(numbers) == rows else None


def _read_binance(src: _Source) -> _Parsed:
    raw = _raw_bytes(src.path)
    head = raw[:4096].decode("utf-8-sig", errors="replace").lstrip()
    if not head.strip():
        raise _SkipFile("unreadable_file", 1, f"{src.rel}: could not be read (the file is empty); file skipped.")
    has_header = not _looks_numeric(head.splitlines()[0].split(",")[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = pd.read_csv(io.BytesIO(raw), header=0 if has_header else None, encoding="utf-8-sig",
                         on_bad_lines="warn", low_memory=False)
    bad_lines = sorted(int(n) for w in caught for n in re.findall(r"Skipping line (\d+)", str(w.message)))
    positional = BINANCE_FUNDING_COLUMNS if src.kind == FUNDING else BINANCE_KLINE_COLUMNS
    if has_header:
        df.columns = [str(c).strip().strip('"').lower() for c in df.columns]
    else:
        df.columns = [positional[i] if i < len(positional) else f"extra_{i}" for i in range(df.shape[1])]
    columns = list(df.columns)
    lines = _line_numbers(raw, has_header, bad_lines, len(df))
    row, unit = (lines, "line") if lines is not None else (np.arange(1, len(df) + 1), "data row")
    if src.kind == FUNDING:
        missing = _missing(columns, ["calc_time", "last_funding_rate"])
        if missing:
            raise _missing_columns(src, missing, columns, len(df) + len(bad_lines))
        out = pd.DataFrame({"ts": _epoch_to_ms(_numeric(df["calc_time"])), "_row": row,
                            "funding_rate": _numeric(df["last_funding_rate"])})
        return _Parsed(out, unit, bad_lines)
    missing = _missing(columns, ["open_time", *_PRICES] + (["volume"] if src.kind == KLINES else []))
    if missing:
        raise _missing_columns(src, missing, columns, len(df) + len(bad_lines))
    out = pd.DataFrame({"ts": _epoch_to_ms(_numeric(df["open_time"])), "_row": row})
    for c in _PRICES:
        out[c] = _numeric(df[c])
    if src.kind == MARKS:
        return _Parsed(out, unit, bad_lines)
    out["volume"] = _numeric(df["volume"])
    optbad = np.zeros(len(df), dtype=bool)
    for c in _OPTIONAL:
        source_column = "count" if c == "trades" else c
        if source_column in df.columns:
            values = _numeric(df[source_column])
            with np.errstate(invalid="ignore"):
                optbad |= ~np.isfinite(values) | (values < 0)
                if c == "trades":
                    optbad |= np.mod(values, 1) != 0
            out[c] = values
        else:
            out[c] = np.nan
    out["_optbad"] = optbad
    return _Parsed(out, unit, bad_lines)


# --------------------------------------------------------------------------------------------- validation

def _iso(ms: float) -> str:
    if not np.isfinite(ms) or not 0 <= ms < _MAX_MS:
        return repr(ms)
    ts = pd.Timestamp(int(ms), unit="ms", tz="UTC")
    frac = f".{int(ms) % 1000:03d}" if int(ms) % 1000 else ""
    return ts.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def _corrupt_checks(df: pd.DataFrame, kind: str) -> list[tuple[str, np.ndarray]]:
    ts = df["ts"].to_numpy(dtype="float64")
    with np.errstate(invalid="ignore"):
        checks = [("timestamp missing, not a whole number of ms or out of range",
                   ~np.isfinite(ts) | (ts < 0) | (ts >= _MAX_MS) | (np.mod(ts, 1) != 0))]
        if kind == FUNDING:
            rate = df["funding_rate"].to_numpy(dtype="float64")
            checks.append(("non-numeric or infinite funding rate", ~np.isfinite(rate)))
            return checks
        prices = df[_PRICES].to_numpy(dtype="float64")
        o, h, lo, c = prices.T
        checks += [
            ("non-numeric or infinite price", ~np.isfinite(prices).all(axis=1)),
            ("non-positive price", (prices <= 0).any(axis=1)),
            ("high below max(open, close)", h < np.maximum(o, c)),
            ("low above min(open, close)", lo > np.minimum(o, c)),
        ]
        if kind == KLINES:
            volume = df["volume"].to_numpy(dtype="float64")
            checks.append(("missing, non-numeric or negative volume", ~np.isfinite(volume) | (volume < 0)))
            checks.append(("missing, non-numeric or negative quote volume, taker volume or trade count",
                           df["_optbad"].to_numpy(dtype=bool)))
    return checks


def _report_rows(report: LoadReport, reason: str, rows: pd.DataFrame, files: list[tuple[str, str]], kind: str,
                 labels: np.ndarray | None = None) -> None:
    """One sentence per file and reason, with the first offending row's time and its line (CSV) or row."""
    if rows.empty:
        return
    report.skipped_rows[reason] = report.skipped_rows.get(reason, 0) + len(rows)
    what = _WHAT[kind]
    if labels is not None:
        rows = rows.assign(_label=labels)
    for src_index, group in rows.groupby("_src", sort=True):
        n = len(group)
        first = group.iloc[0]
        noun = "row" if n == 1 else "rows"
        file, unit = files[int(src_index)]
        where = f"{unit} {int(first['_row'])}"
        if reason != "corrupt_row" or np.isfinite(first["ts"]) and 0 <= first["ts"] < _MAX_MS:
            where = f"{_iso(first['ts'])} ({where})"
        if reason == "corrupt_row":
            counts = group["_label"].value_counts(sort=False)
            detail = ", ".join(f"{count} {label}" for label, count in counts.items())
            report.problems.append(f"{file}: skipped {n} corrupt {what} {noun} ({detail}); first at {where}.")
        elif reason == "duplicate_timestamp":
            report.problems.append(f"{file}: skipped {n} {what} {noun} with a duplicate timestamp (the first row "
                                   f"with that time was kept); first at {where}.")
        else:
            report.problems.append(f"{file}: skipped {n} non-monotonic {what} {noun} whose timestamp is earlier "
                                   f"than a preceding row's (not sorted back in); first at {where}.")


def _validate(df: pd.DataFrame, kind: str, files: list[tuple[str, str]], report: LoadReport) -> pd.DataFrame:
    """Corrupt rows out, then exact duplicate timestamps (first kept), then rows below the running max."""
    checks = _corrupt_checks(df, kind)
    masks = [mask for _, mask in checks]
    corrupt = np.logical_or.reduce(masks)
    if corrupt.any():
        labels = np.select(masks, [label for label, _ in checks], default="")
        _report_rows(report, "corrupt_row", df[corrupt], files, kind, labels[corrupt])
        df = df[~corrupt]
    duplicate = df["ts"].duplicated(keep="first").to_numpy()
    _report_rows(report, "duplicate_timestamp", df[duplicate], files, kind)
    df = df[~duplicate]
    ts = df["ts"].to_numpy(dtype="float64")
    previous_max = np.concatenate([[-np.inf], np.maximum.accumulate(ts)[:-1]]) if len(ts) else ts
    non_monotonic = ts < previous_max
    _report_rows(report, "non_monotonic", df[non_monotonic], files, kind)
    return df[~non_monotonic]


def _final_frame(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    out = pd.DataFrame({_TIME_COLUMN[kind]: df["ts"].to_numpy(dtype="float64").astype("int64")})
    if kind == FUNDING:
        out["funding_rate"] = df["funding_rate"].to_numpy(dtype="float64")
        return out
    for c in _PRICES:
        out[c] = df[c].to_numpy(dtype="float64")
    if kind == KLINES:
        for c in ["volume", "quote_volume", "taker_buy_volume", "taker_buy_quote_volume"]:
            out[c] = df[c].to_numpy(dtype="float64")
        out["trades"] = pd.array(df["trades"].to_numpy(dtype="float64"), dtype="Int64")
    return out


def _empty_parsed(kind: str) -> pd.DataFrame:
    columns = {FUNDING: ["funding_rate"], MARKS: _PRICES, KLINES: [*_PRICES, "volume", *_OPTIONAL]}[kind]
    df = pd.DataFrame({c: np.array([], dtype="float64") for c in ["ts", *columns]})
    if kind == KLINES:
        df["_optbad"] = np.array([], dtype=bool)
    return df


def _load_group(sources: list[_Source], kind: str, report: LoadReport) -> tuple[pd.DataFrame, int]:
    """Read the files of one symbol and kind in file-name order, concatenate, validate together."""
    sources = sorted(sources, key=_file_order)
    frames = []
    files = [(src.rel, "row") for src in sources]
    for index, src in enumerate(sources):
        reader = _read_freqtrade if src.layout == "freqtrade" else _read_binance
        try:
            parsed = reader(src)
        except _SkipFile as exc:
            report._skip(exc.reason, exc.rows, str(exc))
            continue
        except Exception as exc:  # any failure to read one file skips that file, reported
            report._skip("unreadable_file", 1, f"{src.rel}: could not be read ({type(exc).__name__}: "
                                               f"{' '.join(str(exc).split()) or 'no detail'}); file skipped.")
            continue
        report.files_read.append(src.rel)
        if parsed.bad_lines:
            n = len(parsed.bad_lines)
            report._skip("corrupt_row", n, f"{src.rel}: skipped {n} corrupt {_WHAT[kind]} "
                                           f"{'row' if n == 1 else 'rows'} with too many fields; first at "
                                           f"line {parsed.bad_lines[0]}.")
        files[index] = (src.rel, parsed.unit)
        frames.append(parsed.frame.assign(_src=index))
    combined = pd.concat(frames, ignore_index=True) if frames else _empty_parsed(kind).assign(_src=0, _row=0)
    clean = _validate(combined, kind, files, report)
    return _final_frame(clean, kind), len(frames)


def _window(df: pd.DataFrame, kind: str, start_ms: int | None, end_ms: int | None,
            as_of: bool) -> pd.DataFrame:
    t = df[_TIME_COLUMN[kind]].to_numpy()
    lo = 0 if start_ms is None else int(np.searchsorted(t, start_ms, side="left"))
    if as_of and lo > 0:
        lo -= 1  # the last row before start: the value known at the start
    hi = len(t) if end_ms is None else int(np.searchsorted(t, end_ms, side="left"))
    return df.iloc[lo:max(lo, hi)].reset_index(drop=True)


# --------------------------------------------------------------------------------------------- entry point

def _one_timeframe(files: list[_Source], interval: str, report: LoadReport) -> tuple[list[_Source], str | None]:
    """Files of one timeframe only (the kline interval if present, else the finest), so that e.g. 1h and 8h
    mark klines are not interleaved; files without a timeframe (Binance funding dumps) are always kept."""
    timeframes = {s.timeframe for s in files if s.timeframe is not None}
    if not timeframes:
        return files, None
    chosen = interval if interval in timeframes else min(timeframes, key=_tf_seconds)
    what = "mark-price klines" if files[0].kind == MARKS else "funding rates"
    for s in sorted(files, key=_file_order):
        if s.timeframe not in (None, chosen):
            report.problems.append(f"{s.rel}: {s.timeframe} {what} are not used (the {chosen} ones are); "
                                   "file skipped.")
    return [s for s in files if s.timeframe in (None, chosen)], chosen


def _window_text(start_ms: int | None, end_ms: int | None) -> str:
    if start_ms is None and end_ms is None:
        return ""
    start = _iso(start_ms) if start_ms is not None else "the beginning"
    end = _iso(end_ms) if end_ms is not None else "the end"
    return f" in [{start}, {end})"


def load_history(data_dir: str | Path, symbols: list[str] | None = None, start_ms: int | None = None,
                 end_ms: int | None = None, interval: str = "5m") -> tuple[dict[str, SymbolHistory], LoadReport]:
    """Load klines (of `interval`), funding and mark-price klines per symbol from the files under data_dir.

    Klines are kept for open_time in [start_ms, end_ms); funding and marks for time < end_ms, from the last
    row before start_ms on (the value known at the start). `symbols` (any case; None or empty = all) names
    Binance symbols. The report covers whole files, whatever the window.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise HistoryError(f"no history directory at {root} (looked for {interval} kline, funding and mark files)")
    if start_ms is not None and end_ms is not None and start_ms >= end_ms:
        raise ValueError(f"start_ms ({start_ms}) must be before end_ms ({end_ms})")
    wanted = {s.strip().upper() for s in symbols} if symbols else None
    sources, unused = _discover(root)
    klines_sources = [s for s in sources if s.kind == KLINES and s.timeframe == interval]
    available = sorted({s.symbol for s in klines_sources})
    other_intervals = sorted({str(s.timeframe) for s in sources if s.kind == KLINES and s.timeframe != interval
                              and (wanted is None or s.symbol in wanted)}, key=_tf_seconds)
    hint = f"; kline files of other intervals found: {', '.join(other_intervals)}" if other_intervals else ""
    looked_for = (f"freqtrade '<BASE>_<QUOTE>_<SETTLE>-{interval}-futures.feather' or Binance "
                  f"'<SYMBOL>-{interval}-YYYY-MM[-DD].csv/.zip'")
    if wanted is not None:
        absent = sorted(wanted - set(available))
        if absent:
            raise HistoryError(f"no {interval} kline files for {', '.join(absent)} under {root} (looked for "
                               f"{looked_for}); symbols with {interval} klines there: "
                               f"{', '.join(available) or 'none'}{hint}")
    if not available:
        raise HistoryError(f"no {interval} kline files under {root} (looked for {looked_for}){hint}")
    selected = sorted(wanted) if wanted is not None else available

    report = LoadReport()
    report.problems.extend(u.problem for u in unused if u.symbol is None or u.symbol in selected)
    histories: dict[str, SymbolHistory] = {}
    for symbol in selected:
        mine = [s for s in sources if s.symbol == symbol]
        kline_files = [s for s in klines_sources if s.symbol == symbol]
        klines, _ = _load_group(kline_files, KLINES, report)
        klines = _window(klines, KLINES, start_ms, end_ms, as_of=False)
        if klines.empty:
            report.problems.append(
                f"{symbol}: no usable {interval} klines{_window_text(start_ms, end_ms)} in "
                f"{', '.join(s.rel for s in sorted(kline_files, key=_file_order))}; symbol skipped.")
            continue
        funding_files, _ = _one_timeframe([s for s in mine if s.kind == FUNDING], interval, report)
        funding, _ = _load_group(funding_files, FUNDING, report)
        mark_files, mark_interval = _one_timeframe([s for s in mine if s.kind == MARKS], interval, report)
        marks, marks_read = _load_group(mark_files, MARKS, report)
        if not marks_read:
            mark_interval = None
        histories[symbol] = SymbolHistory(
            symbol=symbol, interval=interval, klines=klines,
            funding=_window(funding, FUNDING, start_ms, end_ms, as_of=True),
            marks=_window(marks, MARKS, start_ms, end_ms, as_of=True), mark_interval=mark_interval)
    if not histories:
        shown = "; ".join(report.problems[-5:])
        raise HistoryError(f"no usable {interval} klines{_window_text(start_ms, end_ms)} for "
                           f"{', '.join(selected)} under {root}: {shown}")
    return histories, report
