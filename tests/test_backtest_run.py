"""`perpflow backtest` through the real broker, worker, paper exchange and store, on the bundled real sample.

The home: two weeks replayed into the archive, labeled, both sides trained and promoted. The thresholds are lowered
(P(win) ≥ 0.3, any EV, 10 USDT at risk per trade: small enough for the exposure rule) so that the sample's edgeless
models still trade: fills, stops and targets are what parity and determinism must hold for, not only FLAT signals.

- parity: `perpflow up --source replay` over the window and `perpflow backtest` over it → the same signals, verdicts,
  orders and user events, row by row, for the three symbols sharing one account; and with --source kafka, the same
  signals;
- determinism: the same backtest twice → byte-identical metrics.json and the same rows (the risk agent decides the
  symbols in event-time order, however their messages interleave);
- isolation: two backtests at once and a live replay beside them, on one broker and store → each sees its own
  messages only (its topics and rows hold its symbols and window, each run once);
- a run is recorded in `backtest_runs`, writes report.html, and deletes its topics unless told to keep them."""

from __future__ import annotations

import json
import re
import threading

import pytest

from schemas.catalog import archived
from streams.broker import end_offsets
from tests.conftest import SAMPLE, read_topic, run_cli

pytestmark = pytest.mark.e2e

SYMBOLS = "BTCUSDT,ETHUSDT,1000PEPEUSDT"
ARCHIVE = ["--start", "2023-12-09", "--end", "2023-12-23"]
START, END = "2023-12-16", "2023-12-23"  # ~2.5 days of ready bars after the warm-up
LOOSE = {"PERPFLOW_MIN_PWIN": "0.3", "PERPFLOW_MIN_EV": "-1", "PERPFLOW_RISK_PER_TRADE_USDT": "10"}
DAY = 86_400_000


def _settings(home):
    from streams.settings import Settings

    return Settings(home=home, kafka_bootstrap="", clickhouse_url="", metrics_port=0, worker_metrics_port=0,
                    log_level="WARNING", min_pwin=0.3, min_ev=-1.0, risk_per_trade_usdt=10.0,
                    symbols=SYMBOLS.split(","))


def _ms(day: str) -> int:
    from streams.cli import parse_time

    return parse_time(day, "--start")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("backtest") / "home"
    steps = [["up", "--source", "replay", "--data", str(SAMPLE), "--symbols", SYMBOLS, *ARCHIVE, "--speed", "max",
              "--until-drained"], ["label", "--symbols", SYMBOLS, *ARCHIVE],
             ["train", "--symbols", SYMBOLS, *ARCHIVE, "--folds", "2", "--embargo-bars", "48", "--max-rounds", "20",
              "--threads", "1"]]
    for args in steps:
        step = run_cli(home, *args, timeout=600)
        assert step.returncode == 0, f"{args[0]}: {step.stderr}"
    ids = re.findall(r"registered ((?:long|short)-\S+)", step.stderr + step.stdout)
    assert len(ids) == 2, step.stderr
    for model in ids:
        promoted = run_cli(home, "models", "promote", model)
        assert promoted.returncode == 0, promoted.stderr
    return home


def _backtest(home, *extra: str):
    result = run_cli(home, "backtest", "--symbols", SYMBOLS, "--start", ARCHIVE[1], "--end", ARCHIVE[3], *extra,
                     timeout=600, **LOOSE)
    assert result.returncode == 0, result.stderr
    return re.search(r"backtest (\d{8}T\d{6}-[0-9a-f]{6}):", result.stderr).group(1)


def _rows(home, table: str, where: str, order: str) -> list[dict]:
    from connectors.clickhouse_store import Store
    from schemas.catalog import topic
    from schemas.tables import columns, select_fields

    t = topic(table)
    name = ("bt_" if where.startswith("run_id") else "") + t.table
    store = Store(_settings(home))
    try:
        rows = store.query_rows(f"SELECT {select_fields(t)} FROM `{name}` FINAL WHERE {where} ORDER BY {order}")
    finally:
        store.close()
    return [dict(zip([c.name for c in columns(t)], r, strict=True)) for r in rows]


def _rows_of(store, name: str, run_id: str) -> list[dict]:
    from training.backtest.orchestrate import run_records

    return run_records(store, run_id, name)


