"""The streaming features: the sequencer restores the offline order from any arrival order, and the agent through
the real broker writes the same rows as the offline build (parity), one per bar, surviving a SIGKILLed worker."""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections import defaultdict, deque
from pathlib import Path

import pandas as pd
import pytest

from connectors.clickhouse_store import Store
from schemas.catalog import topic
from schemas.tables import columns
from streams.features.engine import BTC_SYMBOL, BtcSnapshot, SymbolFeatures
from streams.features.offline import compute
from streams.features.registry import NAMES
from streams.features.sequencer import KIND_KLINE, FeatureSequencer
from streams.settings import Settings
from tests.conftest import PERPFLOW, ROOT, cli_env, run_cli
from tests.test_features_engine import ABS, JAN1, REL, ref_rsi, replay_events
from tests.test_indicators import ref_atr

SYMBOLS = ("BTCUSDT", "ETHUSDT", "1000PEPEUSDT")
VALUE_COLUMNS = [c.name for c in columns(topic("features"))]


def without_source(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "source"} for r in rows]


# ---------------------------------------------------------------------------------------------- the sequencer
@pytest.mark.parametrize("seed", [1, 2])
def test_sequencer_restores_the_offline_order_from_any_interleaving(seed):
    """Topics are consumed in bursts of up to 3000 events from one (symbol, topic) at a time and BTC's snapshots
    reach the others late: the released records are exactly the offline ones."""
    events = replay_events(SYMBOLS)
    want = compute(events)
    rng = random.Random(seed)
    queues: dict[tuple[str, int], deque] = defaultdict(deque)
    for kind, record in events:
        queues[(record["symbol"], kind)].append((kind, record))
    sequencers = {s: FeatureSequencer(SymbolFeatures(s, "offline")) for s in SYMBOLS}
    visible: dict[int, BtcSnapshot] = {}
    in_flight: deque[BtcSnapshot] = deque()
    got: dict[str, list[dict]] = defaultdict(list)

    def btc_lookup(ot: int):
        if ot in visible:
            return True, visible[ot]
        return (True, None) if visible and max(visible) > ot else (False, None)

    def release(symbol: str) -> None:
        seq = sequencers[symbol]
        done = lambda kind: not queues[(symbol, kind)]  # noqa: E731 — the topic is read to its end
        for record in seq.release(done, btc_lookup):
            got[symbol].append(record)
            if symbol == BTC_SYMBOL:
                in_flight.append(BtcSnapshot(record["open_time"], record["ema_50"], record["ema_200"], record["r_1"]))

    held_most = 0
    while any(queues.values()) or in_flight:
        live = [k for k, q in queues.items() if q]
        if live:
            q = queues[rng.choice(live)]
            for _ in range(min(len(q), rng.randint(1, 3000))):
                kind, record = q.popleft()
                sequencers[record["symbol"]].add(kind, record)
        for _ in range(rng.randint(0, len(in_flight))):
            snap = in_flight.popleft()
            visible[snap.open_time] = snap
        for symbol in rng.sample(SYMBOLS, len(SYMBOLS)):
            release(symbol)
        held_most = max(held_most, max(s.pending() for s in sequencers.values()))
    for symbol in SYMBOLS:
        release(symbol)
        assert sequencers[symbol].pending() == 0
    assert held_most > 100  # the interleaving really did run ahead
    for symbol in SYMBOLS:
        assert len(got[symbol]) == len(want[symbol]) > 8000
        assert without_source(got[symbol]) == without_source(want[symbol])  # bit for bit: same code, same order


def test_bars_from_the_exchange_make_features_records_of_the_exchange():
    """The risk guard judges the freshness of live data by the source the chain carries: a bar from Binance
    (WebSocket or REST backfill) makes a `binance` features record; a replayed bar keeps the engine's source."""
    events = [e for e in replay_events(("ETHUSDT",)) if e[1]["event_time"] < JAN1]
    bars = [r for k, r in events if k == KIND_KLINE]
    for i, bar in enumerate(bars):
        bar["source"] = "binance-rest" if i < 100 else "binance-ws" if i < 200 else bar["source"]
    seq = FeatureSequencer(SymbolFeatures("ETHUSDT", "stream"))
    for kind, record in events:
        seq.add(kind, record)
    records = seq.release(lambda kind: True, lambda ot: (True, None))
    assert len(records) == len(bars) > 200
    assert [r["source"] for r in records] == ["binance"] * 200 + ["stream"] * (len(bars) - 200)


