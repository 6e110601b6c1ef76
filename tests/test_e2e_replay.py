"""End to end, through the CLI, the real Tansu broker and the real chDB store: replay the bundled
real sample, archive every topic, query it back."""

from __future__ import annotations

import io
import json
import subprocess
import time
import urllib.request

import pandas as pd
import pytest

from tests.conftest import PERPFLOW, ROOT, SAMPLE, cli_env, run_cli

pytestmark = pytest.mark.e2e

REPLAY = ["up", "--source", "replay", "--data", str(SAMPLE), "--symbols", "BTCUSDT,ETHUSDT",
          "--start", "2024-01-01", "--end", "2024-01-08", "--speed", "max", "--until-drained"]
COUNT_SQL = "SELECT symbol, count() FROM md_klines FINAL GROUP BY symbol ORDER BY symbol"


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e") / "home"
    first = run_cli(home, *REPLAY)
    assert first.returncode == 0, first.stderr
    return home, first


def test_replay_archives_exactly_the_source_bars(replayed):
    home, first = replayed
    result = run_cli(home, "sql", COUNT_SQL, "--format", "tsv")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "BTCUSDT\t2016\nETHUSDT\t2016\n"
    assert "md.klines" in first.stdout and "4,032" in first.stdout  # the summary names topics and counts


@pytest.mark.parametrize("symbol, stem", [("BTCUSDT", "BTC_USDT_USDT"), ("ETHUSDT", "ETH_USDT_USDT")])
def test_archived_ohlcv_equal_the_source_file(replayed, symbol, stem):
    home, _ = replayed
    result = run_cli(home, "sql", "SELECT toUnixTimestamp64Milli(open_time) AS t, open, high, low, close, volume "
                     f"FROM md_klines FINAL WHERE symbol = '{symbol}' ORDER BY t", "--format", "csv")
    assert result.returncode == 0, result.stderr
    got = pd.read_csv(io.StringIO(result.stdout))
    src = pd.read_feather(SAMPLE / f"{stem}-5m-futures.feather")
    src = src[(src.date >= "2024-01-01") & (src.date < "2024-01-08")]
    assert len(got) == len(src) == 2016
    assert got["t"].tolist() == (src.date.astype("int64") // 1_000_000).tolist()
    for col in ("open", "high", "low", "close", "volume"):
        assert got[col].tolist() == src[col].tolist(), col


def test_funding_and_marks_are_archived_without_look_ahead(replayed):
    home, _ = replayed
    # every bar has a mark record whose funding rate is the last settlement at or before the bar's close
    result = run_cli(home, "sql", """
        SELECT count(), countIf(m.funding_rate != f.funding_rate)
        FROM (SELECT symbol, event_time, funding_rate FROM md_markprice FINAL) AS m
        ASOF LEFT JOIN (SELECT symbol, funding_time, funding_rate FROM md_funding FINAL) AS f
        ON m.symbol = f.symbol AND m.event_time >= f.funding_time""", "--format", "tsv")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "4032\t0\n"
    funding = run_cli(home, "sql", "SELECT symbol, count(), countIf(mark_price IS NULL) FROM md_funding FINAL "
                      "GROUP BY symbol ORDER BY symbol", "--format", "tsv")
    assert funding.stdout == "BTCUSDT\t21\t0\nETHUSDT\t21\t0\n"  # 7 days × 3 settlements, marks from the 8h file


def test_replaying_again_is_idempotent(replayed):
    home, _ = replayed
    again = run_cli(home, *REPLAY)
    assert again.returncode == 0, again.stderr
    result = run_cli(home, "sql", COUNT_SQL, "--format", "tsv")
    assert result.stdout == "BTCUSDT\t2016\nETHUSDT\t2016\n"


def test_sql_is_read_only(replayed):
    home, _ = replayed
    result = run_cli(home, "sql", "DROP TABLE md_klines")
    assert result.returncode == 1
    assert "read-only" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_while_up_holds_the_store_sql_and_topics_go_through_it(replayed):
    home, _ = replayed
    up = subprocess.Popen([PERPFLOW, "up", "--source", "replay", "--data", str(SAMPLE), "--symbols", "BTCUSDT",
                           "--start", "2024-01-08", "--speed", "600"], env=cli_env(home), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stack = home / "run" / "stack.json"
        deadline = time.monotonic() + 60
        while not stack.exists():
            assert up.poll() is None, up.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        deadline = time.monotonic() + 90  # new bars of 2024-01-08 arrive while up runs (one per 0.5 s at 600×)
        while True:
            result = run_cli(home, "sql", COUNT_SQL, "--format", "tsv", timeout=60)
            assert result.returncode == 0, result.stderr
            if int(result.stdout.splitlines()[0].split("\t")[1]) > 2016:
                break
            assert time.monotonic() < deadline, f"no new bars archived: {result.stdout}"
            time.sleep(1)
        topics = run_cli(home, "topics", timeout=60)
        assert topics.returncode == 0, topics.stderr
        assert "md.klines" in topics.stdout and "perpflow-sink" in topics.stdout
        info = json.loads(stack.read_text())
        assert info["pid"] == up.pid
        with urllib.request.urlopen(info["api_url"] + "/metrics", timeout=10) as r:
            exposition = r.read().decode()
        archived = metric(exposition, 'perpflow_sink_rows_total{table="md_klines"}')
        assert archived > 0, "the sink counts the rows it archived"
        consumed = metric(exposition, 'perpflow_messages_consumed_total{group="perpflow-sink",topic="md.klines"}')
        assert consumed >= archived
        assert 'perpflow_consumer_lag{group="perpflow-sink",partition="' in exposition
        assert 'perpflow_event_time_lag_seconds{group="perpflow-sink",topic="md.klines"}' in exposition
        assert 'perpflow_topic_end_offset{partition="' in exposition
    finally:
        up.terminate()
        up.wait(60)
    assert up.returncode in (0, 130), up.stderr.read()


def metric(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


def test_sql_without_a_store_says_what_to_run(tmp_path):
    result = run_cli(tmp_path / "empty", "sql", "SELECT 1")
    assert result.returncode == 1
    assert "make run" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["up", "--speed", "fast"], "--speed"),
    (["up", "--start", "yesterday"], "--start"),
    (["up", "--start", "2024-01-08", "--end", "2024-01-01"], "--end must be after --start"),
    (["up", "--data", "/nonexistent"], "not a directory"),
    (["sql", "SELECT 1", "--format", "xml"], "--format"),
])
def test_wrong_arguments_get_one_line(tmp_path, args, fragment):
    result = run_cli(tmp_path / "h", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
