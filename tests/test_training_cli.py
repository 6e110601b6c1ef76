"""Label, train and promote through the CLI on the bundled real sample, with the real store and broker."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import SAMPLE, run_cli

pytestmark = pytest.mark.e2e

SYMBOLS = "BTCUSDT,ETHUSDT,1000PEPEUSDT"
WINDOW = ["--start", "2023-12-09", "--end", "2024-01-09"]
QUIET = {"PERPFLOW_RUN_WORKER": "false"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    home = tmp_path_factory.mktemp("training") / "home"
    steps = {}
    for name, args in [
        ("up", ["up", "--source", "replay", "--data", str(SAMPLE), "--symbols", SYMBOLS, "--until-drained"]),
        ("features", ["features", "build", "--symbols", SYMBOLS, *WINDOW]),
        ("label", ["label", "--symbols", SYMBOLS, *WINDOW]),
        ("train", ["train", "--symbols", SYMBOLS, *WINDOW, "--folds", "3", "--embargo-bars", "48",
                   "--max-rounds", "40", "--threads", "1"]),
    ]:
        steps[name] = run_cli(home, *args, **QUIET)
        assert steps[name].returncode == 0, f"{name}: {steps[name].stderr}"
    return home, steps


def sql(home: Path, query: str) -> pd.DataFrame:
    result = run_cli(home, "sql", query, "--format", "csv")
    assert result.returncode == 0, result.stderr
    return pd.read_csv(io.StringIO(result.stdout), na_values=["\\N"])  # ClickHouse writes null as \N


def test_labels_table_holds_what_the_labeler_computes_from_the_archive(trained):
    from training.labels import OUTCOMES, Bars, LabelSpec, Settlements, label_side

    home, steps = trained
    assert "TIMEOUT" in steps["label"].stdout and LabelSpec().id in steps["label"].stdout
    k = sql(home, "SELECT toUnixTimestamp64Milli(open_time) AS t, open, high, low, close FROM md_klines FINAL "
                  "WHERE symbol = 'ETHUSDT' ORDER BY t")
    a = sql(home, "SELECT toUnixTimestamp64Milli(open_time) AS t, atr_14 FROM features FINAL "
                  "WHERE symbol = 'ETHUSDT' ORDER BY t")
    f = sql(home, "SELECT toUnixTimestamp64Milli(funding_time) AS t, funding_rate, mark_price FROM md_funding FINAL "
                  "WHERE symbol = 'ETHUSDT' ORDER BY t")
    atr = k[["t"]].merge(a, on="t", how="left")["atr_14"].to_numpy(float)
    bars = Bars.on_grid(k.t, k.open, k.high, k.low, k.close, atr)
    funding = Settlements(f.t.to_numpy(np.int64), f.funding_rate.to_numpy(float), f.mark_price.to_numpy(float))
    for side, sign in (("long", 1), ("short", -1)):
        want = label_side(bars, funding, sign, LabelSpec())
        got = sql(home, "SELECT toUnixTimestamp64Milli(open_time) AS t, outcome, net_return, funding, mae, bars_held "
                        f"FROM labels FINAL WHERE symbol = 'ETHUSDT' AND side = '{side}' ORDER BY t")
        assert len(got) == len(want["open_time"]) > 8000
        assert (got.t.to_numpy() == want["open_time"]).all()
        assert got.outcome.tolist() == [OUTCOMES[o] for o in want["outcome"]]
        for col in ("net_return", "funding", "mae", "bars_held"):
            np.testing.assert_allclose(got[col].to_numpy(float), want[col], rtol=1e-9, atol=1e-12, err_msg=col)
        assert (got.funding != 0).any()  # settlements were crossed and valued
    spec_rows = sql(home, "SELECT spec_id, spec FROM label_specs FINAL")
    assert spec_rows.spec_id.tolist() == [LabelSpec().id]


def test_train_reports_folds_and_registers_both_sides(trained):
    home, steps = trained
    err = steps["train"].stderr
    for side in ("long", "short"):
        assert f"{side}: fold 3/3: train " in err and "rows" in err and "elapsed" in err
        assert f"{side}: registered {side}-" in err
    assert steps["train"].stdout.count("P(TP) out of sample") == 2
    listed = run_cli(home, "models", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("trained") == 2
    models = sql(home, "SELECT id, side, status, schema_version, artifact_path, sha256 FROM models FINAL")
    assert sorted(models.side) == ["long", "short"] and set(models.status) == {"trained"}
    for row in models.itertuples():
        artifact = Path(row.artifact_path)
        assert artifact.name == row.sha256 and artifact.parent == home.resolve() / "models"


def test_predictor_gives_calibrated_probabilities_and_contributions(trained):
    from training.artifact import Predictor
    from training.dataset import MODEL_FEATURES

    home, _ = trained
    row = sql(home, "SELECT artifact_path, sha256 FROM models FINAL WHERE side = 'short'").iloc[0]
    predictor = Predictor.load(Path(row.artifact_path), row.sha256)
    X = np.random.default_rng(0).normal(0, 0.01, (50, len(MODEL_FEATURES)))
    out = predictor.predict(X)
    np.testing.assert_allclose(out["p_tp"] + out["p_sl"] + out["p_timeout"], 1.0)
    assert (out["hold_bars"] > 0).all() and (out["mae_quantile"] < 0).all()
    contrib = predictor.contributions(X)
    assert contrib.shape == (50, len(MODEL_FEATURES) + 1)
    raw = predictor.boosters["outcome"].predict(X, raw_score=True)[:, 0]
    np.testing.assert_allclose(contrib.sum(axis=1), raw, rtol=1e-9, atol=1e-9)  # they add up to the TP score


def test_evaluate_scores_a_model_and_flags_an_overlapping_window(trained):
    home, _ = trained
    model = sql(home, "SELECT id FROM models FINAL WHERE side = 'long' ORDER BY created_at LIMIT 1").id[0]
    result = run_cli(home, "models", "evaluate", model, "--start", "2024-01-02", "--end", "2024-01-09")
    assert result.returncode == 0, result.stderr
    assert "overlaps the model's training window" in result.stdout
    assert "AUC" in result.stdout and "base rate" in result.stdout and "pinball" in result.stdout
    rows = int(re.search(r"([\d,]+) rows", result.stdout).group(1).replace(",", ""))
    labeled = sql(home, "SELECT count() AS n FROM labels FINAL WHERE side = 'long' AND open_time >= '2024-01-02' "
                        "AND open_time < '2024-01-09'").n[0]
    assert rows == labeled  # every labeled bar of the week (features are ready there)
    # three symbols × seven days of bars; near the end of the data, only bars decided before it are labeled
    assert 3 * 7 * 288 - 3 * 48 < rows < 3 * 7 * 288


def test_a_home_without_the_artifact_fetches_it_from_the_store(trained):
    """A command of a fresh home (the Kubernetes CronJob's, every run) finds a registered model's artifact in the
    store's model_artifacts, hash-checked, and caches it where the home keeps its models."""
    import shutil

    home, _ = trained
    row = sql(home, "SELECT id, artifact_path FROM models FINAL WHERE side = 'short' ORDER BY created_at LIMIT 1")
    path = Path(row.artifact_path[0])
    moved = path.with_name(path.name + ".moved")
    path.rename(moved)
    try:
        result = run_cli(home, "models", "evaluate", row.id[0], "--start", "2024-01-02", "--end", "2024-01-09")
        assert result.returncode == 0, result.stderr
        assert "AUC" in result.stdout
        assert [(path / f).read_bytes() for f in ("model.json", "oof.npz")] == \
               [(moved / f).read_bytes() for f in ("model.json", "oof.npz")]
    finally:
        shutil.rmtree(path, ignore_errors=True)
        moved.rename(path)


def _variant(home: Path, model: str, *, schema_version: int | None = None, worse: bool = False) -> str:
    """Register a copy of `model` (a new content-addressed artifact): another schema version, or out-of-fold
    predictions made worse."""
    from connectors.clickhouse_store import Store
    from streams.settings import Settings
    from training import registry
    from training.artifact import _sha256

    store = Store(Settings(home=home, clickhouse_url=""))
    try:
        row = registry.get(store, model)
        src = Path(row["artifact_path"])
        doc = json.loads((src / "model.json").read_bytes())
        with np.load(src / "oof.npz") as z:
            oof = {k: z[k] for k in z.files}
        if worse:
            oof["p_tp"] = np.clip(1 - oof["p_tp"], 0.01, 0.99)
        buf = io.BytesIO()
        np.savez_compressed(buf, **oof)
        doc["oof_sha256"] = _sha256(buf.getvalue())
        doc["schema_version"] = schema_version or doc["schema_version"]
        body = json.dumps(doc, sort_keys=True).encode()
        sha = _sha256(body)
        dst = src.parent / sha
        dst.mkdir()
        (dst / "model.json").write_bytes(body)
        (dst / "oof.npz").write_bytes(buf.getvalue())
        created = row["created_at"] + 1000
        new = {**row, "id": registry.model_id(row["side"], created, sha), "created_at": created, "sha256": sha,
               "artifact_path": str(dst), "status": registry.TRAINED, "schema_version": doc["schema_version"]}
        registry.write(store, new)
        return new["id"]
    finally:
        store.close()


def control_records(bootstrap: str, expected: int) -> list[dict]:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from schemas.codec import default_codec
    from streams.broker import consumer_config

    consumer = Consumer(consumer_config(bootstrap, f"test-control-{time.monotonic_ns()}"))
    consumer.assign([TopicPartition("control", 0, OFFSET_BEGINNING)])
    records, deadline = [], time.monotonic() + 30
    try:
        while len(records) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                records.append((msg.key().decode(), default_codec().decode(msg.value())[1]))
    finally:
        consumer.close()
    return records


def test_promotion_gates_archive_and_control_topic(trained, broker):
    home, _ = trained
    env = {"PERPFLOW_KAFKA_BOOTSTRAP": broker.bootstrap}
    first = sql(home, "SELECT id FROM models FINAL WHERE side = 'long'").id[0]

    ok = run_cli(home, "models", "promote", first, **env)
    assert ok.returncode == 0, ok.stderr
    assert "pass feature schema version" in ok.stdout and "published on `control`" in ok.stdout

    worse = _variant(home, first, worse=True)
    refused = run_cli(home, "models", "promote", worse, **env)
    assert refused.returncode == 1 and "not worse than the incumbent" in refused.stderr
    assert "--force --reason" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    old_schema = _variant(home, first, schema_version=999)
    refused = run_cli(home, "models", "promote", old_schema, **env)
    assert refused.returncode == 1 and "feature schema version: model 999, running code" in refused.stderr

    no_reason = run_cli(home, "models", "promote", worse, "--force", **env)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr

    forced = run_cli(home, "models", "promote", worse, "--force", "--reason", "drill: override the gate", **env)
    assert forced.returncode == 0, forced.stderr
    assert "FAIL (forced)" in forced.stdout and f"archived {first}" in forced.stdout

    status = sql(home, "SELECT id, status, reason FROM models FINAL WHERE side = 'long' ORDER BY id")
    by_id = dict(zip(status.id, status.status, strict=True))
    assert by_id[first] == "archived" and by_id[worse] == "promoted" and by_id[old_schema] == "trained"
    assert status.set_index("id").reason[worse] == "drill: override the gate"

    records = control_records(broker.bootstrap, 2)
    assert [key for key, _ in records] == ["model:long", "model:long"]
    values = [json.loads(r["value"]) for _, r in records]
    assert [v["model_id"] for v in values] == [first, worse]
    assert values[1]["previous"] == first and values[1]["reason"] == "drill: override the gate"
    assert records[1][1]["kind"] == "model_promoted" and records[1][1]["entity"] == "model:long"


def test_corrupt_or_missing_artifacts_are_refused_even_forced(trained):
    home, _ = trained
    short = sql(home, "SELECT id, artifact_path FROM models FINAL WHERE side = 'short' AND status = 'trained'")
    model, path = short.id[0], Path(short.artifact_path[0])
    copy = _variant(home, model, worse=True)  # its own artifact: corrupting it leaves the original intact
    copy_path = Path(sql(home, f"SELECT artifact_path FROM models FINAL WHERE id = '{copy}'").artifact_path[0])
    (copy_path / "model.json").write_bytes((copy_path / "model.json").read_bytes().replace(b'"short"', b'"long"', 1))
    result = run_cli(home, "models", "promote", copy, "--force", "--reason", "try")
    assert result.returncode == 1 and "corrupt" in result.stderr and "perpflow train" in result.stderr
    (copy_path / "oof.npz").unlink()
    result = run_cli(home, "models", "show", copy)
    assert result.returncode == 1 and ("corrupt" in result.stderr or "missing" in result.stderr)
    shown = run_cli(home, "models", "show", model)  # the original is untouched
    assert shown.returncode == 0, shown.stderr
    assert "reliability of calibrated P(TP)" in shown.stdout and "top features" in shown.stdout
    assert path.is_dir()


def test_commands_without_a_store_say_what_to_run(tmp_path):
    train = run_cli(tmp_path / "h", "train", *WINDOW)
    assert train.returncode == 1 and "perpflow up --source replay" in train.stderr
    listed = run_cli(tmp_path / "h2", "models", "list")
    assert listed.returncode == 1 and "perpflow train" in listed.stderr


def test_unknown_model_says_where_to_look(trained):
    home, _ = trained
    result = run_cli(home, "models", "show", "long-19990101T000000-deadbeef")
    assert result.returncode == 1 and "perpflow models list" in result.stderr


def test_retrain_promotes_only_through_the_gates_and_says_which(trained, broker):
    """Runs after the promotion tests (the long side has an incumbent, the short side may not). Whatever the gates
    decide on this sample, each side's outcome is printed, published on `control`, and is what the registry holds;
    the candidates never trained on the newest unseen window they were scored on."""
    from training.labels import LabelSpec

    home, _ = trained
    before = sql(home, "SELECT id, side FROM models FINAL WHERE status = 'promoted'")
    before = dict(zip(before.side, before.id, strict=True))
    result = run_cli(home, "retrain", "--symbols", SYMBOLS, "--train-days", "21", "--holdout-days", "5",
                     "--folds", "2", "--embargo-bars", "48", "--max-rounds", "20", "--threads", "1",
                     PERPFLOW_KAFKA_BOOTSTRAP=broker.bootstrap)
    assert result.returncode == 0, result.stderr
    records = control_records(broker.bootstrap, 10)
    outcomes = {key: json.loads(r["value"]) for key, r in records if r["kind"] == "retrain_outcome"}
    assert set(outcomes) == {"retrain:long", "retrain:short"}
    promoted_records = [json.loads(r["value"])["model_id"] for key, r in records if r["kind"] == "model_promoted"]
    status = sql(home, "SELECT id, side, status, toUnixTimestamp64Milli(train_end) AS train_end FROM models FINAL")
    by_id = status.set_index("id")
    for side in ("long", "short"):
        o = outcomes[f"retrain:{side}"]
        gates = {g["name"]: g for g in o["gates"]}
        assert "not worse on the newest unseen window" in gates and "feature schema version" in gates
        if o["promoted"]:
            assert all(g["ok"] for g in gates.values()) and o["refused_by"] == ""
            assert f"{side}: {o['candidate']} promoted" in result.stdout
            assert by_id.status[o["candidate"]] == "promoted" and o["candidate"] in promoted_records
        else:
            assert o["refused_by"] and f"{side}: {o['candidate']} not promoted" in result.stdout
            assert o["refused_by"].split(":")[0] in result.stdout
            assert by_id.status[o["candidate"]] == "trained" and o["candidate"] not in promoted_records
            if side in before:
                assert by_id.status[before[side]] == "promoted"  # the incumbent kept
        w = o["window"]
        assert by_id.train_end[o["candidate"]] == w["train_end"]
        assert w["train_end"] + (LabelSpec().horizon + 1) * 300_000 == w["holdout_start"] < w["end"]
        assert o["holdout"]["candidate"]["rows"] > 1000
        if side in before:
            assert o["holdout"]["incumbent"]["id"] == before[side]


def test_the_holdout_gate_compares_with_the_incumbent_or_the_base_rate():
    from training.retrain import holdout_gate

    m = {"rows": 5000, "log_loss": 0.60, "log_loss_base": 0.62, "brier": 0.20, "brier_base": 0.21}
    assert holdout_gate(m, None).ok and "base rate" in holdout_gate(m, None).detail
    assert not holdout_gate({**m, "brier": 0.22}, None).ok
    assert holdout_gate(m, {"log_loss": 0.60, "brier": 0.20}).ok  # equal is no worse
    refused = holdout_gate(m, {"log_loss": 0.59, "brier": 0.25})
    assert not refused.ok and "incumbent" in refused.detail


@pytest.mark.parametrize("args, fragment", [
    (["label", "--start", "2024-01-02", "--end", "2024-01-01"], "--end must be after --start"),
    (["label", "--start", "2024-01-01", "--end", "2024-01-02", "--horizon", "0"], "horizon"),
    (["label", "--start", "2024-01-01", "--end", "2024-01-02", "--k-tp", "-1"], "k_tp"),
    (["train", "--start", "2024-01-01", "--end", "2024-01-02", "--folds", "1"], "--folds"),
    (["train", "--start", "2024-01-01", "--end", "2024-01-02", "--side", "up"], "--side"),
    (["models", "promote", "x", "--force"], "--reason"),
    (["retrain", "--holdout-days", "0"], "--holdout-days"),
    (["retrain", "--every", "soon"], "--every"),
])
def test_wrong_arguments_get_one_line(tmp_path, args, fragment):
    result = run_cli(tmp_path / "h", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
