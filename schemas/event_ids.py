"""Deterministic event ids: the same fact always gets the same id, wherever it was observed
(websocket, REST backfill or replay), so the archive and the consumers can deduplicate on it."""


def kline(symbol: str, interval: str, open_time_ms: int) -> str:
    return f"kline:{symbol}:{interval}:{open_time_ms:013d}"


def mark_price(symbol: str, event_time_ms: int) -> str:
    return f"mark:{symbol}:{event_time_ms:013d}"


def funding(symbol: str, funding_time_ms: int) -> str:
    return f"funding:{symbol}:{funding_time_ms:013d}"


def features(symbol: str, interval: str, open_time_ms: int) -> str:
    return f"features:{symbol}:{interval}:{open_time_ms:013d}"


def dead_letter(source_topic: str, partition: int, offset: int) -> str:
    return f"dlq:{source_topic}:{partition}:{offset}"


def control(entity: str, event_time_ms: int) -> str:
    return f"control:{entity}:{event_time_ms:013d}"
