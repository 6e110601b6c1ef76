"""`perpflow worker`: one Faust worker process running the decision-chain agents.

Agent modules (`streams/<agent>/agent.py`, those of `settings.agents`: every one by default) are imported here so
that they register on the app. The worker serves its own /metrics."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import faust
from prometheus_client.parser import text_string_to_metric_families

from streams import metrics
from streams.app import create_app
from streams.broker import die_with_parent
from streams.control import control_token
from streams.control_api import ControlApi
from streams.settings import Settings
from streams.watchdog import Watchdog

log = logging.getLogger(__name__)
DECISION_SETTINGS = ("min_ev", "min_pwin", "risk_per_trade_usdt", "fee", "slippage", "paper_taker_fee",
                     "paper_slippage_bps", "paper_balance")


def run_worker(settings: Settings, bootstrap: str) -> None:
    # the agents' own clients (control, snapshots) reach the broker the worker was given, however it was found
    settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
    app = create_app(bootstrap, datadir=str(settings.run_dir / f"faust{_suffix(settings.topic_prefix)}"),
                     prefix=settings.topic_prefix)
    agents = {module: importlib.import_module(module).register(app, settings)
              for module in (f"streams.{name}.agent" for name in settings.agents)}
    routes = {}
    if "streams.risk.agent" in agents:  # the trading views and commands (GET /status, POST /trading/kill, ...)
        from streams.risk.views import routes as trading_routes

        routes = trading_routes(agents["streams.risk.agent"], bootstrap, control_token(settings),
                                agents.get("streams.predict.agent"))
    watchdog = Watchdog(app, bootstrap, settings.watchdog_seconds, control_token(settings)).start()
    api = ControlApi(settings.metrics_host, settings.worker_metrics_port, routes=routes,
                     token=control_token(settings), liveness=watchdog.healthy).start()
    info = _info_path(settings.run_dir, os.getpid())
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(json.dumps({"pid": os.getpid(), "metrics_url": api.url + "/metrics", "api_url": api.url}))
    try:
        worker = faust.Worker(app, loglevel=settings.log_level.lower(), redirect_stdouts=False, quiet=True)
        # no progress spinner: its log handler puts the root logger at DEBUG, and every debug() call of Faust and
        # aiokafka on the hot path (one per message sent) would then format a record only to drop it
        worker.spinner = None
        worker.execute_from_commandline()
    finally:
        info.unlink(missing_ok=True)
        watchdog.stop()
        api.stop()


def _suffix(prefix: str) -> str:
    """Per-run file names of a backtest's worker (`-bt.<run>`), so runs beside each other share no files."""
    return f"-{prefix.rstrip('.')}" if prefix else ""


def _info_path(run_dir: Path, pid: int) -> Path:
    """Where a worker says where its /metrics are (its port may be chosen by the OS)."""
    return run_dir / f"worker-{pid}.json"


