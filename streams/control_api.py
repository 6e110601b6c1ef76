"""The small HTTP API every long-running perpflow process serves on loopback (by default):

- GET  /metrics  Prometheus exposition
- GET  /health   liveness
- GET  /topics   the latest topic-health snapshot (JSON)
- POST /sql      a read-only query against the store this process owns (body: JSON
                 {"query": ..., "format": "table|tsv|csv"}) — how `perpflow sql` reaches an embedded
                 chDB store while `perpflow up` holds it
- whatever `routes` a process adds: the worker's trading views and commands (streams/risk/views.py), `up`'s
  model promotion.

Every POST (/sql included: a query may still cost the store, and it reads everything) needs `Authorization: Bearer
<token>`, compared in constant time; without a token no POST is served. GETs are open on loopback. Bound beyond
it (an address other than 127.0.0.1/::1/localhost) the API refuses to start without a token, and only the probes'
and Prometheus' GETs (/metrics, /health, /ready) stay open: the trading views want the token too.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams.errors import PerpflowError
from streams.settings import is_loopback

OPEN_OFF_LOOPBACK = ("/metrics", "/health", "/ready")  # what Prometheus and the Kubernetes probes GET, tokenless
# (method, path prefix) → handler(path, JSON body or None) → (HTTP status, JSON-able answer)
Route = Callable[[str, dict | None], tuple[int, object]]


class ControlApi:
    def __init__(self, host: str, port: int, store=None, health=None,
                 routes: dict[tuple[str, str], Route] | None = None, token: str = "",
                 liveness: Callable[[], tuple[bool, dict]] | None = None):
        api = self
        if not token and not is_loopback(host):
            raise PerpflowError(f"the control API would listen on {host or 'every interface'} without a token: set "
                                "PERPFLOW_CONTROL_TOKEN, or PERPFLOW_METRICS_HOST=127.0.0.1")
        self.routes, self.token = routes or {}, token
        self.loopback = is_loopback(host)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: requests are not news
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                """The request carries the token; else it is answered 401 here."""
                given = self.headers.get("Authorization", "").encode("latin-1", "replace")  # as http.server decoded
                if api.token and hmac.compare_digest(given, f"Bearer {api.token}".encode()):
                    return True
                self._send(401, b'{"error":"a bearer token is required (Authorization: Bearer ...)"}')
                return False

            def _route(self, method: str) -> bool:
                """A registered route answers; False when none matches."""
                for (m, prefix), handler in api.routes.items():
                    if m != method or not (self.path == prefix or self.path.startswith(prefix.rstrip("/") + "/")):
                        continue
                    try:
                        length = int(self.headers.get("Content-Length", 0))
                        body = json.loads(self.rfile.read(length)) if length else None
                        code, answer = handler(self.path, body)
                    except PerpflowError as exc:
                        code, answer = 400, {"error": str(exc)}
                    except Exception as exc:
                        code, answer = 500, {"error": f"{type(exc).__name__}: {exc}"}
                    self._send(code, json.dumps(answer, default=str).encode())
                    return True
                return False

            def do_GET(self):
                if not api.loopback and self.path.split("?", 1)[0] not in OPEN_OFF_LOOPBACK and not self._authorized():
                    return
                if self._route("GET"):
                    return
                if self.path == "/metrics":
                    self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
                elif self.path == "/health":  # liveness: a worker's watchdog says 503 while its chain is stalled
                    alive, answer = api.liveness() if api.liveness is not None else (True, {"status": "ok"})
                    self._send(200 if alive else 503, json.dumps(answer).encode())
                elif self.path == "/topics" and api.health is not None:
                    snap = api.health.latest
                    if snap is None or time.time() - snap.taken_at > 2.0:  # fresh, with the minute of history
                        snap = api.health.sample()
                    self._send(200, json.dumps(snap.to_json()).encode())
                else:
                    self._send(404, b'{"error":"not found"}')

            def do_POST(self):
                if not self._authorized() or self._route("POST"):
                    return
                if self.path != "/sql" or api.store is None:
                    self._send(404, b'{"error":"not found"}')
                    return
                try:
                    req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    text = api.store.query_text(req["query"], req.get("format", "table"))
                    self._send(200, text.encode(), "text/plain; charset=utf-8")
                except PerpflowError as exc:
                    self._send(400, json.dumps({"error": str(exc)}).encode())
                except Exception as exc:
                    self._send(500, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())

        self.store, self.health, self.liveness = store, health, liveness
        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise PerpflowError(f"cannot serve /metrics on {host}:{port} ({exc.strerror}); set "
                                "PERPFLOW_METRICS_PORT / PERPFLOW_WORKER_METRICS_PORT to a free port, or 0") from None
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="control-api", daemon=True)

    def start(self) -> ControlApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.store = self.health = None  # the handler class refers back here: let their clients go now
