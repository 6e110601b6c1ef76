"""deploy/k8s: every overlay renders with kustomize (kubectl's, offline), the rendered objects validate
against the Kubernetes schemas (kubernetes-validate, strict; the operators' custom resources aside), and
the generated resources equal what the catalog and the alert rules say."""

from __future__ import annotations

import os
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from deploy.generate import render
from schemas.catalog import BY_NAME, SYMBOL_PARTITIONS, TOPICS
from tests.conftest import ROOT
from tests.promql import rule_exprs

KUBECTL = shutil.which("kubectl")
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.32.0"
# Custom resources of the operators perpflow relies on: Strimzi (Kafka), Altinity (ClickHouse), Prometheus operator
OPERATOR_GROUPS = {"kafka.strimzi.io", "clickhouse.altinity.com", "monitoring.coreos.com"}

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl missing (it comes with the machine image)")


def kustomize(path) -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, kustomize(K8S / "overlays" / request.param)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_overlays_exist():
    assert OVERLAYS == ["dev", "prod"]


def test_objects_validate_against_the_kubernetes_schemas(rendered):
    _, docs = rendered
    custom = [d for d in docs if d["apiVersion"].split("/")[0] in OPERATOR_GROUPS]
    core = [d for d in docs if d not in custom]
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget",
            "Namespace", "CronJob"} <= {d["kind"] for d in core}
    for doc in core:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert {d["kind"] for d in custom} == {"Kafka", "KafkaNodePool", "KafkaTopic", "ClickHouseInstallation",
                                           "PodMonitor", "PrometheusRule"}


