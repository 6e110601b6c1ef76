"""Read-only queries against the store from a process that may not own it.

An embedded chDB store is open in one process only (`perpflow up`); every other process of the home — `perpflow
sql`, a worker fetching a model artifact — asks that process's control API (POST /sql, with the control token).
PERPFLOW_STORE_API names the API of a `perpflow up` of another home; with a ClickHouse server configured, the
server is queried directly.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from connectors.clickhouse_store import Store
from streams.control import control_token
from streams.errors import PerpflowError
from streams.settings import Settings
from streams.stack import StackInfo


def query_text(settings: Settings, query: str, fmt: str = "table", open_embedded: bool = True) -> str:
    """`query` answered in `fmt` (table, tsv or csv) by whoever holds the store. `open_embedded`: with nobody
    holding this home's embedded store, open it here (a command may; a worker beside a stack must not)."""
    api = settings.store_api
    if not api and settings.embedded_store:
        info = StackInfo.load(settings)
        api = info.api_url if info is not None else ""
    if api:
        return _ask(api, control_token(settings), query, fmt)
    if settings.embedded_store and not open_embedded:
        raise PerpflowError("no store to ask: no `perpflow up` holds this home's store; set PERPFLOW_STORE_API to "
                            "the API of the one that does, or PERPFLOW_CLICKHOUSE_URL to the ClickHouse server")
    if settings.embedded_store and not (settings.home_dir / "clickhouse").exists():
        raise PerpflowError(f"no store at {settings.home_dir / 'clickhouse'} yet: run `make run` "
                            "(or `perpflow up ... --until-drained`) first")
    store = Store(settings)
    try:
        return store.query_text(query, fmt)
    finally:
        store.close()


def _ask(api: str, token: str, query: str, fmt: str) -> str:
    req = urllib.request.Request(api + "/sql", method="POST", data=json.dumps({"query": query, "format": fmt}).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.read().decode()
    except urllib.error.HTTPError as exc:
        raise PerpflowError(json.loads(exc.read() or b"{}").get("error", str(exc))) from None
    except OSError as exc:
        raise PerpflowError(f"the store's holder at {api} does not answer ({exc}); wait for it or stop it") from None
