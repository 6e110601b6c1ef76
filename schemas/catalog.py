"""The topic catalog: the one declarative list of topics.

Topics are created from it at start-up (idempotently), the ClickHouse archive tables are derived
from it (`schemas.tables`), and later the dashboards are checked against it. Topic names are part
of the contract; a topic's table is its name with `.` replaced by `_`.
"""

from __future__ import annotations

from dataclasses import dataclass

DAY_MS = 86_400_000

# Every symbol-keyed topic has the same partition count so that Faust can co-partition them
# (a symbol's klines, marks and funding land on the same partition number in every topic).
SYMBOL_PARTITIONS = 4


@dataclass(frozen=True)
class Topic:
    name: str
    schema: str  # file stem of the Avro schema in schemas/avro/
    key: str  # what the message key holds
    partitions: int = SYMBOL_PARTITIONS
    retention_ms: int = 7 * DAY_MS  # -1 = keep forever
    compacted: bool = False  # then `order_by` starts with the record field the message key holds
    archived: bool = True  # the ClickHouse sink copies it into `table`
    order_by: tuple[str, ...] = ("symbol", "event_id")  # archive sort key; event_id makes rows unique

    @property
    def table(self) -> str:
        return self.name.replace(".", "_")

    def kafka_config(self) -> dict[str, str]:
        return {
            "cleanup.policy": "compact" if self.compacted else "delete",
            "retention.ms": str(self.retention_ms),
        }


TOPICS: tuple[Topic, ...] = (
    Topic("md.klines", "kline", "symbol"),
    Topic("md.markprice", "mark_price", "symbol"),
    Topic("md.funding", "funding", "symbol", retention_ms=30 * DAY_MS),
    Topic("md.bookticker", "book_ticker", "symbol", retention_ms=DAY_MS),
    Topic("md.openinterest", "open_interest", "symbol"),
    Topic("md.liquidations", "liquidation", "symbol"),
    Topic("user.events", "user_event", "symbol", retention_ms=30 * DAY_MS),
    Topic("features", "features", "symbol"),
    # internal: BTCUSDT's per-bar snapshot, written to every partition (see streams.features.agent)
    Topic("features.btc", "btc_snapshot", "BTCUSDT", retention_ms=DAY_MS, archived=False),
    Topic("predictions", "prediction", "symbol"),
    Topic("signals", "signal", "symbol", retention_ms=30 * DAY_MS),
    Topic("risk.verdicts", "risk_verdict", "symbol", retention_ms=30 * DAY_MS),
    Topic("orders", "order", "symbol", retention_ms=30 * DAY_MS),
    Topic("risk.events", "risk_event", "symbol", retention_ms=30 * DAY_MS),
    # the execution connector's persisted lifecycles: the newest record per intent is its state
    Topic("execution.intents", "execution_intent", "intent id", partitions=1, retention_ms=-1, compacted=True,
          order_by=("intent_id", "event_id")),
    # the risk agent's book, saved at most every second it changes: its durable copy is the archive's
    Topic("risk.book", "risk_book", "account", partitions=1, retention_ms=-1, compacted=True,
          order_by=("account", "event_id")),
    Topic("control", "control", "entity id", partitions=1, retention_ms=-1, compacted=True,
          order_by=("entity", "event_id")),
    Topic("deadletter", "dead_letter", "source topic", partitions=1, retention_ms=30 * DAY_MS,
          order_by=("source_topic", "event_id")),
)

BY_NAME: dict[str, Topic] = {t.name: t for t in TOPICS}


def topic(name: str) -> Topic:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; the catalog has: {', '.join(BY_NAME)}") from None


def archived() -> list[Topic]:
    return [t for t in TOPICS if t.archived]
