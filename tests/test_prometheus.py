"""The Prometheus configuration, the alert rules and every dashboard PromQL expression, checked by promtool
(Debian's prometheus package; `make test` installs it)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from streams.metrics import DECISION_CHAIN_METRICS
from tests.promql import PROMETHEUS_DIR, RULE_FILES, dashboard_exprs, metric_names, rule_exprs

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: `make tools` installs Debian's prometheus")


def promtool(*args: str, cwd=PROMETHEUS_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_config_is_valid():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_rules_are_valid():
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass():
    tests = sorted(str(p) for p in (PROMETHEUS_DIR / "tests").glob("*.test.yml"))
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for f in tests for case in yaml.safe_load(open(f))["tests"]
              for t in case.get("alert_rule_test", [])}
    assert {"ConsumerLagGrowing", "TradingHalted", "PositionUnprotected", "ModelCalibrationDrift"} <= tested


def test_the_operator_alerts_exist():
    assert {"ConsumerLagGrowing", "ConnectorDisconnected", "ConnectorFlapping", "NoClosedBar", "DeadLettersRising",
            "SinkInsertsFailing", "TradingHalted", "DailyLossNearLimit", "PositionUnprotected", "ModelStale",
            "ModelCalibrationDrift", "EndToEndLatencyHigh"} <= set(rule_exprs())


def test_every_dashboard_expression_parses(tmp_path):
    # promtool parses PromQL when it checks rules: one recording rule per panel expression
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"panel:{i}", "expr": e} for i, e in enumerate(exprs.values())]}]}
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout + result.stderr


def test_decision_chain_metrics_are_all_queried():
    # a name listed as "to be exported" that nothing queries is a stale contract
    used = set().union(*map(metric_names, [*rule_exprs().values(), *dashboard_exprs().values()]))
    assert set(DECISION_CHAIN_METRICS) <= used, set(DECISION_CHAIN_METRICS) - used


def test_every_alert_is_documented():
    doc = (PROMETHEUS_DIR.parent / "README.md").read_text()
    assert [a for a in rule_exprs() if f"`{a}`" not in doc] == []