def test_sequencer_state_round_trip_keeps_held_events():
    events = [e for e in replay_events(("ETHUSDT",)) if e[1]["event_time"] < JAN1]
    bars = [r for k, r in events if k == KIND_KLINE]
    seq = FeatureSequencer(SymbolFeatures("ETHUSDT"))
    for kind, record in events[:-50]:
        seq.add(kind, record)
    never = lambda kind: False  # noqa: E731
    first = seq.release(never, lambda ot: (True, None))
    assert seq.pending() > 0  # the last bars wait for marks not yet seen
    restored = FeatureSequencer.from_state(seq.to_state())
    for s in (seq, restored):
        for kind, record in events[-50:]:
            s.add(kind, record)
    a = seq.release(lambda kind: True, lambda ot: (True, None))
    b = restored.release(lambda kind: True, lambda ot: (True, None))
    assert a == b and len(first) + len(a) == len(bars)


# ------------------------------------------------------------------------------------------ through the broker
def stored(home: Path, where: str = "1") -> dict[str, list[dict]]:
    store = Store(Settings(home=home, clickhouse_url=""))
    try:
        rows = store.query_rows(f"SELECT {', '.join(VALUE_COLUMNS)} FROM features FINAL WHERE {where} "
                                "ORDER BY symbol, open_time")
    finally:
        store.close()
    out: dict[str, list[dict]] = defaultdict(list)
    for values in rows:
        record = dict(zip(VALUE_COLUMNS, values, strict=True))
        for k in ("event_time", "open_time", "close_time"):
            if not isinstance(record[k], int):
                record[k] = int(pd.Timestamp(record[k]).timestamp() * 1000)
        out[record["symbol"]].append(record)
    return out


def assert_rows_equal(got: list[dict], want: list[dict]) -> None:
    assert [r["open_time"] for r in got] == [r["open_time"] for r in want]
    for g, w in zip(got, want, strict=True):
        for name in (*NAMES, "ready", "gap_bars", "schema_version"):
            a, b = g[name], w[name]
            if isinstance(b, bool) or b is None or isinstance(b, int):
                assert a == b, (g["symbol"], g["open_time"], name, a, b)
            else:
                assert a is not None and math.isclose(a, b, rel_tol=REL, abs_tol=ABS), (g["open_time"], name, a, b)


def up(home: Path, *args: str, **env: str):
    return run_cli(home, "up", "--source", "replay", "--data", str(ROOT / "data/binance-um-futures"),
                   "--speed", "max", "--until-drained", *args, timeout=600, **env)


def test_stream_equals_offline_build_on_a_month_of_three_symbols(home):
    """30 days of BTC, ETH and 1000PEPE through Tansu and the agent vs `perpflow features build` from ClickHouse."""
    done = up(home, "--symbols", ",".join(SYMBOLS))
    assert done.returncode == 0, done.stderr[-3000:]
    streamed = stored(home)
    built = run_cli(home, "features", "build", "--symbols", ",".join(SYMBOLS), "--start", "2023-12-01",
                    "--end", "2024-02-01")
    assert built.returncode == 0, built.stderr[-3000:]
    offline = stored(home)
    for symbol in SYMBOLS:
        assert len(streamed[symbol]) == len(offline[symbol]) > 8600  # 30 days and more, one row per bar
        assert sum(r["ready"] for r in streamed[symbol]) > 7000
        assert_rows_equal(streamed[symbol], offline[symbol])
    assert stored(home, "source = 'stream'") == {}  # the build replaced every streamed row: same event ids


def test_a_week_of_two_symbols_has_one_row_per_bar_matching_independent_indicators(home):
    done = up(home, "--symbols", "BTCUSDT,ETHUSDT", "--start", "2024-01-01", "--end", "2024-01-08")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "features" in done.stdout
    rows = stored(home)
    store = Store(Settings(home=home, clickhouse_url=""))
    try:
        bars = store.query_rows("SELECT symbol, high, low, close FROM md_klines FINAL ORDER BY symbol, open_time")
    finally:
        store.close()
    for symbol in ("BTCUSDT", "ETHUSDT"):
        got = rows[symbol]
        assert len(got) == 2016 and len({r["open_time"] for r in got}) == 2016
        assert all(r["source"] == "stream" for r in got)
        high, low, close = ([b[i] for b in bars if b[0] == symbol] for i in (1, 2, 3))
        ema_21 = pd.Series(close).ewm(span=21, adjust=False).mean().tolist()
        for name, want in (("rsi_14", ref_rsi(close)), ("atr_14", ref_atr(high, low, close, 14)), ("ema_21", ema_21)):
            for r, w in zip(got, want, strict=True):
                assert (r[name] is None) == (w is None or w != w), (symbol, name, r["open_time"])
                assert r[name] is None or math.isclose(r[name], w, rel_tol=REL, abs_tol=ABS), (symbol, name)


