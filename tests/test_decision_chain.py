"""features → predictions → signals through the real broker, worker and store, on the bundled real sample.

First `perpflow up` with no promoted model (the chain must run and predict nothing: every bar is carried on as a
`no_model` or `not_ready` marker and a FLAT signal), then label, train and promote on what it archived, then
`perpflow up` again over the same window: every ready features row gets exactly one prediction, from the promoted
models, one signal and one risk verdict; approved entries become orders that the paper exchange fills with both
protective orders.

The second run lowers the entry thresholds (MIN_PWIN 0.30, MIN_EV −1 %): with the defaults these models, which
have no edge after costs on this sample, never enter, and the path from an entry to its fills would go unchecked."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import SAMPLE, run_cli

pytestmark = pytest.mark.e2e

SYMBOLS = "BTCUSDT,ETHUSDT,1000PEPEUSDT"
WINDOW = ["--start", "2023-12-09", "--end", "2023-12-29"]
UP = ["up", "--source", "replay", "--data", str(SAMPLE), "--symbols", SYMBOLS, *WINDOW, "--speed", "max",
      "--until-drained"]
MIN_PWIN, MIN_EV = 0.30, -0.01
ENTER = {"PERPFLOW_MIN_PWIN": str(MIN_PWIN), "PERPFLOW_MIN_EV": str(MIN_EV)}


def sql(home, query: str) -> pd.DataFrame:
    result = run_cli(home, "sql", query, "--format", "csv")
    assert result.returncode == 0, result.stderr
    return pd.read_csv(io.StringIO(result.stdout), na_values=["\\N"])


def count(home, query: str) -> int:
    return int(sql(home, f"SELECT count() AS n FROM {query}").n[0])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    home = tmp_path_factory.mktemp("chain") / "home"
    first = run_cli(home, *UP, timeout=600)
    assert first.returncode == 0, first.stderr
    ready_first = count(home, "features FINAL WHERE ready")
    predicted_first = sql(home, "SELECT skip_reason, count() AS n FROM predictions FINAL GROUP BY skip_reason")
    predicted_first = dict(zip(predicted_first.skip_reason.fillna(""), predicted_first.n, strict=True))
    predicted_first["features"] = count(home, "features FINAL")
    predicted_first["flat_signals"] = sql(
        home, "SELECT flat_reason, count() AS n FROM signals FINAL WHERE decision = 'FLAT' GROUP BY flat_reason"
    ).set_index("flat_reason").n.to_dict()
    for args in (["label", "--symbols", SYMBOLS, *WINDOW],
                 ["train", "--symbols", SYMBOLS, *WINDOW, "--folds", "2", "--embargo-bars", "48",
                  "--max-rounds", "20", "--threads", "1"]):
        step = run_cli(home, *args, timeout=600)
        assert step.returncode == 0, f"{args[0]}: {step.stderr}"
    ids = re.findall(r"registered ((?:long|short)-\S+)", step.stderr + step.stdout)
    assert len(ids) == 2, step.stderr
    for model in ids:
        promoted = run_cli(home, "models", "promote", model)
        assert promoted.returncode == 0, promoted.stderr
    second = run_cli(home, *UP, timeout=600, **ENTER)
    assert second.returncode == 0, second.stderr
    return home, ids, ready_first, predicted_first


def test_no_promoted_model_means_no_predictions_and_no_crash(chain):
    _, _, ready_first, first = chain
    assert ready_first > 3000  # the features agent ran and archived ready rows
    assert "" not in first  # no prediction: every bar was carried on as a marker of why not
    assert first["no_model"] == ready_first and first["not_ready"] == first["features"] - ready_first > 0
    assert first["flat_signals"] == {"no_model": first["no_model"], "not_ready": first["not_ready"]}


def test_every_ready_features_row_has_one_prediction_and_one_signal(chain):
    home, ids, ready_first, _ = chain
    ready = count(home, "features FINAL WHERE ready")
    assert ready == ready_first  # same window, same bars
    rows = count(home, "features FINAL")
    assert count(home, "predictions FINAL WHERE skip_reason = ''") == ready
    assert count(home, "predictions FINAL WHERE skip_reason = 'not_ready'") == rows - ready  # one per features row
    assert count(home, "signals FINAL") == rows
    assert count(home, "signals FINAL WHERE model_id_long != ''") == ready
    # the archive's FINAL hides duplicates: the raw tables must not hold a second id for one bar
    assert count(home, "(SELECT DISTINCT event_id FROM predictions)") == rows
    orphans = count(home, "features AS f FINAL LEFT ANTI JOIN (SELECT symbol, open_time FROM predictions FINAL "
                          "WHERE skip_reason = '') AS p ON p.symbol = f.symbol AND p.open_time = f.open_time "
                          "WHERE f.ready")
    assert orphans == 0
    unmatched = count(home, "signals AS s FINAL LEFT ANTI JOIN predictions AS p FINAL ON s.prediction_id = p.event_id")
    assert unmatched == 0
    models = sql(home, "SELECT DISTINCT model_id_long, model_id_short FROM predictions FINAL WHERE skip_reason = ''")
    assert len(models) == 1
    assert sorted([models.model_id_long[0], models.model_id_short[0]]) == sorted(ids)


def test_predictions_are_calibrated_probabilities_with_contributions(chain):
    home, _, _, _ = chain
    p = sql(home, "SELECT p_tp_long + p_sl_long + p_timeout_long AS s_long, p_tp_short + p_sl_short + "
                  "p_timeout_short AS s_short, hold_bars_long, top_features_long, close, atr_14, k_tp "
                  "FROM predictions FINAL WHERE skip_reason = '' LIMIT 200")
    assert ((p.s_long - 1).abs() < 1e-6).all() and ((p.s_short - 1).abs() < 1e-6).all()
    assert (p.hold_bars_long > 0).all() and (p.k_tp == 2.0).all() and (p.close > 0).all()
    top = json.loads(p.top_features_long[0])
    assert len(top) == 5 and {"feature", "value"} <= set(top[0])


def test_signals_follow_the_ev_rule_and_are_sized_to_the_exchange_rules(chain):
    home, _, _, _ = chain
    s = sql(home, "SELECT symbol, decision, side, ev_long, ev_short, p_win_long, p_win_short, entry_price, stop_loss, "
                  "take_profit, quantity, notional, leverage, liq_distance_atr, flat_reason FROM signals FINAL "
                  "WHERE model_id_long != ''")  # the bars that were predicted
    longs = s[s.decision == "LONG"]
    assert len(longs) > 0
    assert ((longs.ev_long > MIN_EV) & (longs.p_win_long >= MIN_PWIN) & (longs.side == "BUY")).all()
    assert (longs.stop_loss < longs.entry_price).all() and (longs.take_profit > longs.entry_price).all()
    shorts = s[s.decision == "SHORT"]
    assert ((shorts.ev_short > MIN_EV) & (shorts.p_win_short >= MIN_PWIN) & (shorts.side == "SELL")).all()
    flat = s[s.decision == "FLAT"]
    qualifies = (((flat.ev_long > MIN_EV) & (flat.p_win_long >= MIN_PWIN))
                 | ((flat.ev_short > MIN_EV) & (flat.p_win_short >= MIN_PWIN)))
    assert (flat[qualifies].flat_reason != "thresholds").all()  # a qualifying side is FLAT only for a sizing reason
    assert (flat[~qualifies].flat_reason == "thresholds").all()
    trades = s[s.decision != "FLAT"]
    btc = trades[trades.symbol == "BTCUSDT"]
    assert ((btc.quantity * 1000).round(6) % 1 == 0).all()  # step 0.001
    assert ((btc.entry_price * 10).round(6) % 1 == 0).all()  # tick 0.10
    assert trades.leverage.between(2, 8).all() and (trades.liq_distance_atr > 0).all()


def test_every_signal_has_one_verdict_and_only_approved_entries_become_orders(chain):
    home, _, _, _ = chain
    signals = count(home, "signals FINAL")
    assert count(home, "risk_verdicts FINAL") == signals
    assert count(home, "(SELECT DISTINCT event_id FROM risk_verdicts)") == signals
    assert count(home, "risk_verdicts AS v FINAL LEFT ANTI JOIN signals AS s FINAL ON v.signal_id = s.event_id") == 0
    v = sql(home, "SELECT decision, verdict, action, intent_id, violations FROM risk_verdicts FINAL")
    assert (v[v.decision == "FLAT"].action == "NONE").all()
    opened = v[v.action == "OPEN"]
    assert len(opened) > 0 and (opened.verdict == "APPROVED").all()
    assert (v[v.verdict == "REJECTED"].violations != "[]").all()
    orders = sql(home, "SELECT intent_id, action, signal_id FROM orders FINAL WHERE action = 'OPEN'")
    assert sorted(orders.intent_id) == sorted(opened.intent_id)  # approved entries, and nothing else
    rejected = count(home, "orders AS o FINAL INNER JOIN risk_verdicts AS v FINAL ON o.signal_id = v.signal_id "
                           "WHERE v.verdict = 'REJECTED'")
    assert rejected == 0


def test_every_filled_entry_is_protected_by_a_stop_loss_and_a_take_profit(chain):
    from connectors.binance.execution import client_ids

    home, _, _, _ = chain
    orders = sql(home, "SELECT intent_id FROM orders FINAL WHERE action = 'OPEN'")
    events = sql(home, "SELECT event_type, client_order_id, order_status, toUnixTimestamp64Milli(event_time) AS t "
                       "FROM user_events FINAL")
    filled = 0
    for intent in orders.intent_id:
        ids = client_ids(intent)
        entry = events[(events.client_order_id == ids["entry"]) & (events.order_status == "FILLED")]
        if entry.empty:
            continue  # expired (a position was still open) or not yet due at the end of the window
        filled += 1
        at = int(entry.t.iloc[0])
        guards = events[(events.event_type == "ALGO_UPDATE") & (events.order_status == "NEW") & (events.t == at)]
        assert {ids["sl"], ids["tp"]} <= set(guards.client_order_id), f"{intent} filled without protection"
    assert filled > 0


def test_promote_over_http_needs_the_token_and_passes_the_gates(chain):
    """`perpflow up` owns the registry's store, so POST /models/{id}/promote is served by its control API."""
    import subprocess
    import time
    import urllib.error
    import urllib.request

    from tests.conftest import PERPFLOW, ROOT, cli_env

    home, ids, _, _ = chain
    up = subprocess.Popen([PERPFLOW, "up", "--source", "none"], env=cli_env(home), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        stack = home / "run" / "stack.json"
        deadline = time.monotonic() + 60
        while not stack.exists():
            assert up.poll() is None and time.monotonic() < deadline, up.stderr.read() if up.poll() else "no stack"
            time.sleep(0.3)
        api = json.loads(stack.read_text())["api_url"]
        model = next(i for i in ids if i.startswith("long-"))
        url = f"{api}/models/{model}/promote"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=30)
        assert denied.value.code == 401
        token = (home / "run" / "control-token").read_text().strip()
        request = urllib.request.Request(url, data=json.dumps({"reason": "test"}).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer["promoted"] == model and answer["side"] == "long"
        assert all(g["ok"] for g in answer["gates"]) and answer["control"]["entity"] == "model:long"
    finally:
        up.terminate()
        up.wait(60)


def test_a_promotion_on_control_switches_the_model_without_restart(chain, broker):
    """Runs at the end: it opens the module's store itself. The second promotion names a new model id on the same
    artifact (content-addressed, so only the id differs): predictions made after it carry that id."""
    import time

    from connectors.clickhouse_store import Store
    from schemas.codec import default_codec
    from streams.broker import ensure_topics
    from streams.control import control_token, publish
    from streams.settings import Settings
    from streams.worker import WorkerProcess
    from tests.conftest import read_topic
    from tests.test_sink import produce
    from training import registry

    home, ids, _, _ = chain
    settings = Settings(home=home, kafka_bootstrap=broker.bootstrap, clickhouse_url="", worker_metrics_port=0,
                        symbols=["ETHUSDT"])
    fields = [f["name"] for f in default_codec().schema("features")["fields"]]
    times = {"event_time", "open_time", "close_time"}
    store = Store(settings)
    try:
        rows = {side: registry.promoted(store, side) for side in ("long", "short")}
        select = ", ".join(f"toUnixTimestamp64Milli({f})" if f in times else f for f in fields)
        records = [dict(zip(fields, r, strict=True)) for r in store.query_rows(
            f"SELECT {select} FROM features FINAL WHERE symbol = 'ETHUSDT' AND ready ORDER BY open_time LIMIT 20")]
    finally:
        store.close()
    assert len(records) == 20
    ensure_topics(broker.bootstrap)
    for side, row in rows.items():
        publish(broker.bootstrap, f"model:{side}", "model_promoted", registry.control_value(row, None), "test",
                row["promoted_at"], token=control_token(settings))
    codec = default_codec()
    produce(broker.bootstrap, [("features", "ETHUSDT", codec.encode("features", r)) for r in records[:10]])
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, broker.bootstrap)
    try:
        deadline = time.monotonic() + 120
        while len(read_topic(broker.bootstrap, "predictions")) < 10:
            assert time.monotonic() < deadline, "no predictions from the first model"
            worker.check()
            time.sleep(0.5)
        second = {**registry.control_value(rows["long"], rows["long"]), "model_id": "long-reloaded"}
        publish(broker.bootstrap, "model:long", "model_promoted", second, "test", rows["long"]["promoted_at"] + 1,
                token=control_token(settings))
        while worker.metric("perpflow_model_info", side="long", model_id="long-reloaded") != 1:
            assert time.monotonic() < deadline, "the worker did not load the second promotion"
            time.sleep(0.5)
        # the model's age: since its training data's end (in the control record), growing without an update
        age = worker.metric("perpflow_model_age_seconds", side="long")
        assert abs(age - (time.time() - rows["long"]["train_end"] / 1000)) < 60
        time.sleep(1.5)
        assert worker.metric("perpflow_model_age_seconds", side="long") > age
        produce(broker.bootstrap, [("features", "ETHUSDT", codec.encode("features", r)) for r in records[10:]])
        while len(read_topic(broker.bootstrap, "predictions")) < 20:
            assert time.monotonic() < deadline, "no predictions after the reload"
            time.sleep(0.5)
        assert worker.restarts == 0
    finally:
        worker.stop()
    got = sorted(read_topic(broker.bootstrap, "predictions"), key=lambda p: p["open_time"])
    assert [p["open_time"] for p in got] == [r["open_time"] for r in records]
    assert [p["model_id_long"] for p in got] == [rows["long"]["id"]] * 10 + ["long-reloaded"] * 10
    assert {p["model_id_short"] for p in got} == {rows["short"]["id"]}


