"""Alerts reach a person: a critical record on `risk.events`, archived by the real sink, fires the shipped rule in
a real Prometheus, and the real Alertmanager — configured by deploy/alertmanager/render.sh from secret files, as in
compose and Kubernetes — delivers it once to a webhook and once to Telegram (a local stand-in for the Bot API at
TELEGRAM_API_URL), with its labels and a message that says what happened, where, and what to run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from schemas import event_ids
from schemas.codec import default_codec
from tests.conftest import ROOT, free_port
from tests.test_sink import produce, wait_caught_up

ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    ALERTMANAGER is None or PROMETHEUS is None,
    reason="alertmanager or prometheus missing: `make tools` installs Debian's")]

DEPLOY = ROOT / "deploy"
RENDER = DEPLOY / "alertmanager" / "render.sh"
TOKEN, CHAT = "7000000001:test-bot-token-not-a-real-one", "-100555"


class Receiver:
    """The webhook receiver and the Telegram Bot API, one local server: every POST kept (path, JSON body)."""

    def __init__(self):
        self.posts: list[tuple[str, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                receiver.posts.append((self.path, body))
                answer = {"ok": True}
                if self.path.endswith("/sendMessage"):  # what the Bot API answers: the message sent
                    answer["result"] = {"message_id": len(receiver.posts), "date": int(time.time()),
                                        "chat": {"id": int(body.get("chat_id", 0)), "type": "group"},
                                        "text": body.get("text", "")}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def webhooks(self, alertname: str) -> list[dict]:
        return [b for p, b in self.posts if p == "/hook" and b.get("commonLabels", {}).get("alertname") == alertname]

    def telegrams(self) -> list[dict]:
        return [b for p, b in self.posts if p == f"/bot{TOKEN}/sendMessage"]


def wait(what: str, predicate, timeout: float, *procs: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"{p.args[0]} exited {p.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_critical_risk_event_reaches_the_webhook_and_telegram_once(broker, store, tmp_path):
    from connectors.clickhouse_sink import ClickHouseSink
    from streams.broker import ensure_topics
    from streams.control_api import ControlApi

    receiver = Receiver()
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "webhook_url").write_text(receiver.url + "/hook\n")
    (secrets / "telegram_bot_token").write_text(TOKEN)
    (secrets / "telegram_chat_id").write_text(CHAT)
    am_port, am_cluster = free_port(), tmp_path / "am-data"
    rendered = tmp_path / "am" / "alertmanager.yml"
    am = subprocess.Popen(
        [str(RENDER), f"--storage.path={am_cluster}", f"--web.listen-address=127.0.0.1:{am_port}",
         "--cluster.listen-address="],
        env={"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(secrets), "CONFIG_OUT": str(rendered),
             "TELEGRAM_API_URL": receiver.url, "ALERTMANAGER": ALERTMANAGER},
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "alertmanager.log").open("w"))
    # the sink, archiving risk.events as `perpflow up` runs it; its metrics on the control API it serves
    ensure_topics(broker.bootstrap)
    sink = ClickHouseSink(broker.bootstrap, store, batch_rows=10, batch_seconds=0.2)
    sink_thread = threading.Thread(target=sink.run, daemon=True)
    sink_thread.start()
    api = ControlApi("127.0.0.1", 0).start()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                         "external_labels": {"deployment": "perpflow-test"}},
              "rule_files": [str(DEPLOY / "prometheus" / "rules" / "perpflow.yml")],
              "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
              "scrape_configs": [{"job_name": "perpflow-sink",
                                  "static_configs": [{"targets": [api.url.removeprefix("http://")]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{free_port()}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    try:
        wait("Alertmanager to answer", lambda: _answers(f"http://127.0.0.1:{am_port}/-/ready"), 60, am)
        assert rendered.stat().st_mode & 0o077 == 0  # the rendered config holds the secrets: the owner's only
        now = int(time.time() * 1000)
        codec = default_codec()
        events = [("close_failed", "critical", "ETHUSDT", {"error": "-2019 Margin is insufficient"}),
                  ("order_rejected", "warning", "BTCUSDT", {"code": -1111})]
        produce(broker.bootstrap, [("risk.events", symbol, codec.encode("risk_event", {
            "event_id": event_ids.risk_event(kind, symbol, now), "event_time": now, "symbol": symbol, "kind": kind,
            "severity": severity, "detail": json.dumps(detail), "source": "test"})) for kind, severity, symbol, detail
            in events])
        wait_caught_up(sink, broker.bootstrap)
        assert store.query_rows("SELECT count() FROM risk_events FINAL")[0][0] == 2  # archived, as ever
        started = time.monotonic()
        wait("the webhook and Telegram to hear of it",
             lambda: receiver.webhooks("RiskEventCritical") and receiver.telegrams(), 90, am, prom)
        took = time.monotonic() - started
        time.sleep(15)  # past group_wait again: nothing more for the same alert
    finally:
        prom.terminate()
        am.terminate()
        sink.stop()
        sink_thread.join(30)
        api.stop()
        prom.wait(30)
        am.wait(30)
        receiver.server.shutdown()
    hooks, telegrams = receiver.webhooks("RiskEventCritical"), receiver.telegrams()
    assert len(hooks) == 1 and len(telegrams) == 1, (hooks, telegrams)
    assert took < 60  # at 1 s intervals here; the shipped 15 s scrape and evaluation add under 30 s
    (alert,) = hooks[0]["alerts"]
    assert hooks[0]["status"] == alert["status"] == "firing"
    assert {k: alert["labels"].get(k) for k in ("alertname", "severity", "kind", "symbol", "deployment")} == {
        "alertname": "RiskEventCritical", "severity": "critical", "kind": "close_failed", "symbol": "ETHUSDT",
        "deployment": "perpflow-test"}
    assert "close_failed" in alert["annotations"]["description"]
    text = telegrams[0]["text"]
    assert str(telegrams[0]["chat_id"]) == CHAT
    assert "FIRING [critical] RiskEventCritical" in text  # what happened
    assert "critical risk event close_failed on ETHUSDT" in text and "perpflow-test" in text  # where
    assert "run: What it says: perpflow sql" in text and "perpflow trading" in text  # what to run
    assert "order_rejected" not in json.dumps(receiver.posts)  # a warning event is archived, not paged


def test_no_secret_in_the_shipped_configuration_and_none_missing(tmp_path):
    """The template and the deployment files name where secrets come from, never a value; render.sh refuses a
    setup that would page no one, or Telegram half-configured."""
    bot_token = re.compile(r"\b\d{6,12}:[A-Za-z0-9_-]{30,}\b")  # the Bot API's token shape
    shipped = [*DEPLOY.rglob("*"), ROOT / "docker-compose.yml"]
    for path in (p for p in shipped if p.is_file() and p.suffix in (".yml", ".yaml", ".tmpl", ".sh", "")):
        assert not bot_token.search(path.read_text(errors="replace")), path
    template = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml.tmpl").read_text()
                              .replace("@TELEGRAM_CHAT_ID@", "0"))
    receivers = {r["name"]: r for r in template["receivers"]}
    assert {c["url"] for r in receivers.values() for c in r["webhook_configs"]} == {"@WEBHOOK_URL@"}
    assert [c["bot_token"] for c in receivers["critical"]["telegram_configs"]] == ["@TELEGRAM_BOT_TOKEN@"]
    secrets = tmp_path / "s"
    secrets.mkdir()
    env = {"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(secrets), "CONFIG_OUT": str(tmp_path / "out.yml"),
           "ALERTMANAGER": "true"}
    result = subprocess.run([str(RENDER)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "webhook_url" in result.stderr
    (secrets / "webhook_url").write_text("http://hooks.example/perpflow")
    (secrets / "telegram_bot_token").write_text(TOKEN)
    result = subprocess.run([str(RENDER)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "both" in result.stderr
    (secrets / "telegram_bot_token").unlink()
    result = subprocess.run([str(RENDER)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load((tmp_path / "out.yml").read_text())  # the webhook only
    assert [r["name"] for r in rendered["receivers"]] == ["webhook", "critical"]
    assert all("telegram_configs" not in r for r in rendered["receivers"])
    if ALERTMANAGER is not None:
        amtool = shutil.which("amtool")
        if amtool:
            check = subprocess.run([amtool, "check-config", str(tmp_path / "out.yml")], capture_output=True,
                                   text=True, timeout=30)
            assert check.returncode == 0, check.stdout + check.stderr


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False

