"""The ClickHouse store, reached through clickhouse-connect: a server over HTTP, or chDB
in-process (`chdb:///abs/path`) on the embedded default.

chDB allows one process per data path, so the embedded store has an owner: the process that
holds `$PERPFLOW_HOME/run/store.lock`. Other commands go through the owner's API (see
`streams.stack`) or are told exactly who holds the store — they never open it a second time.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect
import pyarrow as pa

from schemas.catalog import Topic
from schemas.tables import columns, create_table_sql, select_fields, table_columns, table_name
from streams.errors import PerpflowError
from streams.settings import Settings

log = logging.getLogger(__name__)

QUERY_FORMATS = {"table": "PrettyCompactMonoBlock", "tsv": "TabSeparated", "csv": "CSVWithNames"}
BACKGROUND_NICE = 10


def below_the_chain() -> None:
    """Lower the calling thread's CPU priority (Linux nice, set per thread; the threads chDB starts for its work
    inherit it) for the store's background work: the sink's inserts, the live calibration's queries. On the
    embedded default they share two cores with the broker and the worker, and a sink flush (an insert per topic)
    that fell on a bar's way down the chain stretched that bar's kline → verdict latency up to 174 ms against 62
    at this priority (chain benchmark, live pacing). The archive can wait; the decision chain cannot. Elsewhere (not
    Linux, or not allowed) the work runs at the normal priority."""
    if not sys.platform.startswith("linux"):  # only Linux takes a thread id where setpriority expects a pid
        return
    me = threading.get_native_id()
    try:  # never above the priority it had (a niced `perpflow up` stays niced)
        os.setpriority(os.PRIO_PROCESS, me, max(os.getpriority(os.PRIO_PROCESS, me), BACKGROUND_NICE))
    except OSError as exc:
        log.info("store work keeps the normal CPU priority: %s", exc)


class StoreBusy(PerpflowError):
    def __init__(self, path: Path, holder: str):
        super().__init__(
            f"the embedded ClickHouse store {path} is held by {holder}; chDB allows one process per store. "
            "Run this command while `perpflow up` serves it, or after it exits."
        )
        self.holder = holder


class Store:
    """A clickhouse-connect client plus a lock: chDB's client is used from several threads."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._lock_file = None
        if settings.embedded_store:
            self._claim_embedded(settings)
        try:
            self.client = clickhouse_connect.get_client(dsn=settings.clickhouse_dsn)
        except Exception as exc:
            self.release()
            # the driver's message may quote the DSN: never the password, nor a chained traceback holding it
            detail = str(exc).replace(settings.clickhouse_dsn, settings.clickhouse_where)
            password = urlsplit(settings.clickhouse_dsn).password
            if password:
                detail = detail.replace(password, "***")
            raise PerpflowError(f"cannot open ClickHouse at {settings.clickhouse_where}: {detail}") from None

    def _claim_embedded(self, settings: Settings) -> None:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        path = settings.run_dir / "store.lock"
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise StoreBusy(settings.home_dir / "clickhouse", holder) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_file = fh

    def ensure_tables(self, topics: list[Topic], backtest: bool = False) -> None:
        """Create missing tables (with `backtest`: the topics' `bt_` tables). A table from an older version gets the
        columns its schema gained since (Avro fields added with a default: old rows read the type's default). A
        table whose columns differ otherwise is recreated while empty (e.g. a placeholder) and refused with a clear
        message once it holds rows."""
        with self._lock:
            for t in topics:
                name = table_name(t, backtest)
                have = [r[0] for r in self.client.query(
                    "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = "
                    f"'{name}' ORDER BY position").result_rows]
                want = table_columns(t, backtest)
                if have and have != want and [c for c in want if c in have] == have:
                    types = {c.name: c.ch_type for c in columns(t)}
                    for at, column in enumerate(want):
                        if at and column not in have and column in types:
                            log.info("adding the column %s to the table %s", column, name)
                            self.client.command(f"ALTER TABLE `{name}` ADD COLUMN IF NOT EXISTS `{column}` "
                                                f"{types[column]} AFTER `{want[at - 1]}`")
                            have.insert(at, column)
                if have and have != want:
                    rows = self.client.query(f"SELECT count() FROM `{name}`").result_rows[0][0]
                    if rows:
                        raise PerpflowError(
                            f"the `{name}` table has another layout than schemas/avro/{t.schema}.avsc "
                            f"({len(have)} columns, {rows:,} rows); drop or rename it, then start again")
                    log.info("recreating the empty table %s with the current layout", name)
                    self.client.command(f"DROP TABLE `{name}`")
                self.client.command(create_table_sql(t, backtest))

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        with self._lock:
            self.client.insert_arrow(table, data)

    def query_rows(self, sql: str) -> list[tuple]:
        """perpflow's own queries (trusted SQL)."""
        with self._lock:
            return self.client.query(sql).result_rows

    def query_arrow(self, sql: str) -> pa.Table:
        """perpflow's own bulk reads (trusted SQL), columnar: labeling and training read millions of values."""
        with self._lock:
            return self.client.query_arrow(sql)

    def command(self, sql: str) -> None:
        with self._lock:
            self.client.command(sql)

    def newest_per_key(self, topic: Topic, where: str | None = None) -> list[dict]:
        """A compacted topic's state as archived: per key (the first field of its sort key) the record with the latest
        event time (the later archived of equal ones) among those `where` (an SQL condition) allows, read back as the
        topic's records, oldest first."""
        key = topic.order_by[0]
        cols = columns(topic)
        condition = f" WHERE {where}" if where else ""
        rows = self.query_rows(f"SELECT {select_fields(topic)} FROM `{topic.table}` FINAL{condition} ORDER BY `{key}`, "
                               f"event_time DESC, archived_at DESC, kafka_offset DESC LIMIT 1 BY `{key}`")
        records = []
        for row in rows:
            record = dict(zip([c.name for c in cols], row, strict=True))
            for c in cols:
                if c.nested and record[c.name] is not None:  # archived as JSON text
                    record[c.name] = json.loads(record[c.name])
            records.append(record)
        return sorted(records, key=lambda r: r["event_time"])

    def newest_bars(self, source_prefix: str) -> dict[tuple[str, str], int]:
        """The open time of the newest archived bar per (symbol, interval) whose source starts with `source_prefix`
        (e.g. `binance`: a replay's bars of the past are not where a live feed resumes)."""
        rows = self.query_rows("SELECT symbol, `interval`, max(toUnixTimestamp64Milli(open_time)) FROM md_klines "
                               f"WHERE startsWith(source, '{source_prefix}') GROUP BY symbol, `interval`")
        return {(symbol, interval): int(t) for symbol, interval, t in rows}

    def query_text(self, sql: str, fmt: str = "table") -> str:
        """Run a user's query read-only and let ClickHouse render it (table, tsv or csv).

        Read-only is a query-level `SETTINGS readonly = 1` clause, not a client setting: chDB keeps
        settings in its one session, so `readonly` set there would also stop the sink's inserts."""
        if fmt not in QUERY_FORMATS:
            raise PerpflowError(f"unknown format {fmt!r}; choose one of {', '.join(QUERY_FORMATS)}")
        body = sql.strip().rstrip(";").rstrip()
        # the newline keeps a trailing `-- comment` from swallowing the clause; the second form
        # extends a SETTINGS clause the query already has. Any other shape fails to parse: refused.
        first_error = None
        for guarded in (f"{body}\nSETTINGS readonly = 1", f"{body}\n, readonly = 1"):
            try:
                with self._lock:
                    return self.client.raw_query(guarded, fmt=QUERY_FORMATS[fmt]).decode()
            except Exception as exc:
                first_error = first_error or exc
        msg = str(first_error).strip().splitlines()[0] if str(first_error).strip() else type(first_error).__name__
        if "READONLY" in msg or "readonly" in msg:
            msg = "perpflow sql is read-only: " + msg
        raise PerpflowError(msg)

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.release()
