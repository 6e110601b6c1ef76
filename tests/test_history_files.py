"""connectors.history_files: freqtrade Feather and Binance dump files → validated per-symbol frames.

Every expectation is written out by hand from the tiny inputs each test builds (times are minutes after
T0 = 2024-01-01T00:00:00Z), plus one test on the bundled real slice."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from connectors.history_files import HistoryError, LoadReport, load_history
from streams.errors import PerpflowError

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "binance-um-futures"
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z in ms
MIN = 60_000
KLINE_HEADER = ("open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,"
                "taker_buy_quote_volume,ignore")
FUNDING_HEADER = "calc_time,funding_interval_hours,last_funding_rate"


def at(minutes: float) -> int:
    return T0 + int(minutes * MIN)


def feather(path: Path, minutes: list[float], rows: list[tuple], columns=("open", "high", "low", "close", "volume")):
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=list(columns))
    df.insert(0, "date", pd.to_datetime([at(m) for m in minutes], unit="ms", utc=True))
    df.to_feather(path)


def kline_line(minutes: float, o="1.0", h="2.0", lo="0.5", c="1.5", v="10", qv="15", n="3", tbv="4", tbqv="6",
               extra: str = "") -> str:
    t = at(minutes)
    return f"{t},{o},{h},{lo},{c},{v},{t + 5 * MIN - 1},{qv},{n},{tbv},{tbqv},0{extra}"


def write(path: Path, lines: list[str], header: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(([header] if header else []) + lines) + "\n")
    return path


def times(df: pd.DataFrame, column: str = "open_time") -> list[float]:
    """Timestamps as minutes after T0, to compare with the hand-written inputs."""
    return [(t - T0) / MIN for t in df[column].tolist()]


def only_problem_with(report: LoadReport, needle: str) -> str:
    hits = [p for p in report.problems if needle in p]
    assert len(hits) == 1, report.problems
    return hits[0]


# --------------------------------------------------------------------------------------------- real data

def test_bundled_slice_btcusdt_matches_the_feather_file():
    histories, report = load_history(SAMPLE, ["btcusdt"])
    assert list(histories) == ["BTCUSDT"]
    h = histories["BTCUSDT"]
    k = h.klines
    assert (h.symbol, h.interval, h.mark_interval) == ("BTCUSDT", "5m", "8h")
    assert len(k) == 8928
    assert k["open_time"].iloc[0] == 1_702_080_000_000  # 2023-12-09T00:00:00Z
    assert k["open_time"].iloc[-1] == 1_702_080_000_000 + 8927 * 300_000
    assert (np.diff(k["open_time"].to_numpy()) == 300_000).all()
    assert k["open_time"].dtype == np.int64 and k["trades"].dtype == "Int64"
    raw = pd.read_feather(SAMPLE / "BTC_USDT_USDT-5m-futures.feather")
    for column in ["open", "high", "low", "close", "volume"]:
        np.testing.assert_array_equal(k[column].to_numpy(), raw[column].to_numpy())
    assert k["quote_volume"].isna().all() and k["trades"].isna().all()
    assert len(h.funding) == 94 and len(h.marks) == 94
    assert h.funding["funding_time"].iloc[0] == 1_702_051_200_000  # 2023-12-08T16:00:00Z
    raw_funding = pd.read_feather(SAMPLE / "BTC_USDT_USDT-8h-funding_rate.feather")
    np.testing.assert_array_equal(h.funding["funding_rate"].to_numpy(), raw_funding["open"].to_numpy())
    assert sorted(report.files_read) == ["BTC_USDT_USDT-5m-futures.feather", "BTC_USDT_USDT-8h-funding_rate.feather",
                                         "BTC_USDT_USDT-8h-mark.feather"]
    assert report.problems == [] and report.skipped_total == 0


def test_bundled_slice_all_symbols_and_one_day_window():
    histories, _ = load_history(SAMPLE)
    assert sorted(histories) == ["1000PEPEUSDT", "BTCUSDT", "ETHUSDT"]
    day = 1_702_166_400_000  # 2023-12-10T00:00:00Z
    histories, report = load_history(SAMPLE, ["ETHUSDT"], day, day + 86_400_000)
    h = histories["ETHUSDT"]
    assert len(h.klines) == 288
    assert h.klines["open_time"].iloc[0] == day
    # 16:00 the day before (the rate known at the start), then the day's three settlements
    assert h.funding["funding_time"].tolist() == [day - 8 * 3_600_000, day, day + 8 * 3_600_000,
                                                  day + 16 * 3_600_000]
    assert h.marks["open_time"].tolist() == h.funding["funding_time"].tolist()
    assert report.skipped_total == 0


# --------------------------------------------------------------------------------------------- freqtrade

def test_freqtrade_layout_maps_symbols_including_1000pepe(tmp_path):
    feather(tmp_path / "BTC_USDT_USDT-5m-futures.feather", [0, 5], [(10, 12, 9, 11, 100), (11, 13, 10, 12, 200)])
    sub = tmp_path / "binance" / "futures"
    feather(sub / "1000PEPE_USDT_USDT-5m-futures.feather", [0, 5, 10],
            [(0.001, 0.002, 0.0005, 0.0015, 1e9), (0.0015, 0.0016, 0.0014, 0.0014, 2e9),
             (0.0014, 0.0015, 0.0013, 0.0013, 3e9)])
    feather(sub / "1000PEPE_USDT_USDT-8h-funding_rate.feather", [-480, 0],
            [(0.0001, 0, 0, 0, 0), (-0.00025, 0, 0, 0, 0)])
    feather(sub / "1000PEPE_USDT_USDT-8h-mark.feather", [0], [(0.0011, 0.0021, 0.0006, 0.0016, 0)])
    feather(tmp_path / "ETH_USDT_USDT-1h-futures.feather", [0], [(2000, 2010, 1990, 2005, 5)])

    histories, report = load_history(tmp_path)
    assert sorted(histories) == ["1000PEPEUSDT", "BTCUSDT"]
    pepe = histories["1000PEPEUSDT"]
    assert (pepe.symbol, pepe.interval, pepe.mark_interval) == ("1000PEPEUSDT", "5m", "8h")
    assert times(pepe.klines) == [0, 5, 10]
    assert pepe.klines["close"].tolist() == [0.0015, 0.0014, 0.0013]
    assert pepe.klines["volume"].tolist() == [1e9, 2e9, 3e9]
    assert list(pepe.klines.columns) == ["open_time", "open", "high", "low", "close", "volume", "quote_volume",
                                         "taker_buy_volume", "taker_buy_quote_volume", "trades"]
    assert pepe.klines["taker_buy_volume"].isna().all() and pepe.klines["trades"].isna().all()
    assert times(pepe.funding, "funding_time") == [-480, 0]
    assert pepe.funding["funding_rate"].tolist() == [0.0001, -0.00025]
    assert pepe.marks.to_dict("list") == {"open_time": [T0], "open": [0.0011], "high": [0.0021],
                                          "low": [0.0006], "close": [0.0016]}
    btc = histories["BTCUSDT"]
    assert btc.klines["open"].tolist() == [10, 11]
    assert btc.mark_interval is None
    assert btc.funding.empty and list(btc.funding.columns) == ["funding_time", "funding_rate"]
    assert btc.funding["funding_time"].dtype == np.int64
    assert btc.marks.empty and list(btc.marks.columns) == ["open_time", "open", "high", "low", "close"]
    assert "ETH_USDT_USDT-1h-futures.feather" not in report.files_read
    assert len(report.files_read) == 4 and report.problems == [] and report.skipped_rows == {}

    hourly, _ = load_history(tmp_path, interval="1h")
    assert list(hourly) == ["ETHUSDT"] and hourly["ETHUSDT"].klines["close"].tolist() == [2005]
    just_pepe, _ = load_history(tmp_path, ["1000pepeUSDT"])
    assert list(just_pepe) == ["1000PEPEUSDT"]


def test_one_mark_and_funding_timeframe_is_used_and_the_others_reported(tmp_path):
    feather(tmp_path / "BTC_USDT_USDT-5m-futures.feather", [0], [(10, 12, 9, 11, 100)])
    feather(tmp_path / "BTC_USDT_USDT-1h-mark.feather", [0, 60], [(10, 11, 9, 10, 0), (10, 12, 9, 11, 0)])
    feather(tmp_path / "BTC_USDT_USDT-8h-mark.feather", [0], [(10, 13, 8, 12, 0)])
    feather(tmp_path / "BTC_USDT_USDT-1h-funding_rate.feather", [0], [(0.0001, 0, 0, 0, 0)])
    feather(tmp_path / "BTC_USDT_USDT-8h-funding_rate.feather", [0], [(0.0009, 0, 0, 0, 0)])
    histories, report = load_history(tmp_path)
    h = histories["BTCUSDT"]
    assert h.mark_interval == "1h"
    assert times(h.marks) == [0, 60] and h.marks["close"].tolist() == [10, 11]
    assert h.funding["funding_rate"].tolist() == [0.0001]
    assert "8h mark-price klines are not used" in only_problem_with(report, "BTC_USDT_USDT-8h-mark.feather")
    assert "8h funding rates are not used" in only_problem_with(report, "BTC_USDT_USDT-8h-funding_rate.feather")
    assert len(report.problems) == 2 and report.skipped_rows == {}


# --------------------------------------------------------------------------------------------- window

def test_window_is_end_exclusive_and_keeps_the_last_funding_and_mark_before_start(tmp_path):
    minutes = [5 * i for i in range(12)]  # 0 .. 55
    feather(tmp_path / "BTC_USDT_USDT-5m-futures.feather", minutes,
            [(100 + m, 101 + m, 99 + m, 100.5 + m, 1) for m in minutes])
    feather(tmp_path / "BTC_USDT_USDT-20m-funding_rate.feather", [0, 20, 40],
            [(0.0001, 0, 0, 0, 0), (0.0002, 0, 0, 0, 0), (0.0003, 0, 0, 0, 0)])
    feather(tmp_path / "BTC_USDT_USDT-15m-mark.feather", [0, 15, 30, 45],
            [(100, 102, 99, 101, 0), (115, 117, 114, 116, 0), (130, 132, 129, 131, 0), (145, 147, 144, 146, 0)])

    h = load_history(tmp_path, start_ms=at(25), end_ms=at(40))[0]["BTCUSDT"]
    assert times(h.klines) == [25, 30, 35]  # 40 is the exclusive end
    assert h.klines["open"].tolist() == [125, 130, 135]
    assert times(h.funding, "funding_time") == [20]  # as-of row; 40 is not < end
    assert h.funding["funding_rate"].tolist() == [0.0002]
    assert times(h.marks) == [15, 30]

    h = load_history(tmp_path, start_ms=at(20), end_ms=at(45))[0]["BTCUSDT"]
    assert times(h.klines) == [20, 25, 30, 35, 40]
    assert times(h.funding, "funding_time") == [0, 20, 40]  # 0 is the last row before start
    assert times(h.marks) == [15, 30]

    h = load_history(tmp_path, end_ms=at(10))[0]["BTCUSDT"]
    assert times(h.klines) == [0, 5]
    assert times(h.funding, "funding_time") == [0] and times(h.marks) == [0]

    h = load_history(tmp_path, start_ms=at(50))[0]["BTCUSDT"]
    assert times(h.klines) == [50, 55]
    assert times(h.funding, "funding_time") == [40] and times(h.marks) == [45]

    with pytest.raises(HistoryError, match="no usable 5m klines in \\[2024-01-02T00:00:00Z"):
        load_history(tmp_path, start_ms=at(24 * 60), end_ms=at(25 * 60))


# --------------------------------------------------------------------------------------------- Binance dumps

def test_binance_csv_with_header(tmp_path):
    write(tmp_path / "BTCUSDT-5m-2024-01.csv",
          [kline_line(0), kline_line(5, o="1.5", h="1.75", lo="1.25", c="1.25", v="20.5", qv="30", n="7",
                                     tbv="0", tbqv="0")], header=KLINE_HEADER)
    histories, report = load_history(tmp_path)
    expected = pd.DataFrame({
        "open_time": np.array([T0, T0 + 5 * MIN], dtype=np.int64),
        "open": [1.0, 1.5], "high": [2.0, 1.75], "low": [0.5, 1.25], "close": [1.5, 1.25],
        "volume": [10.0, 20.5], "quote_volume": [15.0, 30.0], "taker_buy_volume": [4.0, 0.0],
        "taker_buy_quote_volume": [6.0, 0.0], "trades": pd.array([3, 7], dtype="Int64")})
    pd.testing.assert_frame_equal(histories["BTCUSDT"].klines, expected)
    assert report.files_read == ["BTCUSDT-5m-2024-01.csv"]
    assert report.problems == [] and report.skipped_total == 0


def test_binance_csv_without_header_and_microsecond_times(tmp_path):
    write(tmp_path / "BTCUSDT-5m-2021-06.csv", [kline_line(0), kline_line(5, c="1.75")])
    us = [f"{at(m) * 1000},1,2,0.5,1.5,10,{(at(m) + 5 * MIN - 1) * 1000},15,3,4,6,0" for m in (0, 5)]
    write(tmp_path / "ETHUSDT-5m-2025-01.csv", us)
    histories, report = load_history(tmp_path)
    btc = histories["BTCUSDT"].klines
    assert times(btc) == [0, 5] and btc["close"].tolist() == [1.5, 1.75]
    assert btc["trades"].tolist() == [3, 3] and btc["quote_volume"].tolist() == [15.0, 15.0]
    assert histories["ETHUSDT"].klines["open_time"].tolist() == [T0, T0 + 5 * MIN]
    assert report.skipped_total == 0 and report.problems == []


def test_binance_zip_in_the_data_binance_vision_tree(tmp_path):
    folder = tmp_path / "data" / "futures" / "um" / "monthly" / "klines" / "BTCUSDT" / "5m"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "BTCUSDT-5m-2024-01.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("BTCUSDT-5m-2024-01.csv", "\n".join([KLINE_HEADER, kline_line(0), kline_line(5, v="11")]))
    (folder / "BTCUSDT-5m-2024-01.zip.CHECKSUM").write_text("abc  BTCUSDT-5m-2024-01.zip\n")
    histories, report = load_history(tmp_path)
    k = histories["BTCUSDT"].klines
    assert times(k) == [0, 5] and k["volume"].tolist() == [10.0, 11.0] and k["trades"].tolist() == [3, 3]
    assert report.files_read == ["data/futures/um/monthly/klines/BTCUSDT/5m/BTCUSDT-5m-2024-01.zip"]
    assert report.problems == []


def test_mark_dump_is_recognised_by_its_directory_and_index_dumps_are_not_used(tmp_path):
    write(tmp_path / "klines" / "BTCUSDT" / "5m" / "BTCUSDT-5m-2024-01.csv", [kline_line(0), kline_line(5)])
    write(tmp_path / "markPriceKlines" / "BTCUSDT" / "5m" / "BTCUSDT-5m-2024-01.csv",
          [kline_line(0, o="1.1", h="1.9", lo="0.9", c="1.4", v="0"),
           kline_line(5, o="1.4", h="1.6", lo="1.3", c="1.5", v="0")], header=KLINE_HEADER)
    write(tmp_path / "indexPriceKlines" / "BTCUSDT" / "5m" / "BTCUSDT-5m-2024-01.csv", [kline_line(0)])
    write(tmp_path / "premiumIndexKlines" / "BTCUSDT" / "5m" / "BTCUSDT-5m-2024-01.csv", [kline_line(0)])
    histories, report = load_history(tmp_path)
    h = histories["BTCUSDT"]
    assert h.mark_interval == "5m"
    assert h.marks.to_dict("list") == {"open_time": [T0, T0 + 5 * MIN], "open": [1.1, 1.4], "high": [1.9, 1.6],
                                       "low": [0.9, 1.3], "close": [1.4, 1.5]}
    assert h.klines["open"].tolist() == [1.0, 1.0] and h.klines["close"].tolist() == [1.5, 1.5]
    assert sorted(report.files_read) == ["klines/BTCUSDT/5m/BTCUSDT-5m-2024-01.csv",
                                         "markPriceKlines/BTCUSDT/5m/BTCUSDT-5m-2024-01.csv"]
    assert len(report.problems) == 2
    assert "not used" in only_problem_with(report, "indexPriceKlines/BTCUSDT/5m/BTCUSDT-5m-2024-01.csv")
    assert "not used" in only_problem_with(report, "premiumIndexKlines/BTCUSDT/5m/BTCUSDT-5m-2024-01.csv")
    assert report.skipped_rows == {}


def test_funding_dump_csv_and_zip(tmp_path):
    write(tmp_path / "BTCUSDT-5m-2024-01.csv", [kline_line(0)])
    write(tmp_path / "BTCUSDT-fundingRate-2024-01.csv",
          [f"{at(0)},8,0.00010000", f"{at(480)},8,-0.00002500"], header=FUNDING_HEADER)
    with zipfile.ZipFile(tmp_path / "BTCUSDT-fundingRate-2024-02.zip", "w") as zf:
        zf.writestr("BTCUSDT-fundingRate-2024-02.csv", f"{FUNDING_HEADER}\n{at(960) + 1},8,0.00030000\n")
    histories, report = load_history(tmp_path)
    f = histories["BTCUSDT"].funding
    assert f["funding_time"].tolist() == [T0, T0 + 480 * MIN, T0 + 960 * MIN + 1]
    assert f["funding_rate"].tolist() == [0.0001, -0.000025, 0.0003]
    assert f["funding_time"].dtype == np.int64 and f["funding_rate"].dtype == np.float64
    assert len(report.files_read) == 3 and report.problems == []


# --------------------------------------------------------------------------------------------- validation

def test_missing_columns_skip_the_file_and_count_its_rows(tmp_path):
    write(tmp_path / "BTCUSDT-5m-2024-01.csv", [kline_line(0), kline_line(5)], header=KLINE_HEADER)
    feather(tmp_path / "BTC_USDT_USDT-5m-futures.feather", [10, 15, 20], [(1, 2, 0.5, 1.5)] * 3,
            columns=("open", "high", "low", "close"))
    write(tmp_path / "BTCUSDT-fundingRate-2024-01.csv", [f"{at(0)},8", f"{at(480)},8"],
          header="calc_time,funding_interval_hours")
    histories, report = load_history(tmp_path)
    h = histories["BTCUSDT"]
    assert times(h.klines) == [0, 5]
    assert h.funding.empty
    assert report.skipped_rows == {"missing_columns": 5}
    feather_problem = only_problem_with(report, "BTC_USDT_USDT-5m-futures.feather")
    assert "volume" in feather_problem and "3 row" in feather_problem
    funding_problem = only_problem_with(report, "BTCUSDT-fundingRate-2024-01.csv")
    assert "last_funding_rate" in funding_problem and "2 row" in funding_problem
    assert report.files_read == ["BTCUSDT-5m-2024-01.csv"]


def test_unreadable_files_are_skipped_one_by_one(tmp_path):
    write(tmp_path / "BTCUSDT-5m-2024-01.csv", [kline_line(0)])
    (tmp_path / "BTCUSDT-5m-2024-02.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    with zipfile.ZipFile(tmp_path / "BTCUSDT-5m-2024-03.zip", "w") as zf:
        zf.writestr("a.csv", kline_line(10))
        zf.writestr("b.csv", kline_line(15))
    (tmp_path / "BTC_USDT_USDT-8h-mark.feather").write_bytes(b"\x00\x01garbage")
    (tmp_path / "BTCUSDT-fundingRate-2024-01.csv").write_text("")
    histories, report = load_history(tmp_path)
    h = histories["BTCUSDT"]
    assert times(h.klines) == [0]
    assert h.marks.empty and h.mark_interval is None and h.funding.empty
    assert report.skipped_rows == {"unreadable_file": 4}
    assert report.files_read == ["BTCUSDT-5m-2024-01.csv"]
    for name in ["BTCUSDT-5m-2024-02.zip", "BTCUSDT-5m-2024-03.zip", "BTC_USDT_USDT-8h-mark.feather",
                 "BTCUSDT-fundingRate-2024-01.csv"]:
        assert "could not be read" in only_problem_with(report, name)
    assert "BadZipFile" in only_problem_with(report, "BTCUSDT-5m-2024-02.zip")
    assert "found 2" in only_problem_with(report, "BTCUSDT-5m-2024-03.zip")


def test_duplicate_timestamps_keep_the_first_row_within_and_across_files(tmp_path):
    write(tmp_path / "BTCUSDT-5m-2024-01.csv",
          [kline_line(0, c="1.1"), kline_line(5, c="1.2"), kline_line(5, c="1.3"), kline_line(10, c="1.4")])
    write(tmp_path / "BTCUSDT-5m-2024-02.csv", [kline_line(10, c="1.9"), kline_line(15, c="1.6")],
          header=KLINE_HEADER)
    histories, report = load_history(tmp_path)
    k = histories["BTCUSDT"].klines
    assert times(k) == [0, 5, 10, 15]
    assert k["close"].tolist() == [1.1, 1.2, 1.4, 1.6]
    assert report.skipped_rows == {"duplicate_timestamp": 2}
    jan = only_problem_with(report, "BTCUSDT-5m-2024-01.csv")
    assert "1 kline row with a duplicate timestamp" in jan and "first at 2024-01-01T00:05:00Z (line 3)" in jan
    feb = only_problem_with(report, "BTCUSDT-5m-2024-02.csv")
    assert "duplicate timestamp" in feb and "first at 2024-01-01T00:10:00Z (line 2)" in feb  # line 1: header


def test_feather_duplicates_name_the_row(tmp_path):
    feather(tmp_path / "BTC_USDT_USDT-5m-futures.feather", [0, 5, 5, 10],
            [(10, 12, 9, 11, 1), (11, 13, 10, 12, 2), (12, 14, 11, 13, 3), (13, 15, 12, 14, 4)])
    histories, report = load_history(tmp_path)
    k = histories["BTCUSDT"].klines
    assert times(k) == [0, 5, 10] and k["volume"].tolist() == [1, 2, 4]
    assert report.skipped_rows == {"duplicate_timestamp": 1}
    assert report.problems == ["BTC_USDT_USDT-5m-futures.feather: skipped 1 kline row with a duplicate timestamp "
                               "(the first row with that time was kept); first at 2024-01-01T00:05:00Z (row 3)."]


def test_non_monotonic_rows_are_skipped_not_sorted_back_in(tmp_path):
    write(tmp_path / "BTCUSDT-5m-2024-01.csv", [kline_line(m, c=str(1 + m / 100)) for m in [0, 10, 20, 15, 25, 5, 30]])
    # file-name order puts the later bars first: the earlier file's rows that follow them are out of order
    write(tmp_path / "ETHUSDT-5m-2024-01.csv", [kline_line(30), kline_line(35)])
    write(tmp_path / "ETHUSDT-5m-2024-02.csv", [kline_line(0), kline_line(5), kline_line(40)])
    histories, report = load_history(tmp_path)
    btc = histories["BTCUSDT"].klines
    assert times(btc) == [0, 10, 20, 25, 30]
    assert btc["close"].tolist() == [1.0, 1.1, 1.2, 1.25, 1.3]
    assert times(histories["ETHUSDT"].klines) == [30, 35, 40]
    assert report.skipped_rows == {"non_monotonic": 4}
    btc_problem = only_problem_with(report, "BTCUSDT-5m-2024-01.csv")
    assert "2 non-monotonic kline rows" in btc_problem and "first at 2024-01-01T00:15:00Z (line 4)" in btc_problem
    eth_problem = only_problem_with(report, "ETHUSDT-5m-2024-02.csv")
    assert "2 non-monotonic kline rows" in eth_problem and "first at 2024-01-01T00:00:00Z (line 1)" in eth_problem


def test_corrupt_rows_are_counted_and_only_good_rows_survive(tmp_path):
    lines = [
        kline_line(0),                                    # good
        "",                                               # blank line: no data, not a row
        kline_line(5, o="abc"),                           # non-numeric price
        kline_line(10, o="-1"),                           # non-positive price
        kline_line(15, h="1.2"),                          # high 1.2 < close 1.5
        kline_line(20, lo="1.2", o="1.0"),                # low 1.2 > open 1.0
        kline_line(25, v="-3"),                           # negative volume
        kline_line(30, c="nan"),                          # NaN price
        kline_line(35, h="inf"),                          # infinite price
        "xyz,1,2,0.5,1.5,10,0,15,3,4,6,0",               # no timestamp
        kline_line(45, c="0"),                            # non-positive price, same time as the next row
        kline_line(45, c="1.25"),                         # good: the corrupt row before does not shadow it
        kline_line(50, extra=",7"),                       # 13 fields
        kline_line(55, n="2.5"),                          # fractional trade count
        kline_line(60),                                   # good
    ]
    write(tmp_path / "BTCUSDT-5m-2024-01.csv", lines)
    histories, report = load_history(tmp_path)
    k = histories["BTCUSDT"].klines
    assert times(k) == [0, 45, 60]
    assert k["close"].tolist() == [1.5, 1.25, 1.5]
    assert report.skipped_rows == {"corrupt_row": 11}
    assert report.skipped_total == 11
    assert len(report.problems) == 2
    assert all("BTCUSDT-5m-2024-01.csv" in p for p in report.problems)
    fields = only_problem_with(report, "too many fields")
    assert "1 corrupt kline row" in fields and "first at line 13" in fields
    rows = only_problem_with(report, "10 corrupt kline rows")
    for part in ["3 non-numeric or infinite price", "2 non-positive price", "1 high below max(open, close)",
                 "1 low above min(open, close)", "1 missing, non-numeric or negative volume",
                 "1 timestamp missing", "1 missing, non-numeric or negative quote volume, taker volume or trade count",
                 "first at 2024-01-01T00:05:00Z (line 3)"]:
        assert part in rows


def test_corrupt_funding_and_mark_rows(tmp_path):
    write(tmp_path / "BTCUSDT-5m-2024-01.csv", [kline_line(0)])
    write(tmp_path / "BTCUSDT-fundingRate-2024-01.csv",
          [f"{at(0)},8,0.0001", f"{at(480)},8,", f"{at(960)},8,-0.0002"], header=FUNDING_HEADER)
    write(tmp_path / "markPriceKlines" / "BTCUSDT-1h-2024-01.csv",
          [kline_line(0, v="0"), kline_line(60, lo="3", v="0"), kline_line(120, v="0")])
    histories, report = load_history(tmp_path)
    h = histories["BTCUSDT"]
    assert h.funding["funding_rate"].tolist() == [0.0001, -0.0002]
    assert times(h.marks) == [0, 120] and h.mark_interval == "1h"
    assert report.skipped_rows == {"corrupt_row": 2}
    funding_problem = only_problem_with(report, "BTCUSDT-fundingRate-2024-01.csv")
    assert "1 corrupt funding row (1 non-numeric or infinite funding rate)" in funding_problem
    assert "first at 2024-01-01T08:00:00Z (line 3)" in funding_problem
    mark_problem = only_problem_with(report, "markPriceKlines/BTCUSDT-1h-2024-01.csv")
    assert "1 corrupt mark-price kline row (1 low above min(open, close))" in mark_problem
    assert "first at 2024-01-01T01:00:00Z (line 2)" in mark_problem


def test_symbol_without_usable_klines_is_dropped_and_reported(tmp_path):
    write(tmp_path / "BTCUSDT-5m-2024-01.csv", [kline_line(0)])
    write(tmp_path / "ETHUSDT-5m-2024-01.csv", [kline_line(0, o="-5"), kline_line(5, v="-1")])
    histories, report = load_history(tmp_path)
    assert list(histories) == ["BTCUSDT"]
    assert report.skipped_rows == {"corrupt_row": 2}
    assert "symbol skipped" in only_problem_with(report, "ETHUSDT: no usable 5m klines in ETHUSDT-5m-2024-01.csv")
    with pytest.raises(HistoryError, match="no usable 5m klines for ETHUSDT"):
        load_history(tmp_path, ["ETHUSDT"])


# --------------------------------------------------------------------------------------------- errors

def test_unknown_symbol_names_the_missing_and_the_available_symbols(tmp_path):
    feather(tmp_path / "BTC_USDT_USDT-5m-futures.feather", [0], [(10, 12, 9, 11, 100)])
    feather(tmp_path / "1000PEPE_USDT_USDT-5m-futures.feather", [0], [(1, 2, 0.5, 1.5, 10)])
    feather(tmp_path / "DOGE_USDT_USDT-8h-funding_rate.feather", [0], [(0.0001, 0, 0, 0, 0)])
    with pytest.raises(HistoryError) as info:
        load_history(tmp_path, ["btcusdt", "dogeusdt"])
    message = str(info.value)
    assert "no 5m kline files for DOGEUSDT" in message
    assert "symbols with 5m klines there: 1000PEPEUSDT, BTCUSDT" in message
    assert str(tmp_path) in message
    assert isinstance(info.value, PerpflowError)


def test_nothing_usable_raises_with_what_was_looked_for(tmp_path):
    feather(tmp_path / "ETH_USDT_USDT-1h-futures.feather", [0], [(2000, 2010, 1990, 2005, 5)])
    with pytest.raises(HistoryError) as info:
        load_history(tmp_path)
    message = str(info.value)
    assert "no 5m kline files under" in message and str(tmp_path) in message
    assert "-5m-futures.feather" in message and "other intervals found: 1h" in message
    with pytest.raises(HistoryError, match="no history directory"):
        load_history(tmp_path / "absent")