def test_live_calibration_takes_each_outcome_from_the_labels_rules(chain):
    """Runs at the end (it opens the store): the outcomes behind perpflow_model_calibration_error, on the promoted
    models' predictions of the second run, are the outcomes `perpflow label` wrote for the same bars and spec."""
    from connectors.clickhouse_store import Store
    from streams.settings import Settings
    from training.calibration import known_outcomes, latest
    from training.labels import OUTCOMES

    home, ids, _, _ = chain
    store = Store(Settings(home=home, clickhouse_url=""))
    try:
        for side in ("long", "short"):
            found = known_outcomes(store, side, 1000)
            assert found.model["id"] in ids and len(found.outcome) == 1000
            known = found.outcome >= 0
            assert known.sum() > 900  # only a gap in the archive hides an outcome
            labels = {(s, t): o for s, t, o in store.query_rows(
                "SELECT toString(symbol), toUnixTimestamp64Milli(open_time), toString(outcome) FROM labels FINAL "
                f"WHERE spec_id = '{found.model['label_spec_id']}' AND side = '{side}'")}
            ours = {(s, int(t)): OUTCOMES[o] for s, t, o in
                    zip(found.symbol[known], found.open_time[known], found.outcome[known], strict=True)}
            assert ours == {k: labels.get(k) for k in ours}
            calibration = latest(store, side, 1000)
            assert calibration.predictions == known.sum() and 0 <= calibration.error <= 1
            realized = sum(o == "TP" for o in ours.values()) / len(ours)
            assert calibration.realized == realized
    finally:
        store.close()


