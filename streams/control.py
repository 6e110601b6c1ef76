"""The control plane's topic: one record on the compacted `control` topic per change, keyed by its entity
(model:long, trading), so the latest record per entity is the current state. `publish` writes synchronously (the
caller learns whether the broker has it); `ControlReader` reads every record, from the beginning, without a group:
every worker needs every command, whatever partitions it owns.

Every record carries an HMAC of its fields keyed by the control token (`signed`): the topic is writable by anyone
who reaches the broker, so a reader passes on only the records it verifies (`ControlReader`); the others are
counted (perpflow_control_rejected) and logged once per entity, never applied."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from schemas import event_ids
from schemas.catalog import topic
from schemas.codec import DecodeError, default_codec
from streams import metrics
from streams.broker import consumer_config, ensure_topics, producer_config
from streams.errors import PerpflowError
from streams.settings import Settings, is_loopback

log = logging.getLogger(__name__)
CATCH_UP_SECONDS = 30.0


SIGNED_FIELDS = ("event_id", "event_time", "entity", "kind", "value", "actor")


def signature(record: dict, token: str) -> str:
    """HMAC-SHA256 over the record's fields (not the signature), keyed by the control token."""
    message = json.dumps([record[f] for f in SIGNED_FIELDS], separators=(",", ":")).encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def signed(record: dict, token: str) -> dict:
    """The record with its signature: every producer of `control` records goes through here."""
    if not token:
        raise PerpflowError("a control record needs the control token to be signed")
    return {**record, "signature": signature(record, token)}


def verified(record: dict, token: str) -> bool:
    return bool(token and record.get("signature")) and hmac.compare_digest(record["signature"],
                                                                           signature(record, token))


def control_record(entity: str, kind: str, value: dict, actor: str, event_time_ms: int, token: str) -> dict:
    return signed({"event_id": event_ids.control(entity, event_time_ms), "event_time": event_time_ms,
                   "entity": entity, "kind": kind, "value": json.dumps(value, sort_keys=True), "actor": actor}, token)


def publish(bootstrap: str, entity: str, kind: str, value: dict, actor: str, event_time_ms: int, *, token: str,
            timeout: float = 15.0, prefix: str = "") -> dict:
    """Publish, signed with `token` (`control_token`), and wait for the acknowledgement; return the record.
    `prefix`: a backtest run's `control`."""
    control = topic("control")
    record = control_record(entity, kind, value, actor, event_time_ms, token)
    ensure_topics(bootstrap, [control], prefix)  # a fresh external cluster may not have it yet
    errors: list[str] = []
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 0}))
    producer.produce(prefix + control.name, default_codec().encode(control.schema, record), entity.encode(),
                     on_delivery=lambda err, msg: errors.append(str(err)) if err else None)
    if producer.flush(timeout) or errors:
        raise PerpflowError(f"the `control` topic at {bootstrap} did not take the {kind} record "
                            f"({'; '.join(errors) or 'timed out'})")
    return record


def promotion_publisher(bootstrap: str, token: str):
    """What `training.registry.promote` calls to announce a promotion on `control` (None without a broker)."""
    from training import registry

    def announce(row: dict, previous: dict | None) -> dict | None:
        if not bootstrap:
            return None
        return publish(bootstrap, f"model:{row['side']}", "model_promoted", registry.control_value(row, previous),
                       row["actor"], row["promoted_at"], token=token)

    return announce


