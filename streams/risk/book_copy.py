"""The risk agent's book beyond the broker: its snapshots on the compacted, archived `risk.book` topic.

The `risk-state` table (a Faust changelog topic) is the book's copy on the broker. The embedded broker keeps nothing
once `perpflow up` stops, and only catalog topics reach the archive, so the agent also publishes its snapshot on
`risk.book` — when it changed, and at most every PUBLISH_SECONDS (a fast replay saves many times a second; the
timer sends the last change of a burst) — the sink archives it, `perpflow up` puts the newest back on the topic at
start (`streams.stack.seed_compacted`), and an agent whose table is empty at start takes it from there.
"""

from __future__ import annotations

import json
import logging
import time

from schemas import event_ids
from schemas.codec import DecodeError, default_codec
from streams.broker import read_messages
from streams.risk.guard import Book

log = logging.getLogger(__name__)

TOPIC = "risk.book"
ACCOUNT = "account"  # one book per worker; the embedded default runs one worker
PUBLISH_SECONDS = 1.0
READ_SECONDS = 30.0


class BookCopy:
    """Which saves become `risk.book` records: a changed book, at most every `every` seconds."""

    def __init__(self, every: float = PUBLISH_SECONDS) -> None:
        self.every = every
        self.published_body: str | None = None
        self.published_at = float("-inf")
        self.pending: tuple[str, dict] | None = None  # a change not yet published: its body, the record's fields

    def offer(self, seq: int, body: str, book: Book, now: float) -> dict | None:
        """After a save (`body`: the snapshot without its sequence number): the record to publish now, or None
        (unchanged since the last one published; or too soon after it: kept for `due`)."""
        if body == self.published_body:
            self.pending = None
            return None
        wall = int(time.time() * 1000)
        self.pending = (body, {
            "event_id": event_ids.risk_book(ACCOUNT, seq, wall), "event_time": wall, "account": ACCOUNT, "seq": seq,
            "trading_state": book.state, "wallet_balance": book.balance, "open_positions": len(book.positions),
            "newest_bar": max([book.newest_bar, *(m.event_time for m in book.marks.values())])})
        return self.due(now)

    def due(self, now: float) -> dict | None:
        """The pending record once `every` seconds have passed since the last one published."""
        if self.pending is None or now - self.published_at < self.every:
            return None
        (body, record), self.pending = self.pending, None
        self.published_body, self.published_at = body, now
        return {**record, "state": f'{{"seq": {record["seq"]}, {body}}}'}  # made once per record, not per save


def newest_snapshot(bootstrap: str, prefix: str = "", timeout: float = READ_SECONDS) -> dict | None:
    """The newest snapshot on `risk.book` (highest seq), read to the topic's end: the risk-state table's value."""
    name = prefix + TOPIC
    codec, newest = default_codec(), None
    for msg in read_messages(bootstrap, name, timeout=timeout, max_bytes=16 * 1024 * 1024):
        try:
            _, record = codec.decode(msg.value())
        except DecodeError as exc:
            log.warning("unreadable %s record at offset %d: %s", name, msg.offset(), exc)
            continue
        if newest is None or record["seq"] > newest["seq"]:
            newest = record
    if newest is not None:
        log.info("risk: the newest book on %s is %s", name, newest["event_id"])
    return None if newest is None else json.loads(newest["state"])