def test_a_worker_with_an_empty_home_fetches_the_model_from_the_store_and_refuses_a_tampered_one(chain, broker,
                                                                                                   tmp_path):
    """A deployed worker: its own empty home, the store held by another process (here an API serving the module's
    store, as `perpflow up` does). The promoted models reach it through the store; a promotion whose artifact in the
    store does not hash to what the record says is refused, and the side keeps predicting with the model it had."""
    import hashlib
    import time

    import pyarrow as pa

    from connectors.clickhouse_store import Store
    from schemas.codec import default_codec
    from streams.broker import ensure_topics
    from streams.control import publish
    from streams.control_api import ControlApi
    from streams.settings import Settings
    from streams.worker import WorkerProcess
    from tests.conftest import read_topic
    from tests.test_sink import produce
    from training import registry

    home, _, _, _ = chain
    token = "deployment-token-" + "x" * 24
    fields = [f["name"] for f in default_codec().schema("features")["fields"]]
    times = {"event_time", "open_time", "close_time"}
    store = Store(Settings(home=home, clickhouse_url=""))
    api = ControlApi("127.0.0.1", 0, store=store, token=token).start()
    worker_home = tmp_path / "worker-home"
    settings = Settings(home=worker_home, kafka_bootstrap=broker.bootstrap, clickhouse_url="", worker_metrics_port=0,
                        symbols=["BTCUSDT"], store_api=api.url, control_token=token)
    worker = None
    try:
        rows = {side: registry.promoted(store, side) for side in ("long", "short")}
        select = ", ".join(f"toUnixTimestamp64Milli({f})" if f in times else f for f in fields)
        records = [dict(zip(fields, r, strict=True)) for r in store.query_rows(
            f"SELECT {select} FROM features FINAL WHERE symbol = 'BTCUSDT' AND ready ORDER BY open_time LIMIT 20")]
        assert len(records) == 20
        # a tampered copy of the long model in the store, under a hash its bytes do not have
        real = Path(rows["long"]["artifact_path"])
        claimed = hashlib.sha256(b"a model that is not this one").hexdigest()
        body = (real / "model.json").read_bytes().replace(b"learning_rate", b"learning_rat3", 1)
        store.insert_arrow("model_artifacts", pa.table({
            "sha256": [claimed, claimed], "file": ["model.json", "oof.npz"],
            "body": pa.array([body, (real / "oof.npz").read_bytes()], type=pa.binary()),
            "size": pa.array([len(body), 0], type=pa.uint64()),
            "stored_at": pa.array([int(time.time() * 1000)] * 2, type=pa.timestamp("ms", tz="UTC"))}))
        ensure_topics(broker.bootstrap)
        for side, row in rows.items():  # as the trainer's home wrote them: paths that do not exist in this home
            value = {**registry.control_value(row, None), "artifact_path": "/elsewhere/models/" + row["sha256"]}
            publish(broker.bootstrap, f"model:{side}", "model_promoted", value, "test", row["promoted_at"], token=token)
        codec = default_codec()
        produce(broker.bootstrap, [("features", "BTCUSDT", codec.encode("features", r)) for r in records[:10]])
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        assert not (worker_home / "models").exists()
        worker = WorkerProcess(settings, broker.bootstrap)
        deadline = time.monotonic() + 120
        while len(read_topic(broker.bootstrap, "predictions")) < 10:
            assert time.monotonic() < deadline, "no predictions from the models in the store"
            worker.check()
            time.sleep(0.5)
        for row in rows.values():  # cached in the worker's own home, byte for byte
            assert (worker_home / "models" / row["sha256"] / "model.json").read_bytes() == \
                   (Path(row["artifact_path"]) / "model.json").read_bytes()
        tampered = {**registry.control_value(rows["long"], rows["long"]), "model_id": "long-tampered",
                    "sha256": claimed, "artifact_path": "/elsewhere/models/" + claimed}
        publish(broker.bootstrap, "model:long", "model_promoted", tampered, "test", rows["long"]["promoted_at"] + 1,
                token=token)
        while not worker.metric("perpflow_model_refused_total", side="long"):
            assert time.monotonic() < deadline, "the tampered promotion was neither loaded nor refused"
            time.sleep(0.5)
        status = json.loads(worker.get("/status"))
        assert status["models"] == {side: row["id"] for side, row in rows.items()}
        assert "long-tampered" in status["models_refused"]["long"] and "tampered" in status["models_refused"]["long"]
        assert worker.metric("perpflow_model_info", side="long", model_id="long-tampered") in (None, 0)
        assert not (worker_home / "models" / claimed).exists()
        produce(broker.bootstrap, [("features", "BTCUSDT", codec.encode("features", r)) for r in records[10:]])
        while len(read_topic(broker.bootstrap, "predictions")) < 20:
            assert time.monotonic() < deadline, "no predictions after the refusal"
            time.sleep(0.5)
        assert worker.restarts == 0
    finally:
        if worker is not None:
            worker.stop()
        api.stop()
        store.close()
    got = sorted(read_topic(broker.bootstrap, "predictions"), key=lambda p: p["open_time"])
    assert [p["model_id_long"] for p in got] == [rows["long"]["id"]] * 20  # none from the tampered artifact
    assert {p["model_id_short"] for p in got} == {rows["short"]["id"]}
