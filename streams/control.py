"""Writing the control plane: one record on the compacted `control` topic, keyed by its entity (e.g. model:long),
so the latest record per entity is the current state. Published synchronously: the caller learns whether the
broker has it."""

from __future__ import annotations

import json

from confluent_kafka import Producer

from schemas import event_ids
from schemas.catalog import topic
from schemas.codec import default_codec
from streams.broker import ensure_topics, producer_config
from streams.errors import PerpflowError


def publish(bootstrap: str, entity: str, kind: str, value: dict, actor: str, event_time_ms: int,
            timeout: float = 15.0) -> dict:
    """Publish and wait for the acknowledgement; return the record."""
    control = topic("control")
    ensure_topics(bootstrap, [control])  # a fresh external cluster may not have it yet
    record = {"event_id": event_ids.control(entity, event_time_ms), "event_time": event_time_ms, "entity": entity,
              "kind": kind, "value": json.dumps(value, sort_keys=True), "actor": actor}
    errors: list[str] = []
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 0}))
    producer.produce(control.name, default_codec().encode(control.schema, record), entity.encode(),
                     on_delivery=lambda err, msg: errors.append(str(err)) if err else None)
    if producer.flush(timeout) or errors:
        raise PerpflowError(f"the `control` topic at {bootstrap} did not take the {kind} record "
                            f"({'; '.join(errors) or 'timed out'})")
    return record