def test_parity_with_a_live_replay_and_determinism(home, tmp_path):
    first = _backtest(home, "--out", str(tmp_path / "a"))
    second = _backtest(home, "--out", str(tmp_path / "b"))
    a, b = (tmp_path / "a" / "metrics.json").read_bytes(), (tmp_path / "b" / "metrics.json").read_bytes()
    assert a == b  # determinism: same backtest, same metrics
    metrics = json.loads(a)
    assert metrics["signals"]["total"] > 2000 and metrics["trades"] > 0, metrics  # it traded: fills to compare
    assert (tmp_path / "a" / "report.html").stat().st_size > 1000

    live = run_cli(home, "up", "--source", "replay", "--data", str(SAMPLE), "--symbols", SYMBOLS, *ARCHIVE,
                   "--speed", "max", "--until-drained", timeout=600, **LOOSE)
    assert live.returncode == 0, live.stderr
    lo, hi = _ms(ARCHIVE[1]), _ms(ARCHIVE[3])
    window = f"toUnixTimestamp64Milli(event_time) >= {lo} AND toUnixTimestamp64Milli(event_time) < {hi + DAY}"
    for table, order in (("signals", "symbol, open_time"), ("risk.verdicts", "symbol, open_time"),
                         ("user.events", "symbol, event_time, event_id"), ("orders", "symbol, event_time")):
        live_rows = _rows(home, table, window, order)
        for run in (first, second):
            run_rows = _rows(home, table, f"run_id = '{run}'", order)
            assert len(run_rows) == len(live_rows), (table, run)
            assert run_rows == live_rows, table  # row by row, every field
        if table == "user.events":
            assert any(r["execution_type"] == "TRADE" for r in live_rows)  # the comparison covered fills

    from connectors.clickhouse_store import Store
    from training.backtest import runs

    store = Store(_settings(home))
    try:
        recorded = {r["run_id"]: r for r in runs.rows(store)}
    finally:
        store.close()
    assert recorded[first]["metrics"] == recorded[second]["metrics"] == json.loads(a)
    assert recorded[first]["symbols"] == SYMBOLS.split(",")