class WorkerProcess:
    """A `perpflow worker` child of `perpflow up`: logs to run/worker.log, dies with its parent, and is restarted
    when it dies (its agents resume from their committed offsets and changelog-backed tables)."""

    MAX_RESTARTS = 5  # in a row without a minute of uptime: a crash loop, not a hiccup
    HEALTH_SECONDS = 10.0  # how often `check` asks the worker's /health

    def __init__(self, settings: Settings, bootstrap: str, symbols: list[str] | None = None,
                 paper: bool | None = None):
        self.log_path: Path = settings.run_dir / f"worker{_suffix(settings.topic_prefix)}.log"
        # the child reads its settings from the environment: pass this process's explicitly
        self.env = {**os.environ, "PERPFLOW_KAFKA_BOOTSTRAP": bootstrap, "PERPFLOW_HOME": str(settings.home_dir),
                    "PERPFLOW_WORKER_METRICS_PORT": str(settings.worker_metrics_port),
                    "PERPFLOW_METRICS_HOST": settings.metrics_host, "PERPFLOW_LOG_LEVEL": settings.log_level,
                    "PERPFLOW_SYMBOLS": ",".join(symbols or settings.symbols),
                    "PERPFLOW_PAPER_TRADING": str(settings.paper_trading if paper is None else paper).lower(),
                    "PERPFLOW_TOPIC_PREFIX": settings.topic_prefix,
                    "PERPFLOW_WATCHDOG_SECONDS": str(settings.watchdog_seconds),
                    # the same control token (else the child reads run/control-token of the same home)
                    **({"PERPFLOW_CONTROL_TOKEN": settings.control_token.get_secret_value()}
                       if settings.control_token.get_secret_value() else {}),
                    **({"PERPFLOW_STORE_API": settings.store_api} if settings.store_api else {}),
                    # thresholds and costs as this process has them (a backtest's --fee and --slippage-bps included)
                    **{f"PERPFLOW_{k.upper()}": str(getattr(settings, k)) for k in DECISION_SETTINGS}}
        self.restarts = 0
        self._crash_loop = 0
        self._health_asked = 0.0
        self._start()

    def _start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "worker"], env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True, preexec_fn=die_with_parent)
        self.started_at = time.monotonic()

    def check(self) -> None:
        """Restart the worker if it died, or if its watchdog says its chain is stalled (as Kubernetes' liveness
        probe would); raise when it keeps dying."""
        code = self.process.poll()
        if code is None:
            stalled = self._stalled()
            if stalled is None:
                return
            log.error("the Faust worker's chain is stalled (%s); restarting it (see %s)", stalled, self.log_path)
            self.stop()
            code = self.process.poll()
        self._crash_loop = self._crash_loop + 1 if time.monotonic() - self.started_at < 60 else 1
        if self._crash_loop > self.MAX_RESTARTS:
            raise RuntimeError(f"the Faust worker exited with code {code} {self._crash_loop} times in a row; "
                               f"see {self.log_path}")
        log.warning("the Faust worker exited with code %s; restarting it (see %s)", code, self.log_path)
        metrics.WORKER_RESTARTS.inc()
        self.restarts += 1
        self._start()

    def _stalled(self) -> str | None:
        """What the worker's /health says is stalled (None: alive, or not answering yet); asked every
        HEALTH_SECONDS."""
        if time.monotonic() - self._health_asked < self.HEALTH_SECONDS:
            return None
        self._health_asked = time.monotonic()
        try:
            info = json.loads(_info_path(self.log_path.parent, self.process.pid).read_text())
            with urllib.request.urlopen(info["api_url"] + "/health", timeout=5):
                return None
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                return None
            try:
                return "; ".join(json.loads(exc.read()).get("stalls", [])) or "stalled"
            except ValueError:
                return "stalled"
        except (OSError, ValueError, KeyError):
            return None

    def held_back(self) -> float | None:
        """Bars the features agent holds for their context and signals the risk agent holds for the other symbols
        now (from the worker's /metrics); None until it answers."""
        bars, signals = self.metric("perpflow_features_held_bars"), self.metric("perpflow_risk_held_signals")
        return None if bars is None or signals is None else bars + signals

    def metric(self, name: str, **labels: str) -> float | None:
        """Sum of the worker's samples of `name` with these labels (from its /metrics); None until it answers."""
        text = self.get("/metrics")
        if text is None:
            return None
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))

    def get(self, path: str) -> str | None:
        """The worker's answer to GET `path` of its API (/metrics, /status, ...); None until it answers."""
        try:
            info = json.loads(_info_path(self.log_path.parent, self.process.pid).read_text())
            with urllib.request.urlopen(info["api_url"] + path, timeout=5) as response:
                return response.read().decode()
        except (OSError, ValueError, KeyError):
            return None

    def stop(self, grace: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # Faust stops its agents, commits and flushes on SIGTERM
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

