"""`perpflow connector market|user|execution`: one exchange connector as its own process, the way the
compose services and Kubernetes Deployments run them.

- market: Binance's market WebSocket streams → md.* topics, with the REST backfill of anything missed
- user: Binance's user data stream → user.events, its health → risk.events
- execution: orders → Binance REST orders, reconciled with the exchange at start and on every reconnect of the
  account stream it watches itself (connectors/binance/runner.py says why)

There is no paper connector: the paper exchange runs inside the worker's risk agent (`streams/risk/paper_desk.py`,
PERPFLOW_PAPER_TRADING), which applies each bar just before deciding the signal of that bar, so fills follow event
time whatever the replay speed and a backtest is deterministic; a second paper exchange reading `orders` would
fill every order twice. Going live is the execution and user connectors here plus PERPFLOW_PAPER_TRADING=false.

It is the same code `perpflow up` runs in its thread (BinanceSource with one part). The process
creates any missing catalog topic (as `perpflow up` does; idempotent), serves /metrics and /health on
PERPFLOW_METRICS_HOST:PERPFLOW_METRICS_PORT, and runs until SIGTERM/Ctrl-C, or until the connector fails: then it
exits non-zero and its supervisor (compose, Kubernetes) restarts it, and it resumes from Kafka (committed offsets,
the last bar in md.klines) and the exchange (reconciliation).
"""

from __future__ import annotations

import logging
import time

from streams.broker import ensure_topics
from streams.control import control_token
from streams.control_api import ControlApi
from streams.errors import PerpflowError
from streams.settings import Settings
from streams.up import ReportingThread  # a thread that remembers the exception that ended it

log = logging.getLogger(__name__)

PARTS = ("market", "user", "execution")
LIVE_PARTS = ("user", "execution")  # these need the account's API key
STREAM_OF_PART = {"market": "binance-market", "user": "binance-user", "execution": "binance-execution"}


def readiness(part: str):
    """GET /ready of a connector process: 200 while its Binance stream is connected, else 503 — what a Kubernetes
    readiness probe and an operator want to know; /health stays liveness (the process answers)."""
    from prometheus_client import REGISTRY

    stream = STREAM_OF_PART[part]

    def ready(path: str, body: dict | None) -> tuple[int, object]:
        connected = REGISTRY.get_sample_value("perpflow_connector_connected", {"connector": stream}) == 1
        return (200 if connected else 503), {"status": "ready" if connected else "stream down", "stream": stream,
                                             "connected": connected}

    return ready


def build(settings: Settings, bootstrap: str, part: str, symbols: list[str], start_ms: int | None = None):
    """The connector object of `part`: something with run() (blocking) and stop() (from another thread)."""
    from connectors.binance.runner import BinanceSource

    return BinanceSource(settings, bootstrap, symbols, live=part in LIVE_PARTS, start_ms=start_ms, parts=(part,))


def run_connector(settings: Settings, bootstrap: str, part: str, symbols: list[str],
                  start_ms: int | None = None) -> None:
    if part not in PARTS:
        raise ValueError(f"unknown connector {part!r}; known: {', '.join(PARTS)}")
    try:
        ensure_topics(bootstrap)
    except Exception as exc:  # a KafkaException naming the broker problem
        raise PerpflowError(f"cannot reach Kafka at {bootstrap} to check the topics ({exc}); is "
                            "PERPFLOW_KAFKA_BOOTSTRAP right and the broker up?") from None
    api = ControlApi(settings.metrics_host, settings.metrics_port, routes={("GET", "/ready"): readiness(part)},
                     token=control_token(settings)).start()  # no POST routes, but beyond loopback only with a token
    log.info("%s connector: Kafka %s, symbols %s, /metrics, /health and /ready at %s", part, bootstrap,
             ",".join(symbols), api.url)
    connector = build(settings, bootstrap, part, symbols, start_ms)
    thread = ReportingThread(f"connector-{part}", connector.run)
    thread.start()
    try:
        while thread.is_alive():
            time.sleep(0.2)
    finally:  # Ctrl-C / SIGTERM arrive here as KeyboardInterrupt: stop, flush, commit
        connector.stop()
        thread.join(30)
        api.stop()
    error = thread.error
    if error is not None and not isinstance(error, KeyboardInterrupt):
        log.error("%s connector failed", part, exc_info=error)
        raise PerpflowError(f"the {part} connector stopped: {type(error).__name__}: {error}") from None
    raise PerpflowError(f"the {part} connector stopped without an error; it should run until stopped")
