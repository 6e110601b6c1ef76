"""The one builder of `deadletter` records, for every producer of them (agents, sink, connectors, replay).

A dead letter keeps a bounded prefix of the refused payload plus its size and sha256: the record stays far below
any broker's message limit whatever it was given, so a message too big for the broker can never make its own dead
letter fail to deliver (and the agent that refused it crash-loop on the redelivery). The hash still identifies
the original, which stays in its own topic for the retention period."""

from __future__ import annotations

import hashlib
import time

from schemas import event_ids

PAYLOAD_PREFIX_BYTES = 4096
ERROR_CHARS = 2000


def dead_letter(source_topic: str, partition: int, offset: int, key: bytes | str | None, payload: bytes | None,
                reason: str, error: str, event_id: str | None = None) -> dict:
    """The record for input refused with `reason` (short, machine-readable) and `error` (what was said, bounded).
    A Kafka message is named by where it was (`event_ids.dead_letter`); input that never was one (a WebSocket
    frame, a row of a history file) passes partition and offset -1 and is named by its content."""
    payload = payload or b""
    if event_id is None:
        event_id = event_ids.dead_letter(source_topic, partition, offset) if offset >= 0 \
            else event_ids.dead_letter_payload(source_topic, payload)
    return {
        "event_id": event_id,
        "event_time": int(time.time() * 1000),
        "source_topic": source_topic,
        "partition": partition,
        "offset": offset,
        "key": key.decode("utf-8", "replace") if isinstance(key, bytes) else key or None,
        "reason": reason,
        "error": error[:ERROR_CHARS],
        "payload": payload[:PAYLOAD_PREFIX_BYTES],
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