def promote_route(store, bootstrap: str, token: str):
    """POST /models/{id}/promote on the API of the process that owns the registry's store (`perpflow up`); body
    {"reason": ..., "force": false, "actor": ...}. The gates decide, as with `perpflow models promote`."""
    from training import registry

    def handle(path: str, body: dict | None) -> tuple[int, object]:
        parts = path.strip("/").split("/")
        if len(parts) != 3 or parts[2] != "promote":
            return 404, {"error": "POST /models/{id}/promote"}
        body = body or {}
        force, reason = bool(body.get("force")), str(body.get("reason") or "").strip()
        if force and not reason:
            return 400, {"error": "force needs a reason saying why the gates are overridden"}
        result = registry.promote(store, parts[1], str(body.get("actor") or "api"), reason, force,
                                  promotion_publisher(bootstrap, token))
        return 200, {"promoted": result.model["id"], "side": result.model["side"],
                     "archived": result.incumbent["id"] if result.incumbent else None,
                     "gates": [{"name": g.name, "ok": g.ok, "detail": g.detail} for g in result.gates],
                     "control": result.control}

    return handle


def control_token(settings: Settings) -> str:
    """The bearer token of the state-changing HTTP routes and the key of `control`'s HMACs: PERPFLOW_CONTROL_TOKEN,
    else one made for this home and kept in run/control-token (mode 0600), where `perpflow trading ...`, `perpflow
    sql` and the workers of the same machine find it. A control API bound beyond loopback needs a configured one:
    a token made here would be known to this machine only."""
    if settings.control_token.get_secret_value():
        return settings.control_token.get_secret_value()
    if not is_loopback(settings.metrics_host):
        raise PerpflowError(f"PERPFLOW_METRICS_HOST={settings.metrics_host or '(every interface)'} serves the control "
                            "API beyond this machine: set PERPFLOW_CONTROL_TOKEN (the same secret for every process)")
    path = settings.run_dir / "control-token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole under a name of its own, then linked in: a process of this home reading it meanwhile never
        # sees it half written, and of two making one at once the first link wins
        draft = path.with_name(f".control-token.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()


def entity_kind(entity: str) -> str:
    """The metric label of an entity: its kind only (`trading`, `model`), so a writer cannot mint series."""
    kind = entity.split(":", 1)[0]
    return kind if kind in ("trading", "model") else "other"


class ControlReader:
    """Every record on `control`, in order: `catch_up` to its end, then `poll` for new ones."""

    def __init__(self, bootstrap: str, group: str, token: str, prefix: str = "") -> None:
        self.name = prefix + topic("control").name
        self.token = token
        self.rejected_entities: set[str] = set()  # logged once each
        self.consumer = Consumer(consumer_config(bootstrap, group,
                                                 **{"enable.partition.eof": True}))
        meta = self.consumer.list_topics(self.name, timeout=10).topics.get(self.name)
        partitions = sorted(meta.partitions) if meta and meta.partitions else [0]
        self.consumer.assign([TopicPartition(self.name, p, OFFSET_BEGINNING) for p in partitions])
        self.partitions = set(partitions)

    def catch_up(self, timeout: float = CATCH_UP_SECONDS) -> list[dict]:
        """Every record up to the end of `control` (librdkafka's end-of-partition comes from Fetch's
        high-watermark, which Tansu gets right)."""
        found: list[dict] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while at_end != self.partitions and time.monotonic() < deadline:
            msg = self.consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                continue
            self._take(msg, found)
        return found

    def poll(self) -> list[dict]:
        found: list[dict] = []
        for msg in self.consumer.consume(100, timeout=0):
            if not msg.error():
                self._take(msg, found)
        return found

    def _take(self, msg: Any, found: list[dict]) -> None:
        try:
            _, record = default_codec().decode(msg.value())
        except DecodeError as exc:
            log.warning("unreadable control record at offset %d: %s", msg.offset(), exc)
            return
        if not verified(record, self.token):
            entity = str(record.get("entity", ""))
            metrics.CONTROL_REJECTED.labels(entity_kind(entity)).inc()
            if entity not in self.rejected_entities and len(self.rejected_entities) < 100:
                self.rejected_entities.add(entity)
                log.warning("control: ignored a %s record for %r (offset %d) whose signature is %s: not signed with "
                            "this deployment's control token", record.get("kind"), entity[:64], msg.offset(),
                            "wrong" if record.get("signature") else "missing")
            return
        found.append(record)

    def close(self) -> None:
        self.consumer.close()