def test_the_validator_rejects_a_broken_object(rendered):
    _, docs = rendered
    broken = yaml.safe_load(yaml.safe_dump(by_kind(docs, "Deployment")["perpflow-sink"]))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_container_has_probes_resources_and_metrics_scraped(rendered):
    _, docs = rendered
    workloads = [*by_kind(docs, "Deployment").values(), *by_kind(docs, "StatefulSet").values()]
    assert {w["metadata"]["name"] for w in workloads} == {"perpflow-sink", "perpflow-worker", *CONNECTORS,
                                                          "perpflow-alertmanager"}
    for w in workloads:
        pod = w["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "perpflow"  # the PodMonitor's selector
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in pod["spec"]["containers"]:
            assert {"livenessProbe", "readinessProbe"} <= set(c), c["name"]
            assert {"requests", "limits"} <= set(c["resources"]), c["name"]
            assert "metrics" in {p["name"] for p in c["ports"]}
            if w["metadata"]["name"] != "perpflow-alertmanager":  # not perpflow's image: no perpflow settings
                assert {"configMapRef": {"name": "perpflow-config"}} in c["envFrom"]


def test_the_trainer_retrains_daily_one_at_a_time_with_the_deployments_settings(rendered):
    _, docs = rendered
    job = by_kind(docs, "CronJob")["perpflow-trainer"]
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["args"][0] == "retrain" and "--every" not in c["args"]  # the CronJob is the schedule
    assert {"configMapRef": {"name": "perpflow-config"}} in c["envFrom"]
    assert {e["name"] for e in c["env"]} >= {"PERPFLOW_CLICKHOUSE_URL", "PERPFLOW_CONTROL_TOKEN"}


def test_alertmanager_renders_the_shipped_config_with_the_secrets_of_a_secret(rendered):
    """The same files compose mounts (deploy/alertmanager, as the generated ConfigMap), rendered at start by
    render.sh with the receivers' secrets from the Secret, which the repository ships empty."""
    _, docs = rendered
    am = by_kind(docs, "Deployment")["perpflow-alertmanager"]
    pod = am["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["/bin/sh", "/etc/alertmanager/render.sh"] and "--cluster.listen-address=" in c["args"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    config = by_kind(docs, "ConfigMap")[mounts["/etc/alertmanager"]["configMap"]["name"]]
    assert set(config["data"]) == {"alertmanager.yml.tmpl", "perpflow.tmpl", "render.sh"}
    secrets_dir = env_of(c)["SECRETS_DIR"]
    secret = by_kind(docs, "Secret")[mounts[secrets_dir]["secret"]["secretName"]]["stringData"]
    assert secret == {"webhook_url": "", "telegram_bot_token": "", "telegram_chat_id": ""}
    assert am["spec"]["replicas"] == 1  # no gossip between instances: two would notify twice


CONNECTORS = {"perpflow-market": ["connector", "market"]}
LIVE = {"perpflow-market": ["connector", "market"], "perpflow-execution": ["connector", "execution"],
        "perpflow-user": ["connector", "user"]}
KEY_ENV = {"PERPFLOW_BINANCE_API_KEY", "PERPFLOW_BINANCE_API_SECRET"}


def containers(docs: list[dict]) -> dict[str, dict]:
    workloads = [*by_kind(docs, "Deployment").values(), *by_kind(docs, "StatefulSet").values()]
    return {w["metadata"]["name"]: c for w in workloads for c in w["spec"]["template"]["spec"]["containers"]}


def assert_singletons(docs: list[dict], commands: dict[str, list[str]]) -> None:
    deployments = by_kind(docs, "Deployment")
    for name, args in commands.items():
        d = deployments[name]
        assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate", name
        assert containers(docs)[name]["args"] == args, name


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_connectors_are_singletons_and_the_workers_trade_on_paper(rendered):
    """The one paper exchange is the workers' risk agent: no execution Deployment, no paper connector or volume."""
    _, docs = rendered
    assert_singletons(docs, CONNECTORS)
    cs = containers(docs)
    assert env_of(cs["perpflow-worker"])["PERPFLOW_PAPER_TRADING"] == "true"
    assert "--no-paper" in cs["perpflow-sink"]["args"] and env_of(cs["perpflow-sink"])["PERPFLOW_RUN_WORKER"] == "false"
    assert "perpflow-execution" not in by_kind(docs, "Deployment")
    for name, c in cs.items():
        assert c["args"][:2] not in (["connector", "paper"], ["connector", "execution"]), name
        assert not KEY_ENV & set(env_of(c)), f"{name} sees the API key without trading live"
    assert not by_kind(docs, "PersistentVolumeClaim"), "no paper state volume: the workers' is in Kafka"


def test_the_live_component_makes_the_same_deployment_live(tmp_path):
    """components/live added to the prod overlay: the user connector and the Binance execution connector, and the
    workers stop paper trading, so each order is filled once; only the two connectors see the API key."""
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "perpflow",
        "resources": [f"{rel}/overlays/prod"], "components": [f"{rel}/components/live"]}))
    docs = kustomize(tmp_path)
    assert_singletons(docs, LIVE)
    cs = containers(docs)
    assert env_of(cs["perpflow-worker"])["PERPFLOW_PAPER_TRADING"] == "false"
    assert env_of(cs["perpflow-execution"])["PERPFLOW_PAPER_TRADING"] == "false"  # else it refuses to start
    assert by_kind(docs, "StatefulSet")["perpflow-worker"]["spec"]["replicas"] == 4  # the prod overlay's, kept
    assert not by_kind(docs, "PersistentVolumeClaim")
    for name, c in containers(docs).items():
        keys = {e["name"] for e in c.get("env", []) if e["name"] in KEY_ENV}
        assert keys == (KEY_ENV if name in {"perpflow-user", "perpflow-execution"} else set()), name
        for e in c.get("env", []):
            if e["name"] in KEY_ENV:
                assert e["valueFrom"]["secretKeyRef"]["name"] == "perpflow-secrets", name  # never a literal
    user = by_kind(docs, "Deployment")["perpflow-user"]
    assert user["metadata"]["namespace"] == "perpflow"
    assert user["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "perpflow"
    assert user["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    secret = by_kind(docs, "Secret")["perpflow-secrets"]["stringData"]
    assert KEY_ENV <= set(secret) and not any(secret[k] for k in KEY_ENV), "a template: no key in the repo"
    for doc in docs:
        if doc["apiVersion"].split("/")[0] not in OPERATOR_GROUPS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_workers_never_outnumber_partitions(rendered):
    _, docs = rendered
    assert 1 <= by_kind(docs, "StatefulSet")["perpflow-worker"]["spec"]["replicas"] <= SYMBOL_PARTITIONS
    assert by_kind(docs, "PodDisruptionBudget")["perpflow-worker"]["spec"]["maxUnavailable"] == 1


def test_topics_are_the_catalog(rendered):
    overlay, docs = rendered
    topics = {d["spec"]["topicName"]: d["spec"] for d in by_kind(docs, "KafkaTopic").values()}
    assert set(topics) == set(BY_NAME)
    for name, spec in topics.items():
        t = BY_NAME[name]
        assert spec["partitions"] == t.partitions and spec["config"] == t.kafka_config(), name
        assert spec["replicas"] == (3 if overlay == "prod" else 1)
    kafka = by_kind(docs, "Kafka")["perpflow"]["spec"]["kafka"]["config"]
    assert kafka["auto.create.topics.enable"] is False
    if overlay == "prod":
        assert kafka["min.insync.replicas"] == 2 and by_kind(docs, "KafkaNodePool")["combined"]["spec"]["replicas"] == 3


def test_generated_files_are_up_to_date():
    for path, text in render().items():
        assert path.read_text() == text, f"{path} is stale: run `python -m deploy.generate`"


def test_prometheus_rule_holds_every_alert():
    docs = kustomize(K8S / "base")
    rule = by_kind(docs, "PrometheusRule")["perpflow"]
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == rule_exprs()
    assert len(by_kind(docs, "KafkaTopic")) == len(TOPICS)
