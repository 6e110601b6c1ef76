"""The worker's trading views and commands, served by its control API (`streams.control_api`):

- GET  /status          trading state, account, models, consumer lag, last bar per symbol
- GET  /signals/latest  the newest signal and verdict per symbol
- GET  /positions       open and pending positions with their liquidation distance
- POST /trading/start   RUNNING
- POST /trading/stop    REDUCE_ONLY: no new entries, positions keep their protection
- POST /trading/kill    flatten everything and HALT

Commands are records on `control` (entity `trading`), which the risk agent applies — the same path as a command
published from anywhere else, so a restarted worker or a second one sees it too."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka.admin import AdminClient

from streams.app import app_id_for, topic_prefix
from streams.broker import client_config, committed_offsets, end_offsets
from streams.control import publish
from streams.risk.guard import HALTED, REDUCE_ONLY, RUNNING, TRADING_ENTITY
from streams.settings import CHAIN_HOPS

COMMANDS = {"start": {"state": RUNNING, "flatten": False}, "stop": {"state": REDUCE_ONLY, "flatten": False},
            "kill": {"state": HALTED, "flatten": True}}
LAG_TOPICS = (*CHAIN_HOPS, "user.events")  # what the agents read


def routes(agent: Any, bootstrap: str, token: str, models: Any = None) -> dict:
    """Routes over the risk agent's published snapshot (`agent.snapshot`, replaced whole after every batch); the
    commands go on `control` signed with `token` (`streams.control.control_token`)."""

    def status(path: str, body: dict | None) -> tuple[int, object]:
        snap = dict(agent.snapshot)
        snap.update(models.describe() if models else {})
        snap["lag"] = _lag(bootstrap, topic_prefix(agent.app))
        return 200, snap

    def latest(path: str, body: dict | None) -> tuple[int, object]:
        return 200, agent.snapshot.get("latest", {})

    def positions(path: str, body: dict | None) -> tuple[int, object]:
        return 200, agent.snapshot.get("positions", {})

    def command(path: str, body: dict | None) -> tuple[int, object]:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name not in COMMANDS:
            return 404, {"error": f"unknown command {name!r}; one of {', '.join(COMMANDS)}"}
        value = COMMANDS[name] | {"reason": (body or {}).get("reason") or name}
        record = publish(bootstrap, TRADING_ENTITY, "trading_state", value, (body or {}).get("actor") or "api",
                         int(time.time() * 1000), token=token, prefix=topic_prefix(agent.app))
        return 202, {"accepted": value, "event_id": record["event_id"]}

    return {("GET", "/status"): status, ("GET", "/signals/latest"): latest, ("GET", "/positions"): positions,
            ("POST", "/trading"): command}


def _lag(bootstrap: str, prefix: str = "") -> dict[str, int]:
    """Messages the agents' consumer group has not committed yet, per input topic."""
    ends = end_offsets(bootstrap, [prefix + t for t in LAG_TOPICS])
    committed = committed_offsets(AdminClient(client_config(bootstrap)), app_id_for(prefix))
    lag: dict[str, int] = {}
    for (topic, partition), end in ends.items():
        name = topic[len(prefix):]
        lag[name] = lag.get(name, 0) + max(end - committed.get((topic, partition), 0), 0)
    return lag
