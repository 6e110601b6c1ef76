"""docker-compose.yml validated by a real compose implementation (docker-compose v1 from Debian, which
needs no engine for `config`), and the rules every service follows; the Dockerfile's shape."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import typer
import yaml

from streams.cli import app
from tests.conftest import ROOT

COMPOSE = shutil.which("docker-compose")
pytestmark = pytest.mark.skipif(COMPOSE is None, reason="docker-compose missing: `make tools` installs it")
PERPFLOW_IMAGE = "perpflow:latest"


def compose_config(*env_file: str) -> subprocess.CompletedProcess:
    args = ["--env-file", *env_file] if env_file else []
    return subprocess.run([COMPOSE, "--project-directory", str(ROOT), *args, "config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})  # no stray CLICKHOUSE_* etc. from the caller


@pytest.fixture(scope="module")
def config() -> dict:
    result = compose_config(str(ROOT / ".env.example"))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_secrets_must_come_from_the_environment(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose_config(str(empty))
    assert result.returncode != 0 and "CLICKHOUSE_PASSWORD" in result.stderr


def test_the_whole_stack_is_there(config):
    assert {"kafka", "clickhouse", "prometheus", "grafana", "sink", "worker", "replay", "market-connector",
            "user-connector", "execution-live"} <= set(config["services"])


CONNECTORS = {"market-connector": ["connector", "market"], "user-connector": ["connector", "user"],
              "execution-live": ["connector", "execution"]}
LIVE = {"user-connector", "execution-live"}


def test_each_connector_is_its_own_service(config):
    services = config["services"]
    for name, command in CONNECTORS.items():
        svc = services[name]
        assert svc["command"] == command, name
        assert "/health" in " ".join(svc["healthcheck"]["test"]), name
        assert "ports" not in svc and svc.get("deploy", {}).get("replicas", 1) == 1, name  # singletons
    assert "profiles" not in services["market-connector"]  # market data always flows


def test_one_paper_exchange_the_workers_and_live_only_by_choice(config):
    """The paper exchange is the workers' risk agent (PERPFLOW_PAPER_TRADING, true by default): no service runs a
    paper connector, no `perpflow up` runs a worker of its own, and the live connectors run only in the `live`
    profile, which the example leaves off; going live also sets PERPFLOW_PAPER_TRADING=false."""
    services = config["services"]
    for name, svc in services.items():
        assert svc.get("command", [])[:2] != ["connector", "paper"], name
        assert "paper" not in svc.get("profiles", ()), name
        if svc.get("command", [None])[0] == "up":  # sink, replay: no worker, so no second paper exchange
            assert svc["environment"]["PERPFLOW_RUN_WORKER"] == "false" and "--no-paper" in svc["command"], name
    assert not [v for v in config.get("volumes", {}) if "paper" in v]
    assert services["worker"]["environment"]["PERPFLOW_PAPER_TRADING"] == "true"  # paper by default
    profiles = {n: set(s.get("profiles", ())) for n, s in services.items()}
    live_execution = {n for n, s in services.items() if s.get("command", [])[:2] in (["connector", "execution"],
                                                                                      ["connector", "user"])}
    assert live_execution == LIVE and all(profiles[n] == {"live"} for n in LIVE)
    assert {n for n, p in profiles.items() if "live" in p} == LIVE
    env = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["COMPOSE_PROFILES"] == "" and env["PERPFLOW_PAPER_TRADING"] == "true"
    text = (ROOT / ".env.example").read_text()
    assert "COMPOSE_PROFILES=live" in text and "PERPFLOW_PAPER_TRADING=false" in text  # how to go live


def test_going_live_turns_paper_trading_off(tmp_path):
    live = tmp_path / "live.env"
    live.write_text((ROOT / ".env.example").read_text().replace("COMPOSE_PROFILES=\n", "COMPOSE_PROFILES=live\n")
                    .replace("PERPFLOW_PAPER_TRADING=true", "PERPFLOW_PAPER_TRADING=false"))
    result = compose_config(str(live))
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert LIVE <= set(services)
    assert {services[n]["environment"]["PERPFLOW_PAPER_TRADING"] for n in ("worker", *LIVE)} == {"false"}


def test_the_api_key_reaches_only_the_live_services(config):
    for name, svc in config["services"].items():
        has_key = "PERPFLOW_BINANCE_API_SECRET" in svc.get("environment", {})
        assert has_key == (name in LIVE), name
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.startswith(("PERPFLOW_BINANCE_API_KEY=", "PERPFLOW_BINANCE_API_SECRET=")):
            assert line.endswith("="), "no key in the example"


def test_every_service_has_a_healthcheck_or_waits_for_one(config):
    for name, svc in config["services"].items():
        waits = [d for d, c in svc.get("depends_on", {}).items() if c.get("condition") == "service_healthy"]
        assert "healthcheck" in svc or waits, name
        for dep in waits:
            assert "healthcheck" in config["services"][dep], f"{name} waits for {dep}, which has no healthcheck"


def test_perpflow_services_run_real_commands_with_the_same_settings(config):
    commands = set(typer.main.get_command(app).commands)
    services = {n: s for n, s in config["services"].items() if s.get("image") == PERPFLOW_IMAGE}
    assert set(services) >= {"sink", "worker", "replay", *CONNECTORS}
    shared = {k: v for k, v in services["sink"]["environment"].items() if k != "PERPFLOW_RUN_WORKER"}
    for name, svc in services.items():
        assert svc["command"][0] in commands, f"{name}: `perpflow {svc['command'][0]}` does not exist"
        assert shared.items() <= svc["environment"].items(), name
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy", name


def test_workers_scale(config):
    worker = config["services"]["worker"]
    assert "ports" not in worker and "container_name" not in worker  # `--scale worker=N` must not collide


def test_prometheus_scrapes_every_long_running_perpflow_service(config):
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"]
    targets = {t for job in scrape for sc in job.get("static_configs", []) for t in sc["targets"]}
    targets |= {f"{n}:{sd['port']}" for job in scrape for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    assert {"sink:9464", "worker:9465"} | {f"{n}:9464" for n in CONNECTORS} <= targets


def test_dockerfile_is_multi_stage_slim_pinned_and_non_root():
    text = (ROOT / "deploy/Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(bases) >= 2, "multi-stage"
    assert all(re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", b) for b in bases), bases  # pinned, slim
    final = text.split("\nFROM ")[-1]
    assert re.search(r"^USER (?!root)\S+", final, re.M), "the final stage runs as a non-root user"
    assert "COPY --from=build" in final and "pip wheel" not in final
