"""Security defaults: live trading on a Binance production URL needs --mainnet whatever set the URL; every
state-changing route needs the bearer token and every `control` record an HMAC of it (a forged command is not
applied, a signed one is); an API bound beyond loopback needs a configured token; no password in run/stack.json or
an error message, no token in the logs. One `perpflow up` (embedded default, its worker running the risk agent)
serves the module."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from schemas import event_ids
from schemas.catalog import topic
from schemas.codec import default_codec
from streams.broker import producer_config
from streams.control import ControlReader, control_record, publish, signature
from streams.control_api import ControlApi
from streams.errors import PerpflowError
from streams.settings import Settings
from tests.conftest import PERPFLOW, ROOT, cli_env, read_topic, run_cli
from tests.test_risk_stream import kline, signal
from tests.test_risk_stream import publish as publish_records

KEYS = {"PERPFLOW_BINANCE_API_KEY": "test-key", "PERPFLOW_BINANCE_API_SECRET": "test-secret"}
PASSWORD = "s3cret-Pa55word"


# -- the mainnet check is on the resolved URLs ---------------------------------------------------------------------

@pytest.mark.parametrize(("args", "env", "variable"), [
    (["up", "--source", "binance", "--live"], {"PERPFLOW_BINANCE_REST_URL": "https://fapi.binance.com"},
     "PERPFLOW_BINANCE_REST_URL"),
    (["up", "--source", "binance", "--live"], {"PERPFLOW_BINANCE_WS_URL": "wss://fstream.binance.com/"},
     "PERPFLOW_BINANCE_WS_URL"),
    (["connector", "execution"], {"PERPFLOW_BINANCE_REST_URL": "https://fapi.binance.com",
                                  "PERPFLOW_PAPER_TRADING": "false"}, "PERPFLOW_BINANCE_REST_URL"),
    (["connector", "user"], {"PERPFLOW_BINANCE_TESTNET": "false"}, "PERPFLOW_BINANCE_TESTNET"),
])
def test_live_trading_on_a_mainnet_url_without_mainnet_is_refused(tmp_path, args, env, variable):
    result = run_cli(tmp_path / "home", *args, timeout=60, **KEYS, **env)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert variable in line and "--mainnet" in line and "mainnet" in line
    assert not (tmp_path / "home" / "run" / "stack.json").exists()  # refused before anything started


def test_which_urls_count_as_mainnet():
    def mainnet(**kw) -> list[str]:
        return [url for _, url in Settings(**kw).binance_mainnet_urls()]

    assert mainnet() == []  # the testnet's defaults
    assert mainnet(binance_rest_url="http://127.0.0.1:8080", binance_ws_url="ws://127.0.0.1:8081") == []  # a fake
    assert mainnet(binance_testnet=False, binance_rest_url="http://127.0.0.1:1", binance_ws_url="ws://[::1]:2") == []
    assert mainnet(binance_rest_url="https://testnet.binancefuture.com") == []
    assert mainnet(binance_rest_url="https://FAPI.binance.com/") == ["https://FAPI.binance.com"]
    assert mainnet(binance_ws_url="wss://fstream-auth.binance.com") == ["wss://fstream-auth.binance.com"]
    assert mainnet(binance_testnet=False) == ["https://fapi.binance.com", "wss://fstream.binance.com"]
    assert mainnet(binance_rest_url="https://fapi.binance.com.example.org") == []  # not Binance's host


# -- a bind beyond loopback needs a configured token ----------------------------------------------------------------

def test_a_non_loopback_bind_without_a_token_is_refused(tmp_path):
    home = tmp_path / "home"
    result = run_cli(home, "up", "--source", "none", timeout=60, PERPFLOW_METRICS_HOST="0.0.0.0")
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "PERPFLOW_CONTROL_TOKEN" in line and "0.0.0.0" in line
    assert not (home / "run" / "stack.json").exists() and not (home / "run" / "control-token").exists()
    with pytest.raises(PerpflowError, match="without a token"):
        ControlApi("0.0.0.0", 0)
    api = ControlApi("0.0.0.0", 0, routes={("GET", "/status"): lambda path, body: (200, {"trading_state": "x"})},
                     token="configured").start()  # with one it serves; the views want it too, the probes do not
    try:
        def get(path: str, token: str | None = None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                with urllib.request.urlopen(urllib.request.Request(api.url + path, headers=headers), timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert (get("/status"), get("/status", "wrong"), get("/status", "configured")) == (401, 401, 200)
        assert (get("/metrics"), get("/health")) == (200, 200)
    finally:
        api.stop()
    ControlApi("127.0.0.1", 0).start().stop()  # loopback: GETs open, and no POST is served without a token


def test_compose_and_kubernetes_require_the_token_where_they_bind_0_0_0_0(tmp_path):
    """compose: `${PERPFLOW_CONTROL_TOKEN:?...}` for every perpflow service (the one environment anchor); k8s: every
    perpflow container reads it from the Secret, whose template leaves it empty (such a pod refuses to start)."""
    import shutil

    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    perpflow = {n: svc for n, svc in compose["services"].items() if svc.get("image") == "perpflow:latest"}
    assert {"sink", "worker", "market-connector", "user-connector", "execution-live"} <= set(perpflow)
    for name, svc in perpflow.items():
        env = svc["environment"]
        assert env["PERPFLOW_METRICS_HOST"] == "0.0.0.0", name
        assert env["PERPFLOW_CONTROL_TOKEN"].startswith("${PERPFLOW_CONTROL_TOKEN:?"), name
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl missing")
    from tests.test_k8s import K8S, containers, kustomize

    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "perpflow",
        "resources": [f"{rel}/overlays/prod"], "components": [f"{rel}/components/live"]}))
    docs = kustomize(tmp_path)
    pods = {n: c for n, c in containers(docs).items() if c["image"].endswith("perpflow") or "perpflow:" in c["image"]}
    assert {"perpflow-sink", "perpflow-worker", "perpflow-market", "perpflow-user", "perpflow-execution"} <= set(pods)
    for name, c in pods.items():
        [ref] = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == "PERPFLOW_CONTROL_TOKEN"]
        assert ref == {"name": "perpflow-secrets", "key": "PERPFLOW_CONTROL_TOKEN"}, name
    [secret] = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "perpflow-secrets"]
    assert secret["stringData"]["PERPFLOW_CONTROL_TOKEN"] == ""  # a template: no token in the repository


# -- no password in stack.json or an error message ----------------------------------------------------------------

def test_stack_json_holds_no_password(tmp_path):
    """A store DSN with a password (chDB in memory takes one and ignores it): stack.json has it masked."""
    from streams.stack import Stack

    settings = Settings(home=tmp_path / "home", clickhouse_url=f"chdb://perpflow:{PASSWORD}@memory/default",
                        metrics_port=0)
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.model_dump())
    with Stack(settings):
        text = (settings.run_dir / "stack.json").read_text()
    assert PASSWORD not in text and json.loads(text)["store"] == "chdb://perpflow:***@memory/default"


def test_an_unreachable_store_names_its_url_without_the_password(tmp_path):
    result = run_cli(tmp_path / "home", "sql", "SELECT 1", timeout=60,
                     PERPFLOW_CLICKHOUSE_URL=f"http://perpflow:{PASSWORD}@127.0.0.1:9/perpflow")
    assert result.returncode == 1
    [line] = [x for x in result.stderr.splitlines() if x.startswith("perpflow:")]  # the driver logs its retries too
    assert "http://perpflow:***@127.0.0.1:9/perpflow" in line and PASSWORD not in result.stderr + result.stdout


# -- the running stack: routes, the CLI, and `control` -------------------------------------------------------------

@pytest.fixture(scope="module")
def running(tmp_path_factory):
    home = tmp_path_factory.mktemp("security") / "home"
    env = cli_env(home, PERPFLOW_AGENTS="risk", PERPFLOW_LOG_LEVEL="INFO")
    log = open(home.parent / "up.log", "w")
    up = subprocess.Popen([PERPFLOW, "up", "--source", "none"], env=env, cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT)
    try:
        run = home / "run"
        deadline = time.monotonic() + 120
        while not (run / "stack.json").exists() or not list(run.glob("worker-*.json")):
            assert up.poll() is None, (home.parent / "up.log").read_text()
            assert time.monotonic() < deadline, "no stack or worker"
            time.sleep(0.3)
        stack = json.loads((run / "stack.json").read_text())
        worker = json.loads(next(run.glob("worker-*.json")).read_text())
        yield {"home": home, "bootstrap": stack["bootstrap"], "up": stack["api_url"], "worker": worker["api_url"],
               "metrics": worker["metrics_url"], "token": (run / "control-token").read_text().strip()}
    finally:
        up.terminate()
        up.wait(60)
        log.close()


def post(url: str, token: str | None, body: dict | None = None) -> int:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token is not None else {})
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def status(running) -> dict:
    """GET /status of the worker; it answers 500 while its consumer group is still forming (the lag lookup), so
    asked again for a while."""
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(running["worker"] + "/status", timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            assert exc.code == 500 and time.monotonic() < deadline, exc.read()
            time.sleep(0.5)


def rejected(running, entity: str) -> float:
    with urllib.request.urlopen(running["metrics"], timeout=10) as response:
        text = response.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "perpflow_control_rejected_total" and s.labels.get("entity") == entity)


def wait(what: str, check, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return got


def test_the_generated_token_is_a_file_of_its_own_readable_by_the_owner_only(running):
    path = running["home"] / "run" / "control-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(running["token"]) >= 32
    assert running["token"] not in (running["home"] / "run" / "stack.json").read_text()


@pytest.mark.parametrize("route", ["up:/sql", "up:/models/long-x/promote", "worker:/trading/start",
                                   "worker:/trading/stop", "worker:/trading/kill"])
def test_every_state_changing_route_wants_the_token(running, route):
    api, path = route.split(":", 1)
    url = running[api] + path
    body = {"query": "SELECT 1"} if path == "/sql" else {"reason": "test"}
    assert post(url, None, body) == 401
    assert post(url, "", body) == 401
    assert post(url, running["token"][:-1] + "x", body) == 401
    if path in ("/sql", "/models/long-x/promote"):  # harmless with the token: the route is there and answers
        assert post(url, running["token"], body) in (200, 400)
    assert status(running)["trading_state"] == "RUNNING"  # none of the refused kills, stops or starts went through


def test_the_cli_sends_the_token_unchanged_for_the_user(running):
    result = run_cli(running["home"], "sql", "SELECT 41 + 1", "--format", "tsv", timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "42", result.stderr


def test_the_cli_with_a_wrong_token_is_refused_in_one_line(running):
    result = run_cli(running["home"], "trading", "kill", timeout=60, PERPFLOW_CONTROL_TOKEN="not-the-token")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "401" in line and "PERPFLOW_CONTROL_TOKEN" in line and "not-the-token" not in line
    assert status(running)["trading_state"] == "RUNNING"


def test_a_forged_command_on_control_is_ignored_and_a_signed_one_applied(running):
    """Unsigned and wrongly signed HALTs written straight to `control` change nothing (counted, logged once); the
    CLI's command, signed, is applied; so is one published with the token by anyone who has it."""
    bootstrap = running["bootstrap"]
    # the risk agent reads `control` once it has taken its first input: a bar and a FLAT signal
    publish_records(bootstrap, [("md.klines", kline("BTCUSDT", 0, 42_000.0)),
                                ("signals", signal("BTCUSDT", 0, "FLAT", 42_000.0, 0))])
    wait("the first verdict", lambda: read_topic(bootstrap, "risk.verdicts"))
    assert status(running)["trading_state"] == "RUNNING"

    before = rejected(running, "trading")
    now = int(time.time() * 1000)
    value = json.dumps({"state": "HALTED", "flatten": True, "reason": "forged"}, sort_keys=True)
    forged = {"event_id": event_ids.control("trading", now), "event_time": now, "entity": "trading",
              "kind": "trading_state", "value": value, "actor": "intruder", "signature": ""}
    wrong = {**forged, "event_time": now + 1, "event_id": event_ids.control("trading", now + 1)}
    wrong["signature"] = signature(wrong, "not-the-token")
    tampered = control_record("trading", "trading_state", {"state": "REDUCE_ONLY", "flatten": False}, "op", now + 2,
                              running["token"]) | {"value": value}  # signed, then changed
    pub, codec = Producer(producer_config(bootstrap, **{"linger.ms": 0})), default_codec()
    for rec in (forged, wrong, tampered):
        pub.produce("control", codec.encode(topic("control").schema, rec), b"trading")
    assert pub.flush(15) == 0
    wait("three rejections", lambda: rejected(running, "trading") - before >= 3)
    time.sleep(1.0)  # a poll of `control` more (CONTROL_POLL_SECONDS) would have applied them by now
    assert status(running)["trading_state"] == "RUNNING"

    stopped = run_cli(running["home"], "trading", "stop", "--reason", "signed", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    wait("REDUCE_ONLY from the CLI", lambda: status(running)["trading_state"] == "REDUCE_ONLY")
    publish(bootstrap, "trading", "trading_state", {"state": "RUNNING", "flatten": False, "reason": "signed"},
            "test", int(time.time() * 1000), token=running["token"])
    wait("RUNNING from a signed record", lambda: status(running)["trading_state"] == "RUNNING")
    assert rejected(running, "trading") - before == 3

    log = (running["home"] / "run" / "worker.log").read_text()
    assert log.count("control: ignored") == 1 and "'trading'" in log  # once per entity, with the entity
    assert running["token"] not in log


def test_a_forged_model_promotion_is_not_read(running):
    """What the predict agent reads: the same reader passes on only the records the token verifies."""
    bootstrap = running["bootstrap"]
    now = int(time.time() * 1000)
    value = {"side": "long", "model_id": "forged", "artifact_path": "/tmp/x", "sha256": "0" * 64}
    forged = control_record("model:long", "model_promoted", value, "intruder", now, "guessed-token")
    pub = Producer(producer_config(bootstrap, **{"linger.ms": 0}))
    pub.produce("control", default_codec().encode(topic("control").schema, forged), b"model:long")
    assert pub.flush(15) == 0
    publish(bootstrap, "model:long", "model_promoted", {**value, "model_id": "signed"}, "test", now + 1,
            token=running["token"])
    reader = ControlReader(bootstrap, "test-security", running["token"])
    try:
        models = [json.loads(r["value"])["model_id"] for r in reader.catch_up() if r["entity"] == "model:long"]
    finally:
        reader.close()
    assert models == ["signed"]


def test_no_secret_in_the_logs_or_the_metrics(running):
    texts = [p.read_text(errors="replace") for p in (running["home"] / "run").glob("*.log")]
    texts.append((running["home"].parent / "up.log").read_text(errors="replace"))
    for url in (running["up"] + "/metrics", running["metrics"]):
        with urllib.request.urlopen(url, timeout=10) as response:
            texts.append(response.read().decode())
    assert texts and not [t for t in texts if running["token"] in t]


# -- a live-path run against the fake exchange: no key, secret or token anywhere it writes -------------------------

@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_live_path_run_leaves_no_secret_in_logs_stack_json_metrics_or_the_archive(tmp_path):
    from connectors.binance.execution import client_ids
    from schemas.catalog import archived
    from tests.fake_binance import API_KEY, API_SECRET, FakeBinance

    now = 1_704_240_000_000  # 2024-01-03 00:00 UTC
    home = tmp_path / "home"
    token = "operator-token-" + "x7" * 16
    fake = FakeBinance(["BTCUSDT"], now).start()
    env = cli_env(home, PERPFLOW_BINANCE_REST_URL=fake.rest_url, PERPFLOW_BINANCE_WS_URL=fake.ws_url,
                  PERPFLOW_BINANCE_API_KEY=API_KEY, PERPFLOW_BINANCE_API_SECRET=API_SECRET,
                  PERPFLOW_CONTROL_TOKEN=token, PERPFLOW_BINANCE_INTERVALS="5m", PERPFLOW_RUN_WORKER="false",
                  PERPFLOW_LOG_LEVEL="DEBUG")
    out = open(tmp_path / "up.log", "w")
    up = subprocess.Popen([PERPFLOW, "up", "--source", "binance", "--live", "--symbols", "BTCUSDT", "--start",
                           "2024-01-02T23:00"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    secrets_ = (API_KEY, API_SECRET, token)
    try:
        stack = home / "run" / "stack.json"
        wait("stack.json", lambda: stack.exists() or up.poll() is not None)
        assert up.poll() is None, (tmp_path / "up.log").read_text()
        info = json.loads(stack.read_text())
        wait("user stream connected", lambda: fake._user_ws and any(fake._user_ws.values()))
        price = fake.market.price("BTCUSDT", now)
        order = {"event_id": "order:sec-1", "event_time": now, "symbol": "BTCUSDT", "intent_id": "sec-1",
                 "action": "OPEN", "side": "BUY", "quantity": 0.02, "stop_loss": price * 0.98,
                 "take_profit": price * 1.04, "source": "test"}
        producer = Producer(producer_config(info["bootstrap"]))
        producer.produce("orders", default_codec().encode(topic("orders").schema, order), b"BTCUSDT")
        assert producer.flush(15) == 0
        wait("entry and protection", lambda: len(fake.account.algo_orders) == 2)
        assert fake.exchange_orders()[0]["clientOrderId"] == client_ids("sec-1")["entry"]

        def query(sql: str) -> str:
            request = urllib.request.Request(info["api_url"] + "/sql", method="POST", headers={
                "Authorization": f"Bearer {token}"}, data=json.dumps({"query": sql, "format": "tsv"}).encode())
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.read().decode()

        wait("user events archived", lambda: query("SELECT count() FROM user_events FINAL").strip() != "0")
        dumps = {t.table: query(f"SELECT * FROM `{t.table}`") for t in archived()}
        assert dumps["orders"] and dumps["user_events"] and dumps["md_klines"]
        with urllib.request.urlopen(info["api_url"] + "/metrics", timeout=10) as response:
            metrics_text = response.read().decode()
        written = {"stack.json": stack.read_text(), "metrics": metrics_text, **dumps,
                   **{p.name: p.read_text(errors="replace") for p in (home / "run").glob("*.log")}}
    finally:
        up.terminate()
        up.wait(60)
        out.close()
        fake.stop()
    written["output"] = (tmp_path / "up.log").read_text(errors="replace")
    assert "DEBUG" in written["output"]  # the chattiest level, and still nothing
    leaks = sorted(name for name, text in written.items() if any(s in text for s in secrets_))
    assert not leaks, f"a key, secret or token in {leaks}"
