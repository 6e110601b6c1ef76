"""Deterministic event ids: the same fact always gets the same id, wherever it was observed
(websocket, REST backfill or replay), so the archive and the consumers can deduplicate on it."""

import hashlib


def kline(symbol: str, interval: str, open_time_ms: int) -> str:
    return f"kline:{symbol}:{interval}:{open_time_ms:013d}"


def mark_price(symbol: str, event_time_ms: int) -> str:
    return f"mark:{symbol}:{event_time_ms:013d}"


def funding(symbol: str, funding_time_ms: int) -> str:
    return f"funding:{symbol}:{funding_time_ms:013d}"


def features(symbol: str, interval: str, open_time_ms: int) -> str:
    return f"features:{symbol}:{interval}:{open_time_ms:013d}"


def dead_letter(source_topic: str, partition: int, offset: int, stage: str = "") -> str:
    """A refused Kafka message. `stage` names who refused a message that decoded (`store`, `handler:<agent>`): two
    readers refusing the same message leave two dead letters, not one that the archive merges."""
    return f"dlq:{source_topic}:{partition}:{offset}" + (f":{stage}" if stage else "")


def control(entity: str, event_time_ms: int) -> str:
    return f"control:{entity}:{event_time_ms:013d}"


def book_ticker(symbol: str, update_id: int) -> str:
    return f"book:{symbol}:{update_id}"


def open_interest(symbol: str, time_ms: int) -> str:
    return f"oi:{symbol}:{time_ms:013d}"


def liquidation(symbol: str, trade_time_ms: int, side: str, quantity: str, price: str) -> str:
    return f"liq:{symbol}:{trade_time_ms:013d}:{side}:{quantity}@{price}"


def user_event(event_type: str, *parts: object) -> str:
    """One Binance user-data event: its type and the fields that make it unique (ids, status, times)."""
    return ":".join(["user", event_type, *(str(p) for p in parts)])


def risk_event(kind: str, symbol: str, *parts: object) -> str:
    return ":".join(["risk", kind, symbol, *(str(p) for p in parts)])


def dead_letter_payload(source: str, payload: bytes) -> str:
    """Input that never was a Kafka message (e.g. a WebSocket frame): named by its content."""
    return f"dlq:{source}:{hashlib.sha1(payload).hexdigest()[:20]}"


def prediction(symbol: str, interval: str, open_time_ms: int) -> str:
    return f"prediction:{symbol}:{interval}:{open_time_ms:013d}"


def signal(symbol: str, interval: str, open_time_ms: int) -> str:
    return f"signal:{symbol}:{interval}:{open_time_ms:013d}"


def verdict(symbol: str, interval: str, open_time_ms: int) -> str:
    return f"verdict:{symbol}:{interval}:{open_time_ms:013d}"


def open_intent(symbol: str, interval: str, open_time_ms: int) -> str:
    """The entry a signal became: a replayed signal gives the same intent, which the exchange side never fills twice."""
    return f"open:{symbol}:{interval}:{open_time_ms:013d}"


def close_intent(position_intent: str, reason: str, attempt: int = 1) -> str:
    """Closing one position for one reason: asked again (a replay, a second kill), it is the same intent. A retry of
    a close that left the position standing (`attempt` 2, 3, ...) is a new intent: the exchange side runs it again."""
    return f"close:{position_intent}:{reason}" + (f":{attempt}" if attempt > 1 else "")


def order(intent_id: str) -> str:
    return f"order:{intent_id}"


def risk_book(account: str, seq: int, time_ms: int) -> str:
    """One snapshot of the risk agent's book (a book started afresh counts from 1 again: the time tells them apart)."""
    return f"risk_book:{account}:{seq:012d}:{time_ms:013d}"