def test_two_backtests_and_a_live_replay_at_once_stay_apart(home):
    from streams.stack import Stack
    from streams.up import UpOptions, run_up
    from training.backtest.orchestrate import BacktestOptions, run_backtest, run_prefix

    settings = _settings(home)
    plans = {"a": (["BTCUSDT", "ETHUSDT"], "2023-12-16", "2023-12-21"),
             "b": (["ETHUSDT", "1000PEPEUSDT"], "2023-12-17", "2023-12-23")}
    results, errors = {}, []

    def backtest(name: str, stack) -> None:
        symbols, start, end = plans[name]
        try:
            results[name] = run_backtest(settings, BacktestOptions(symbols, _ms(start), _ms(end), keep_topics=True),
                                         stack, run_id=f"iso{name}-{threading.get_ident() % 1000:03d}")
        except BaseException as exc:
            errors.append(exc)

    def live(stack) -> None:
        try:
            results["live"] = run_up(settings, UpOptions("replay", str(SAMPLE), ["1000PEPEUSDT"], _ms(START),
                                                          _ms(END), None, True), stack)
        except BaseException as exc:
            errors.append(exc)

    with Stack(settings) as stack:
        threads = [threading.Thread(target=backtest, args=("a", stack)),
                   threading.Thread(target=backtest, args=("b", stack)), threading.Thread(target=live, args=(stack,))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        assert not errors, errors
        for name, (symbols, start, end) in plans.items():
            r = results[name]
            prefix = run_prefix(r.run_id)
            days = (_ms(end) - _ms(start)) // DAY
            assert r.bars == 288 * days * len(symbols)  # every bar once: no other run's, none twice
            for t in ("md.klines", "signals", "risk.verdicts", "user.events"):
                recs = read_topic(stack.bootstrap, prefix + t)
                assert {x["symbol"] for x in recs} <= set(symbols), (name, t)
                times = [x.get("open_time", x["event_time"]) for x in recs]
                assert all(_ms(start) <= x < _ms(end) + DAY for x in times), (name, t)
            klines = read_topic(stack.bootstrap, prefix + "md.klines")
            assert len(klines) == len({k["event_id"] for k in klines}) == r.bars
            assert r.metrics["signals"]["total"] > 0
            rows = stack.store.query_rows(f"SELECT DISTINCT symbol FROM bt_signals FINAL WHERE run_id = '{r.run_id}'")
            assert {s for (s,) in rows} == set(symbols)
        # the live replay's topics got nothing of the runs: only its symbol (and the archive's earlier replay)
        live_klines = read_topic(stack.bootstrap, "md.klines")
        assert {k["symbol"] for k in live_klines} == {"1000PEPEUSDT"}
        assert len(live_klines) == 288 * 7
        live_signals = read_topic(stack.bootstrap, "signals")
        assert live_signals and {x["symbol"] for x in live_signals} == {"1000PEPEUSDT"}
        # --source kafka: the live md.* topics replayed into a run give the live replay's signals
        from_kafka = run_backtest(settings, BacktestOptions(["1000PEPEUSDT"], _ms(START), _ms(END), source="kafka"),
                                  stack)
        assert from_kafka.bars == 288 * 7
        key = lambda x: x["open_time"]  # noqa: E731
        run_signals = _rows_of(stack.store, "signals", from_kafka.run_id)
        assert sorted(run_signals, key=key) == sorted(live_signals, key=key)
        # kept topics are deleted on demand, the run's internal topics with them
        from training.backtest.orchestrate import delete_run_topics

        for r in (results["a"], results["b"]):
            assert delete_run_topics(stack.bootstrap, r.run_id, settings) >= len(archived())
            assert not [k for k in end_offsets(stack.bootstrap, [run_prefix(r.run_id) + "md.klines"])]


def test_walk_forward_trades_each_step_with_models_trained_before_it(home):
    """Steps of 2 days over the archive: the steps without enough labeled history before them train nothing and
    trade nothing; every later bar is predicted by the models of its own step, whose training labels all end
    before that step starts."""
    wrong = run_cli(home, "backtest", "--symbols", SYMBOLS, "--start", ARCHIVE[1], "--end", ARCHIVE[3],
                    "--walk-forward", "--retrain-every", "3 weeks")
    assert wrong.returncode != 0
    assert wrong.stderr.strip().splitlines() == ["perpflow: --retrain-every '3 weeks': a positive whole number of "
                                                 "days, hours or minutes, e.g. 7d, 12h, 30m"]
    result = run_cli(home, "backtest", "--symbols", SYMBOLS, "--start", ARCHIVE[1], "--end", ARCHIVE[3],
                     "--walk-forward", "--retrain-every", "2d", "--train-window", "14d", timeout=900, **LOOSE)
    assert result.returncode == 0, result.stderr
    assert "not trained" in result.stderr  # the first step has no history at all
    run_id = re.search(r"backtest (\d{8}T\d{6}-[0-9a-f]{6}):", result.stderr).group(1)

    from connectors.clickhouse_store import Store
    from training import registry
    from training.backtest import runs

    store = Store(_settings(home))
    try:
        run = {r["run_id"]: r for r in runs.rows(store)}[run_id]
        steps = run["parameters"]["walk_forward"]["steps"]
        models = {s["model"]: {**registry.get(store, s["model"]), "valid_from": _ms(s["valid_from"])} for s in steps}
        predictions = _rows_of(store, "predictions", run_id)
    finally:
        store.close()
    starts = sorted({m["valid_from"] for m in models.values()})
    assert len(starts) >= 2 and len(models) == 2 * len(starts)  # both sides at each trained step
    assert sorted(run["model_ids"]) == sorted(models)
    for m in models.values():  # no label the model learned from reaches into the step it trades
        horizon_ms = json.loads(m["label_spec"])["horizon"] * 300_000
        assert m["train_end"] + horizon_ms <= m["valid_from"], m["id"]
    # the bars before the first trained step are carried through the chain as markers (FLAT signals), not predicted
    skipped = [p for p in predictions if p["skip_reason"]]
    predictions = [p for p in predictions if not p["skip_reason"]]
    assert {p["skip_reason"] for p in skipped} <= {"no_model", "not_ready"}
    assert max(p["open_time"] for p in skipped if p["skip_reason"] == "no_model") < starts[0]
    assert predictions
    for p in predictions:
        for side in ("long", "short"):
            m = models[p[f"model_id_{side}"]]
            assert m["side"] == side
            assert m["valid_from"] == max(s for s in starts if s <= p["open_time"]), (p["open_time"], m["id"])
    used = {p["model_id_long"] for p in predictions}
    assert len(used) >= 2  # the chain switched models at a step boundary
    assert min(p["open_time"] for p in predictions) >= starts[0]
