"""Every PromQL expression perpflow ships (alert rules and dashboard panels), for the tests that parse them
with promtool and check the metric names they use against what the services export."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from grafana.boards import DASHBOARDS
from grafana.model import PromQuery

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
METRIC = re.compile(r"\bperpflow_[A-Za-z0-9_]+")
RATE_INTERVAL = "1m"  # what $__rate_interval becomes at a 15 s scrape interval


def rule_exprs() -> dict[str, str]:
    """alert name → expression"""
    return {r["alert"]: r["expr"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
            for r in g["rules"]}


def dashboard_exprs(rate_interval: str = RATE_INTERVAL) -> dict[str, str]:
    """'dashboard / panel / refId' → expression, Grafana's $__rate_interval expanded"""
    return {f"{d.title} / {p.title} / {chr(ord('A') + i)}": q.expr.replace("$__rate_interval", rate_interval)
            for d in DASHBOARDS for p in d.panels() for i, q in enumerate(p.queries) if isinstance(q, PromQuery)}


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))