def _worker_pid(up_pid: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == up_pid and b"worker" in cmdline:
            return int(entry.name)
    return None


def test_sigkilled_worker_resumes_from_its_changelog(home):
    """Kill -9 the worker mid-replay: `up` restarts it, and the rows equal an uninterrupted offline run."""
    import subprocess

    args = [PERPFLOW, "up", "--source", "replay", "--data", str(ROOT / "data/binance-um-futures"), "--symbols",
            "BTCUSDT,ETHUSDT", "--start", "2023-12-25", "--end", "2024-01-04", "--speed", "20000", "--until-drained"]
    proc = subprocess.Popen(args, env=cli_env(home), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        killed = None
        deadline = time.monotonic() + 240
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            count = run_cli(home, "sql", "--format", "tsv", "SELECT count() FROM features", timeout=30)
            if count.returncode == 0 and int(count.stdout.split()[-1]) > 600:
                killed = _worker_pid(proc.pid)
                if killed:
                    os.kill(killed, signal.SIGKILL)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed, "the worker was not found mid-replay"
    assert proc.returncode == 0, err[-3000:]
    assert "worker restarts: 1" in out
    want = compute(replay_events(("BTCUSDT", "ETHUSDT"), JAN1 - 7 * 86_400_000, JAN1 + 3 * 86_400_000))
    rows = stored(home)
    for symbol in ("BTCUSDT", "ETHUSDT"):
        assert len(rows[symbol]) == len(want[symbol]) == 10 * 288
        assert_rows_equal(rows[symbol], want[symbol])


def test_agent_dead_letters_bad_input_and_keeps_going(broker, home):
    """Garbage and an impossible bar on md.klines go to deadletter with their reason; the good bars around them
    become features on the partition of their symbol, with the gap flagged."""
    from confluent_kafka import Consumer

    from schemas.codec import default_codec
    from streams.broker import consumer_config, end_offsets, ensure_topics
    from streams.up import wait_for_agents
    from streams.worker import WorkerProcess
    from tests.test_sink import kline, produce

    ensure_topics(broker.bootstrap)
    codec = default_codec()
    bad_bar = {**kline("ETHUSDT", 3), "high": 90.0}  # high below low
    messages = [("md.klines", "ETHUSDT", codec.encode("kline", kline("ETHUSDT", i))) for i in range(3)]
    messages += [("md.klines", "ETHUSDT", b"\xc3\x01 not avro at all"), ("md.klines", "ETHUSDT",
                 codec.encode("kline", bad_bar)), ("md.klines", "ETHUSDT", codec.encode("kline", kline("ETHUSDT", 5)))]
    produce(broker.bootstrap, messages)
    settings = Settings(home=home, kafka_bootstrap=broker.bootstrap, clickhouse_url="", worker_metrics_port=0,
                        symbols=["ETHUSDT"])
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, broker.bootstrap)
    try:
        wait_for_agents(broker.bootstrap, worker)
    finally:
        worker.stop()
    consumer = Consumer(consumer_config(broker.bootstrap, "test-read"))
    consumer.subscribe(["features", "deadletter"])
    got: dict[str, list] = {"features": [], "deadletter": []}
    deadline = time.monotonic() + 30
    while (len(got["features"]) < 4 or len(got["deadletter"]) < 2) and time.monotonic() < deadline:
        for msg in consumer.consume(100, timeout=0.5):
            if not msg.error():
                got[msg.topic()].append((msg.partition(), codec.decode(msg.value())[1]))
    consumer.close()
    klines_partition = next(p for (t, p), n in end_offsets(broker.bootstrap, ["md.klines"]).items() if n)
    assert [r["open_time"] for _, r in got["features"]] == [kline("ETHUSDT", i)["open_time"] for i in (0, 1, 2, 5)]
    assert {p for p, _ in got["features"]} == {klines_partition}  # co-partitioned with its input
    assert [r["gap_bars"] for _, r in got["features"]] == [0, 0, 0, 2]
    reasons = sorted(r["reason"] for _, r in got["deadletter"])
    assert reasons == ["invalid_value", "unknown_fingerprint"]
    assert all(r["source_topic"] == "md.klines" for _, r in got["deadletter"])
