"""End to end with a real Prometheus (Debian's package): it scrapes a running `perpflow up` replay through
the real broker and store; the Topic-health lag and throughput queries return data, and every PromQL
expression perpflow ships (rules and dashboards) names only metrics the running services export (a name listed in
streams/metrics.py DECISION_CHAIN_METRICS, none now, may be queried before it is built)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from grafana.boards import TOPIC_HEALTH
from grafana.model import PromQuery
from streams.metrics import DECISION_CHAIN_METRICS
from tests.conftest import PERPFLOW, ROOT, SAMPLE, cli_env, free_port
from tests.promql import dashboard_exprs, metric_names, rule_exprs

PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(PROMETHEUS is None, reason="prometheus missing: `make tools` installs Debian's")]

# Queried names whose exporter is not built yet: streams/metrics.py DECISION_CHAIN_METRICS says what each one is
# (empty now). The test below fails as soon as one of them is exported (drop it here and from that list then), and
# any queried name not listed here must be exported now: a renamed metric cannot go unnoticed.
EXPECTED_MISSING: set[str] = set()
# series that exist only while a position is open (the replay here trades nothing: no model is promoted)
ONLY_WITH_POSITIONS = {"perpflow_position_liq_distance_atr"}
# series that exist only once a promoted model has enough predictions with a known outcome: `perpflow up`, which
# computes them, serves the family from the start, without samples here (nothing is promoted)
ONLY_WITH_LABELLED_PREDICTIONS = {"perpflow_model_calibration_error", "perpflow_model_calibration_predictions"}
SCRAPE_S = 1
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ("",)}


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def wait_for(what: str, check, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


class Running:
    def __init__(self, up: subprocess.Popen, ports: dict[str, int], prom_url: str):
        self.up, self.ports, self.prom_url = up, ports, prom_url

    def query(self, expr: str) -> list[dict]:
        doc = json.loads(get(f"{self.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def families(self, job: str) -> dict:
        """The metric families one perpflow process serves, by name."""
        return {fam.name: fam for fam in text_string_to_metric_families(
            get(f"http://127.0.0.1:{self.ports[job]}/metrics"))}

    def exported(self) -> set[str]:
        """Every series name the perpflow processes export now (a family without samples yet counts too)."""
        names = set()
        for port in self.ports.values():
            for fam in text_string_to_metric_families(get(f"http://127.0.0.1:{port}/metrics")):
                names |= {s.name for s in fam.samples} | {fam.name + x for x in SUFFIXES.get(fam.type, ("",))}
        return names


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """`perpflow up` replaying one day of BTCUSDT at 8,640× (about 10 s) and staying up, scraped every second."""
    tmp = tmp_path_factory.mktemp("observability")
    ports = {"perpflow-sink": free_port(), "perpflow-worker": free_port()}
    up = subprocess.Popen(
        [PERPFLOW, "up", "--source", "replay", "--data", str(SAMPLE), "--symbols", "BTCUSDT",
         "--start", "2024-01-01", "--end", "2024-01-02", "--speed", "8640"],
        env=cli_env(tmp / "home", PERPFLOW_METRICS_PORT=str(ports["perpflow-sink"]),
                    PERPFLOW_WORKER_METRICS_PORT=str(ports["perpflow-worker"])),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    config = {"global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
              "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                                 for job, port in ports.items()]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_port = free_port()
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("w"))
    try:
        running = Running(up, ports, f"http://127.0.0.1:{prom_port}")

        def both_scraped() -> bool:
            assert up.poll() is None, up.stderr.read()
            try:
                return len(running.query("up == 1")) == len(ports)
            except OSError:  # Prometheus is still starting
                return False

        wait_for("both perpflow processes scraped", both_scraped)
        yield running
    finally:
        prom.terminate()
        up.terminate()
        prom.wait(30)
        up.wait(60)


def test_queried_metrics_are_exported_except_the_decision_chain_ones(running):
    # the sink has archived something, so every metric that the replay moves has series by now
    wait_for("rows archived", lambda: running.query("perpflow_sink_rows_total > 0"))
    queried = set().union(*map(metric_names, [*rule_exprs().values(), *dashboard_exprs().values()]))
    exported = running.exported()
    assert EXPECTED_MISSING == set(DECISION_CHAIN_METRICS), "the contract in streams/metrics.py and this list agree"
    assert not (EXPECTED_MISSING & exported), f"now exported: remove from the lists: {EXPECTED_MISSING & exported}"
    expected = queried - EXPECTED_MISSING - ONLY_WITH_POSITIONS
    assert expected <= exported, f"queried, never exported: {expected - exported}"
    assert EXPECTED_MISSING <= queried
    assert ONLY_WITH_POSITIONS <= {m.name for m in REGISTRY.collect()}  # defined, if not exported here


def test_the_calibration_error_is_served_by_the_process_that_owns_the_store(running):
    # `perpflow up` (the sink's process, job perpflow-sink) computes it; no model is promoted, so no series
    served = running.families("perpflow-sink")
    for name in ONLY_WITH_LABELLED_PREDICTIONS:
        assert served[name].type == "gauge" and served[name].samples == [], served[name]
    assert "perpflow_model_calibration_error" in set().union(*map(metric_names, rule_exprs().values()))


LAG_AND_THROUGHPUT = ("Consumed messages/s by group and topic", "Topic growth, messages/s (broker end offsets)",
                      "Rows archived/s by table", "Consumer lag by group and partition (fetch high-watermark)",
                      "Committed lag by group and topic", "Event-time lag by group and topic")


@pytest.mark.parametrize("title", LAG_AND_THROUGHPUT)
def test_topic_health_lag_and_throughput_queries_return_data(running, title):
    panel = next(p for p in TOPIC_HEALTH.panels() if p.title == title)
    for q in panel.queries:
        assert isinstance(q, PromQuery)
        expr = q.expr.replace("$__rate_interval", f"{4 * SCRAPE_S}s")
        series = wait_for(f"data for {title!r}: {expr}", lambda e=expr: running.query(e))
        assert all(s["metric"] for s in series), series  # grouped by their labels, as the legend expects


def test_throughput_is_seen_while_the_replay_runs(running):
    # the peak rate over the last minutes: the sink archived md.klines at a positive rate while Prometheus looked
    series = wait_for("a positive archive rate", lambda: running.query(
        'max_over_time(sum by (table) (rate(perpflow_sink_rows_total{table="md_klines"}[4s]))[5m:1s]) > 0'))
    assert float(series[0]["value"][1]) > 0
