"""Bad input never reaches an md topic nor crashes anything: NaN, infinite, negative and absurd values from Binance
(the market connector against the fake exchange, REST records through the publisher) and from history files (the
replay) go to `deadletter` with their reason, against the real broker; a record that decodes but makes the predict
agent raise is dead-lettered by a real worker, which goes on predicting the others."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import pytest

from connectors.binance.market import funding_from_rest, oi_from_rest
from connectors.binance.publish import Publisher
from connectors.replay import ReplaySource
from streams.broker import ensure_topics
from tests.conftest import SAMPLE, read_topic
from tests.fake_binance import FakeBinance
from tests.test_binance_market import BAR, CLOCK_START, connector, drive

T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC


def _kline_frame(symbol: str, interval: str, open_time: int, step: int, o: str, h: str, low: str, c: str,
                 v: str) -> str:
    k = {"s": symbol, "i": interval, "t": open_time, "T": open_time + step - 1, "o": o, "h": h, "l": low, "c": c,
         "v": v, "q": "1", "n": 1, "V": "0", "Q": "0", "x": True}
    return json.dumps({"stream": f"{symbol.lower()}@kline_{interval}", "data": {"e": "kline", "E": open_time + step,
                                                                                "s": symbol, "k": k}})


def _mark_frame(symbol: str, mark: str, rate: str) -> str:
    d = {"e": "markPriceUpdate", "E": CLOCK_START + 1000, "s": symbol, "p": mark, "i": "42000", "P": "42000",
         "r": rate, "T": CLOCK_START + 3_600_000}
    return json.dumps({"stream": f"{symbol.lower()}@markPrice@1s", "data": d})


def _book_frame(symbol: str, update_id: int, bid: str, ask: str) -> str:
    d = {"e": "bookTicker", "u": update_id, "E": CLOCK_START + 2000, "T": CLOCK_START + 2000, "s": symbol,
         "b": bid, "B": "1.5", "a": ask, "A": "2"}
    return json.dumps({"stream": f"{symbol.lower()}@bookTicker", "data": d})


@pytest.mark.timeout(90)
def test_bad_values_from_the_exchange_go_to_the_dead_letters_with_their_reason(broker):
    ensure_topics(broker.bootstrap)
    fake = FakeBinance(["BTCUSDT", "ETHUSDT"], CLOCK_START, CLOCK_START, speed=1).start()  # a frozen clock
    conn = connector(fake, broker.bootstrap)
    frames = [  # the next bar of each (symbol, interval) after the backfill, so none is taken for a repeat
        (_kline_frame("BTCUSDT", "5m", CLOCK_START, BAR, "NaN", "1", "1", "1", "1"), "md.klines", "not_finite"),
        (_kline_frame("ETHUSDT", "5m", CLOCK_START, BAR, "100", "99", "101", "100", "1"), "md.klines",
         "high_below_low"),
        (_kline_frame("BTCUSDT", "1m", CLOCK_START, 60_000, "100", "101", "99", "100", "-3"), "md.klines",
         "negative"),
        (_kline_frame("ETHUSDT", "1m", CLOCK_START, 60_000, "-1", "101", "99", "100", "1"), "md.klines",
         "not_positive"),
        (_mark_frame("BTCUSDT", "-42000", "0.0001"), "md.markprice", "not_positive"),
        (_mark_frame("BTCUSDT", "Infinity", "0.0001"), "md.markprice", "not_finite"),
        (_mark_frame("ETHUSDT", "2300", "0.5"), "md.markprice", "absurd"),
        (_book_frame("BTCUSDT", 7, "42001", "42000"), "md.bookticker", "crossed_book"),
        (_book_frame("BTCUSDT", 8, "0", "42000"), "md.bookticker", "not_positive"),
        (_book_frame("ETHUSDT", 9, "NaN", "2300"), "md.bookticker", "not_finite"),
    ]
    good = [_mark_frame("ETHUSDT", "2300.5", "0.0001"), _book_frame("ETHUSDT", 10, "2300.1", "2300.2")]

    async def scenario():
        for raw, _, _ in frames:
            fake.call(fake.send_raw_market, raw)
        for raw in good:
            fake.call(fake.send_raw_market, raw)
        await asyncio.sleep(1.0)

    drive(fake, conn, scenario)
    letters = [d for d in read_topic(broker.bootstrap, "deadletter") if d["source_topic"].startswith("md.")]
    assert sorted((d["source_topic"], d["reason"]) for d in letters) == sorted((t, r) for _, t, r in frames)
    assert all(d["error"] and d["payload_size"] == len(d["payload"]) and d["payload_sha256"] for d in letters)
    # nothing of them on the md topics; the good ones are there
    bars = read_topic(broker.bootstrap, "md.klines")
    assert bars and all(b["open_time"] < CLOCK_START for b in bars)
    marks = read_topic(broker.bootstrap, "md.markprice")
    assert all(math.isfinite(m["mark_price"]) and m["mark_price"] > 0 for m in marks)
    assert all(m["funding_rate"] is None or abs(m["funding_rate"]) <= 0.05 for m in marks)
    assert 2300.5 in [m["mark_price"] for m in marks if m["source"] == "binance-ws"]
    books = read_topic(broker.bootstrap, "md.bookticker")
    assert (2300.1, 2300.2) in [(b["bid_price"], b["ask_price"]) for b in books]
    assert all(0 < b["bid_price"] <= b["ask_price"] for b in books)


def test_bad_funding_and_open_interest_from_rest_go_to_the_dead_letters(broker):
    ensure_topics(broker.bootstrap)
    publisher = Publisher(broker.bootstrap)
    funding = [{"symbol": "BTCUSDT", "fundingTime": T0 + i * 28_800_000, "fundingRate": rate, "markPrice": mark}
               for i, (rate, mark) in enumerate([("0.0001", "42000"), ("nan", "42000"), ("-0.3", ""),
                                                 ("0.0002", "-1")])]
    oi = [{"openInterest": v, "time": T0 + i * 60_000} for i, v in enumerate(["1234.5", "-1", "inf"])]
    published = [publisher.publish("md.funding", funding_from_rest(d)) for d in funding]
    published += [publisher.publish("md.openinterest", oi_from_rest("BTCUSDT", d)) for d in oi]
    assert publisher.flush(10) == 0
    assert published == [True, False, False, False, True, False, False]
    assert [f["funding_rate"] for f in read_topic(broker.bootstrap, "md.funding")] == [0.0001]
    assert [o["open_interest"] for o in read_topic(broker.bootstrap, "md.openinterest")] == [1234.5]
    assert sorted((d["source_topic"], d["reason"]) for d in read_topic(broker.bootstrap, "deadletter")) == [
        ("md.funding", "absurd"), ("md.funding", "negative"), ("md.funding", "not_finite"),
        ("md.openinterest", "negative"), ("md.openinterest", "not_finite")]


def test_the_replay_dead_letters_an_absurd_funding_rate_in_the_files(broker, tmp_path: Path):
    """The history reader skips what it cannot parse; a rate it reads but no exchange could pay (50 % per 8 h) is
    refused by the same checks as live: dead-lettered, and the marks after it keep the rate before it."""
    import pandas as pd

    ensure_topics(broker.bootstrap)
    data = tmp_path / "data"
    data.mkdir()
    for kind in ("5m-futures", "8h-mark"):
        shutil.copy(SAMPLE / f"BTC_USDT_USDT-{kind}.feather", data)
    funding = pd.read_feather(SAMPLE / "BTC_USDT_USDT-8h-funding_rate.feather")
    bad_time = pd.Timestamp("2023-12-09 08:00", tz="UTC")
    assert (funding["date"] == bad_time).sum() == 1
    before = float(funding.loc[funding["date"] < bad_time, "open"].iloc[-1])
    funding.loc[funding["date"] == bad_time, "open"] = 0.5
    funding.to_feather(data / "BTC_USDT_USDT-8h-funding_rate.feather")
    start, end = int(pd.Timestamp("2023-12-09", tz="UTC").value // 10**6), \
        int(pd.Timestamp("2023-12-10", tz="UTC").value // 10**6)
    result = ReplaySource(broker.bootstrap, str(data), ["BTCUSDT"], start, end).run()
    assert result.dead_letters == {("md.funding", "absurd"): 1}
    assert result.published == {"md.klines": 288, "md.markprice": 288, "md.funding": 2}
    [letter] = read_topic(broker.bootstrap, "deadletter")
    assert (letter["source_topic"], letter["reason"], letter["key"]) == ("md.funding", "absurd", "BTCUSDT")
    assert json.loads(letter["payload"])["funding_rate"] == 0.5
    bad_ms = int(bad_time.value // 10**6)
    marks = read_topic(broker.bootstrap, "md.markprice")
    assert {m["funding_rate"] for m in marks if bad_ms <= m["event_time"] < bad_ms + 8 * 3_600_000} == {before}
    assert all(f["funding_rate"] != 0.5 for f in read_topic(broker.bootstrap, "md.funding"))


def _tiny_models(models_dir: Path) -> dict[str, tuple[Path, str]]:
    """A real artifact per side, trained in a moment on noise: the predict agent loads and runs it like any other."""
    import lightgbm as lgb
    import numpy as np

    from streams.features.registry import SCHEMA_VERSION
    from training import artifact
    from training.dataset import MODEL_FEATURES
    from training.metrics import Calibrator
    from training.train import SideModels

    rng = np.random.default_rng(7)
    X = rng.normal(size=(300, len(MODEL_FEATURES)))
    params = {"verbose": -1, "num_threads": 1, "min_data_in_leaf": 5}
    boosters = {
        "outcome": lgb.train({**params, "objective": "multiclass", "num_class": 3},
                             lgb.Dataset(X, rng.integers(0, 3, 300), feature_name=list(MODEL_FEATURES)), 3),
        "hold": lgb.train({**params, "objective": "regression"}, lgb.Dataset(X, rng.uniform(1, 20, 300)), 3),
        "mae": lgb.train({**params, "objective": "regression"}, lgb.Dataset(X, rng.uniform(0, 1, 300)), 3),
    }
    manifest = {"schema_version": SCHEMA_VERSION, "features": list(MODEL_FEATURES),
                "label_spec": {"k_tp": 2.0, "k_sl": 1.0}}
    return {side: artifact.save(SideModels(side, 300, [], {}, {"p_tp": np.zeros(3)}, boosters, Calibrator()),
                                models_dir, {**manifest, "side": side})
            for side in ("long", "short")}


def _features(i: int, atr_pct: float = 0.0025) -> dict:
    from schemas import event_ids
    from schemas.codec import default_codec
    from streams.features.registry import SCHEMA_VERSION

    record = {f["name"]: 0.1 for f in default_codec().schema("features")["fields"]}
    open_time = T0 + i * BAR
    record.update(event_id=event_ids.features("ETHUSDT", "5m", open_time), event_time=open_time + BAR - 1,
                  symbol="ETHUSDT", interval="5m", open_time=open_time, close_time=open_time + BAR - 1,
                  schema_version=SCHEMA_VERSION, ready=True, gap_bars=0, source="test", atr_14=5.0, atr_pct=atr_pct,
                  funding_rate=0.0001, minutes_to_funding=60.0)
    return record


@pytest.mark.timeout(240)
def test_a_record_that_breaks_predict_is_dead_lettered_and_the_worker_goes_on(broker, tmp_path: Path, monkeypatch):
    """A features record that decodes but cannot be predicted (ATR ratio 0: the close it implies divides by zero)
    and a 2 MB message that is no record at all, among good records: the agent dead-letters both (the second as a
    bounded prefix), predicts the others, and its worker never restarts."""
    import time

    from confluent_kafka import Producer

    from schemas.codec import default_codec
    from streams.broker import producer_config
    from streams.control import control_token, publish
    from streams.features.registry import SCHEMA_VERSION
    from streams.settings import Settings
    from streams.worker import WorkerProcess

    monkeypatch.setenv("PERPFLOW_AGENTS", "predict")
    bootstrap = broker.bootstrap
    ensure_topics(bootstrap)
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=bootstrap, clickhouse_url="", worker_metrics_port=0,
                        symbols=["ETHUSDT"])
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    for side, (path, sha) in _tiny_models(settings.home_dir / "models").items():
        value = {"model_id": f"{side}-tiny", "side": side, "artifact_path": str(path), "sha256": sha,
                 "schema_version": SCHEMA_VERSION, "label_spec_id": "tiny", "previous": None, "reason": "test",
                 "train_end": T0}
        publish(bootstrap, f"model:{side}", "model_promoted", value, "test", T0, token=control_token(settings))
    codec = default_codec()
    poison = _features(3, atr_pct=0.0)
    big = b"\x00" * 2_000_000
    wide = Producer(producer_config(bootstrap, **{"message.max.bytes": 16 * 1024 * 1024}))
    for i in range(6):
        wide.produce("features", codec.encode("features", poison if i == 3 else _features(i)), b"ETHUSDT")
    wide.produce("features", big, b"ETHUSDT")
    assert wide.flush(30) == 0

    def wait_for(what: str, check, worker: WorkerProcess, timeout: float = 150):
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            worker.check()
            time.sleep(0.5)

    worker = WorkerProcess(settings, bootstrap)
    try:
        wait_for("two dead letters", lambda: len(read_topic(bootstrap, "deadletter")) >= 2, worker)
        wait_for("five predictions", lambda: len(read_topic(bootstrap, "predictions")) >= 5, worker)
        # the worker is alive and predicting: a later record is predicted too
        wide.produce("features", codec.encode("features", _features(6)), b"ETHUSDT")
        assert wide.flush(30) == 0
        wait_for("the next prediction", lambda: len(read_topic(bootstrap, "predictions")) >= 6, worker)
        assert worker.restarts == 0
    finally:
        worker.stop()
    predictions = read_topic(bootstrap, "predictions")
    assert sorted((p["open_time"] - T0) // BAR for p in predictions) == [0, 1, 2, 4, 5, 6]
    assert {p["model_id_long"] for p in predictions} == {"long-tiny"}
    assert len(read_topic(bootstrap, "signals")) == 6
    letters = {d["reason"]: d for d in read_topic(bootstrap, "deadletter")}
    assert set(letters) == {"handler_error", "bad_magic"}
    handler = letters["handler_error"]
    assert handler["source_topic"] == "features" and "ZeroDivisionError" in handler["error"]
    assert handler["error"].startswith("predict:")
    assert codec.decode(handler["payload"])[1]["open_time"] == poison["open_time"]
    assert (letters["bad_magic"]["payload_size"], len(letters["bad_magic"]["payload"])) == (len(big), 4096)
