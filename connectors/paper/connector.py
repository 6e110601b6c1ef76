"""The paper exchange's Kafka side: `orders`, `md.klines` (one interval) and `md.funding` in, `user.events` out.

At-least-once, like the sink: a batch is processed, its events produced and flushed, the engine's state
saved, and only then the offsets committed. A restart loads the saved state and resumes from the committed
offsets; input read again after a crash between the save and the commit is recognised by the engine (intent
ids seen, bars and settlements at or before the last processed bar) and changes nothing. The saved state
belongs to one broker: without committed offsets for the group (a fresh embedded broker) it is discarded.

Within a batch, intents and settlements are taken before bars, and bars in open-time order, so an intent
that arrived with the bars after it still fills at the next of them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from connectors.binance.publish import Publisher
from connectors.paper.engine import PaperConfig, PaperExchange
from schemas.codec import DecodeError, default_codec
from streams.broker import client_config, committed_offsets, consumer_config

log = logging.getLogger(__name__)

GROUP = "perpflow-paper"
INPUTS = ("orders", "md.klines", "md.funding")
HOLD_S = 1.0
_FIRST = {"orders": 0, "md.funding": 1, "md.klines": 2}


def _order_key(item: tuple[str, dict]) -> tuple:
    topic, rec = item
    return (_FIRST[topic], rec["open_time"] if topic == "md.klines" else 0, rec["symbol"])


class PaperConnector:
    def __init__(self, bootstrap: str, state_path: Path, config: PaperConfig | None = None, prefix: str = "",
                 interval: str = "5m", group: str = GROUP):
        self.bootstrap, self.state_path, self.prefix, self.group = bootstrap, state_path, prefix, group
        self.interval = interval
        self.config = config or PaperConfig()
        self.codec = default_codec()
        self.publisher = Publisher(bootstrap, prefix, self.codec)
        self.stop_event = threading.Event()
        self.exchange = self._restore()
        self.events = 0

    def _restore(self) -> PaperExchange:
        if self.state_path.exists():
            if committed_offsets(AdminClient(client_config(self.bootstrap)), self.group):
                log.info("paper exchange: state restored from %s", self.state_path)
                return PaperExchange.loads(self.state_path.read_text(), self.config)
            log.warning("paper exchange: %s belongs to another broker (no committed offsets): starting flat",
                        self.state_path)
        return PaperExchange(self.config)

    def run(self) -> None:
        consumer = Consumer(consumer_config(self.bootstrap, self.group))
        consumer.subscribe([self.prefix + t for t in INPUTS])
        held: list = []
        since = 0.0
        try:
            while not self.stop_event.is_set():
                fresh = [m for m in consumer.consume(1000, 0.2) if m.error() is None]
                if fresh and not held:
                    since = time.monotonic()
                held += fresh
                # bars wait until the intents and settlements fetched so far are in (bounded: a silent or slow
                # partition must not stall the bars)
                if held and (self._side_inputs_read(consumer) or time.monotonic() - since > HOLD_S):
                    self.handle(held)
                    consumer.commit(asynchronous=False)
                    held = []
        finally:
            consumer.close()
            self.publisher.flush()

    def _side_inputs_read(self, consumer: Consumer) -> bool:
        """True when every partition of `orders` and `md.funding` is read up to the high watermark of its last
        fetch (the fetch's watermark: Tansu's ListOffsets is wrong, see DESIGN.md)."""
        side = {self.prefix + "orders", self.prefix + "md.funding"}
        parts = [tp for tp in consumer.assignment() if tp.topic in side]
        for tp in consumer.position(parts):
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0 or (high > 0 and tp.offset < high):
                return False
        return True

    def stop(self) -> None:
        self.stop_event.set()

    def handle(self, messages: list) -> None:
        items = []
        for m in messages:
            topic = m.topic()[len(self.prefix):]
            try:
                _, rec = self.codec.decode(m.value())
            except DecodeError as exc:  # the sink dead-letters undecodable input already
                log.warning("paper exchange: %s offset %d undecodable (%s)", m.topic(), m.offset(), exc.reason)
                continue
            if topic != "md.klines" or rec["interval"] == self.interval:
                items.append((topic, rec))
        ex = self.exchange
        handlers = {"orders": ex.order, "md.funding": ex.funding, "md.klines": ex.bar}
        for topic, rec in sorted(items, key=_order_key):
            for event in handlers[topic](rec):
                self.publisher.publish("user.events", event)
                self.events += 1
        if self.publisher.flush() > 0:
            raise RuntimeError("paper exchange: user.events not delivered; offsets not committed")
        self._save()

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(self.exchange.dumps())
        os.replace(tmp, self.state_path)  # atomic: a crash leaves the old state or the new one
