"""`perpflow up` on the embedded default (Tansu in memory: the broker forgets every topic when it stops) restarted on
the same home keeps its trading state and its book: the archive on disk is the durable copy, and `up` puts the
compacted topics' state back on the new broker before the worker starts (streams.stack.seed_compacted)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from connectors.binance.execution import client_ids
from connectors.binance.publish import Publisher
from schemas import event_ids, records
from schemas.catalog import TOPICS
from schemas.codec import default_codec
from tests.conftest import PERPFLOW, ROOT, cli_env, read_topic, run_cli

T0 = 1_704_067_200_000  # 2024-01-01 00:00 UTC
BAR = 300_000
# the worker runs the risk agent only: the test plays the chain, its signals are the ones the risk agent decides
ENV = {"PERPFLOW_AGENTS": "risk", "PERPFLOW_SYMBOLS": "BTCUSDT"}


def test_every_compacted_topic_is_keyed_by_the_first_field_of_its_archive_sort_key():
    """The seeding reads the newest archived row per key: the key must be a field the archive keeps, first in its
    sort key (the message key is not archived)."""
    compacted = [t for t in TOPICS if t.compacted]
    assert {"control", "risk.book"} <= {t.name for t in compacted}
    for t in compacted:
        fields = {f["name"]: f["type"] for f in default_codec().schema(t.schema)["fields"]}
        assert fields.get(t.order_by[0]) == "string", t.name
        assert t.archived and t.order_by[-1] == "event_id", t.name


def test_the_book_copy_publishes_a_change_at_most_every_second_and_the_last_of_a_burst():
    from streams.risk.book_copy import BookCopy
    from streams.risk.guard import Book

    copy, book = BookCopy(every=1.0), Book()
    first = copy.offer(1, '"book": 1', book, now=10.0)
    assert first["seq"] == 1 and first["state"] == '{"seq": 1, "book": 1}' and first["account"] == "account"
    assert copy.offer(2, '"book": 1', book, now=10.1) is None  # unchanged
    assert copy.offer(3, '"book": 2', book, now=10.2) is None  # too soon: pending
    assert copy.offer(4, '"book": 3', book, now=10.3) is None
    assert copy.due(10.9) is None
    late = copy.due(11.0)
    assert late["seq"] == 4 and late["state"] == '{"seq": 4, "book": 3}'  # the last change of the burst
    assert copy.due(12.5) is None and copy.offer(5, '"book": 3', book, now=12.5) is None


def test_the_archive_gives_the_newest_record_per_key(store):
    """Per key the latest event time wins, whatever the insert order; a key's older records are not seeded."""
    from schemas.catalog import topic
    from schemas.tables import arrow_table, columns

    t = topic("control")
    fields = [c.name for c in columns(t)]

    def row(entity: str, at: int, value: str) -> tuple:
        rec = {"event_id": event_ids.control(entity, at), "event_time": at, "entity": entity, "kind": "k",
               "value": value, "actor": "test"}
        return tuple(rec.get(f, "") for f in fields)

    rows = [row("trading", 3_000, "new"), row("trading", 1_000, "old"), row("model:long", 2_000, "m")]
    store.insert_arrow(t.table, arrow_table(t, rows, [0] * 3, [0, 1, 2]))
    newest = store.newest_per_key(t)
    assert [(r["entity"], r["event_time"], r["value"]) for r in newest] == [("model:long", 2_000, "m"),
                                                                           ("trading", 3_000, "new")]
    default_codec().encode(t.schema, newest[0])  # read back as the topic's records


def test_seeding_puts_each_intents_newest_lifecycle_step_back_on_its_topic(broker, store):
    """The execution connector resumes its open intents from `execution.intents`: after a restart of the embedded
    broker the seeding puts there the newest archived step of every intent, event ids and all."""
    from schemas.catalog import topic
    from schemas.tables import arrow_table, columns
    from streams.broker import ensure_topics
    from streams.stack import seed_compacted

    ensure_topics(broker.bootstrap)
    t = topic("execution.intents")
    fields = [c.name for c in columns(t)]
    intent = event_ids.open_intent("BTCUSDT", "5m", T0)

    def step(seq: int, state: str) -> dict:
        return {"event_id": f"execution:{intent}:{seq}", "event_time": T0 + seq, "symbol": "BTCUSDT",
                "intent_id": intent, "seq": seq, "state": state, "previous_state": "", "action": "OPEN",
                "side": "BUY", "quantity": 0.1, "stop_loss": 41_000.0, "take_profit": 43_000.0, "leverage": 5,
                "intent_time": T0, "filled_qty": "0.1", "protect_tries": 1, "close_tries": 0, "reason": ""}

    steps = [step(1, "ENTRY_SENT"), step(3, "PROTECTED"), step(2, "FILLED")]
    store.insert_arrow(t.table, arrow_table(t, [tuple(r[f] for f in fields) for r in steps], [0] * 3, [0, 1, 2]))
    seeded = seed_compacted(broker.bootstrap, store)
    assert seeded["execution.intents"] == 1 and seeded["control"] == 0
    assert read_topic(broker.bootstrap, "execution.intents") == [steps[1]]


def test_a_live_feed_resumes_after_the_newest_archived_binance_bar(store):
    """What `perpflow up --source binance` hands the market connector: a replay's bars are not where it resumes."""
    from schemas.catalog import topic
    from schemas.tables import arrow_table, columns

    t = topic("md.klines")
    fields = [c.name for c in columns(t)]
    bars = [kline(n, 42_000.0) | {"source": source} for n, source in
            ((0, "binance-rest"), (1, "binance-ws"), (5, "replay"))]
    bars.append(records.kline("BTCUSDT", "1h", T0, T0 + 3_600_000 - 1, 1, 1, 1, 1, 1, None, None, None, None,
                              "binance-rest"))
    store.insert_arrow(t.table, arrow_table(t, [tuple(b[f] for f in fields) for b in bars], [0] * 4, [0, 1, 2, 3]))
    assert store.newest_bars("binance") == {("BTCUSDT", "5m"): T0 + BAR, ("BTCUSDT", "1h"): T0}


def test_a_replay_of_history_the_book_has_seen_continues_the_book_as_it_stood_before_it(store):
    """A replay that starts where the archived book has been continues the newest snapshot from before its start —
    after a run over the same window was killed, the book the killed run continued, not the killed run's own (which
    the replayed bars would contradict), nor a fresh one."""
    from schemas.catalog import topic
    from schemas.tables import arrow_table, columns
    from streams.up import book_a_replay_allows

    t = topic("risk.book")
    fields = [c.name for c in columns(t)]

    def snapshot(seq: int, newest_bar: int) -> dict:
        return {"event_id": event_ids.risk_book("account", seq, 1_000 + seq), "event_time": 1_000 + seq,
                "account": "account", "seq": seq, "trading_state": "RUNNING", "wallet_balance": 1_000.0 + seq,
                "open_positions": 0, "newest_bar": newest_bar, "state": f'{{"seq": {seq}}}'}

    before, during = snapshot(1, T0 + BAR - 1), snapshot(2, T0 + 5 * BAR - 1)  # bar 0 seen; then bar 4
    store.insert_arrow(t.table, arrow_table(t, [tuple(r[f] for f in fields) for r in (before, during)], [0] * 2,
                                            [0, 1]))
    assert book_a_replay_allows(T0 + 5 * BAR)(t, store) == [during]  # starts after the newest: continued
    assert book_a_replay_allows(T0 + 2 * BAR)(t, store) == [before]  # bars 2.. again: the book from before them
    assert book_a_replay_allows(T0)(t, store) == []  # bar 0 again: every book would contradict it
    assert book_a_replay_allows(None)(t, store) == []  # from the files' first bar
    assert book_a_replay_allows(T0)(topic("control"), store) == store.newest_per_key(topic("control"))


def kline(n: int, price: float) -> dict:
    t = T0 + n * BAR
    return records.kline("BTCUSDT", "5m", t, t + BAR - 1, price, price * 1.001, price * 0.999, price, 1.0, None, None,
                         None, None, "test")


def signal_of(n: int, decision: str, close: float) -> dict:
    open_time = T0 + n * BAR
    s = {"event_id": event_ids.signal("BTCUSDT", "5m", open_time), "event_time": open_time + BAR, "symbol": "BTCUSDT",
         "source": "replay", "interval": "5m", "open_time": open_time, "prediction_id": "", "model_id_long": "m-l",
         "model_id_short": "m-s", "decision": decision, "side": None, "ev_long": 0.001, "ev_short": -0.001,
         "p_win_long": 0.6, "p_win_short": 0.4, "confidence": 0.6, "entry_price": None, "stop_loss": None,
         "take_profit": None, "quantity": None, "notional": None, "leverage": None, "liq_price": None,
         "liq_distance_atr": None, "close": close, "atr_14": close * 0.003, "funding_rate": 0.0001,
         "flat_reason": "thresholds" if decision == "FLAT" else "", "reasons": []}
    if decision == "LONG":
        s.update(side="BUY", entry_price=close, stop_loss=round(close * 0.994, 1), take_profit=round(close * 1.012, 1),
                 quantity=0.1, notional=0.1 * close, leverage=5, liq_price=close * 0.8, liq_distance_atr=60.0)
    return s


def publish(bootstrap: str, items: list[tuple[str, dict]]) -> None:
    pub = Publisher(bootstrap)
    for topic, rec in items:
        pub.publish(topic, rec)
    assert pub.flush() == 0


def wait(what: str, check, up: subprocess.Popen, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while True:
        assert up.poll() is None, f"perpflow up exited while waiting for {what}: {up.stderr.read()}"
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


class Up:
    """`perpflow up --source none` on `home`: its bootstrap and its worker's control API."""

    def __init__(self, home: Path):
        self.home = home
        self.process = subprocess.Popen([PERPFLOW, "up", "--source", "none"], env=cli_env(home, **ENV), cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        run = home / "run"
        self.bootstrap = wait("the stack", lambda: (run / "stack.json").exists() and json.loads(
            (run / "stack.json").read_text())["bootstrap"], self.process)
        self.api = wait("the worker's control API", self._worker_api, self.process)

    def _worker_api(self) -> str | None:
        for path in (self.home / "run").glob("worker-*.json"):
            try:
                info = json.loads(path.read_text())
                with urllib.request.urlopen(info["api_url"] + "/status", timeout=5):
                    return info["api_url"]
            except (OSError, ValueError, KeyError):
                continue
        return None

    def status(self) -> dict:
        with urllib.request.urlopen(self.api + "/status", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def archived_book(home: Path) -> list[str]:
    query = ("SELECT trading_state, open_positions FROM risk_book FINAL ORDER BY event_time DESC, seq DESC LIMIT 1")
    result = run_cli(home, "sql", query, "--format", "tsv")
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n").split("\t")


@pytest.mark.e2e
def test_up_restarted_is_still_halted_with_its_position_balance_and_pending_close(tmp_path: Path):
    home = tmp_path / "home"
    up = Up(home)
    try:
        # an entry on bar 0 fills at the open of bar 1 (the paper exchange's own path), protected by SL and TP
        publish(up.bootstrap, [("md.klines", kline(0, 42_000.0)), ("signals", signal_of(0, "LONG", 42_000.0)),
                               ("md.klines", kline(1, 42_010.0)), ("signals", signal_of(1, "FLAT", 42_010.0))])
        wait("the open position", lambda: up.status()["positions"].get("BTCUSDT", {}).get("status") == "open",
             up.process)
        killed = run_cli(home, "trading", "kill", "--reason", "test", **ENV)
        assert killed.returncode == 0, killed.stderr
        # no bar after the kill: its CLOSE waits on the paper exchange, the position stays open, closing
        before = wait("HALTED", lambda: (s := up.status())["trading_state"] == "HALTED"
                      and s["positions"]["BTCUSDT"]["closing"] and s, up.process)
        assert before["positions"]["BTCUSDT"]["quantity"] == 0.1 and before["wallet_balance"] is not None
        intents = [o["intent_id"] for o in read_topic(up.bootstrap, "orders")]
        assert len(intents) == 2  # the entry and the kill's close
        # stopped at once: the book's last copy and the HALT reach the archive on the way out
        assert up.stop() in (0, 130)  # 130: stopped by a signal, as Ctrl-C
    finally:
        up.stop()
    assert archived_book(home) == ["HALTED", "1"]  # the store is free again: read directly

    up = Up(home)  # a new embedded broker: every topic starts empty
    try:
        # the worker restores its book once it owns its partitions; until then it shows a fresh one
        after = wait("the book restored", lambda: (s := up.status())["trading_state"] == "HALTED" and s, up.process)
        assert after["positions"] == before["positions"]
        assert after["wallet_balance"] == before["wallet_balance"]
        assert "test" in after["reason"]
        seeded = {r["entity"] for r in read_topic(up.bootstrap, "control")}
        assert "trading" in seeded
        # the restored paper exchange still holds the kill's close: the next bar fills it; an entry stays refused
        publish(up.bootstrap, [("md.klines", kline(2, 42_020.0)), ("signals", signal_of(2, "LONG", 42_020.0))])
        close_id = client_ids(intents[1])["close"]
        wait("the close filled", lambda: any(e["client_order_id"] == close_id and e["order_status"] == "FILLED"
                                             for e in read_topic(up.bootstrap, "user.events")), up.process)
        wait("flat", lambda: not up.status()["positions"], up.process)
        [verdict] = [v for v in read_topic(up.bootstrap, "risk.verdicts")
                     if v["signal_id"] == signal_of(2, "LONG", 0)["event_id"]]
        assert verdict["verdict"] == "REJECTED" and "halted" in verdict["violations"]
        assert up.status()["trading_state"] == "HALTED"
        assert up.stop() in (0, 130)  # 130: stopped by a signal, as Ctrl-C
    finally:
        up.stop()


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_restarted_binance_feed_backfills_from_the_newest_archived_bar(tmp_path: Path):
    """The second `up` starts with an empty md.klines (a new embedded broker) and a longer backfill window: it
    resumes after the archive's newest bar instead of backfilling that window again."""
    from tests.fake_binance import FakeBinance

    now = 1_704_240_000_000  # 2024-01-03 00:00 UTC on the fake exchange's clock
    home = tmp_path / "home"
    fake = FakeBinance(["BTCUSDT"], now).start()

    def sql(query: str) -> str:
        result = run_cli(home, "sql", query, "--format", "tsv", timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def up_binance(backfill_hours: str) -> subprocess.Popen:
        env = cli_env(home, PERPFLOW_BINANCE_REST_URL=fake.rest_url, PERPFLOW_BINANCE_WS_URL=fake.ws_url,
                      PERPFLOW_BINANCE_INTERVALS="5m", PERPFLOW_RUN_WORKER="false",
                      PERPFLOW_BINANCE_BACKFILL_HOURS=backfill_hours)
        return subprocess.Popen([PERPFLOW, "up", "--source", "binance", "--symbols", "BTCUSDT"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(up: subprocess.Popen) -> None:
        up.terminate()
        up.communicate(timeout=60)
        assert up.returncode in (0, 130)

    try:
        up = up_binance("2")
        try:
            # 22:05 … 23:55: the 2 h window's bars (its start, a little past 22:00 on the exchange's clock, is not one)
            wait("2 h of bars archived", lambda: (home / "run" / "stack.json").exists()
                 and sql("SELECT count() FROM md_klines FINAL") == "23", up)
        finally:
            stop(up)
        up = up_binance("4")
        try:
            stack = home / "run" / "stack.json"
            bootstrap = wait("the stack", lambda: stack.exists() and json.loads(stack.read_text())["bootstrap"], up)
            wait("the market stream", lambda: fake._market_ws, up)
            time.sleep(3)  # what the backfill published, archived
            assert sql("SELECT count(), toUnixTimestamp64Milli(min(open_time)) FROM md_klines FINAL") == \
                f"23\t{now - 23 * BAR}"  # nothing of 20:00 … 22:00 backfilled
            assert all(k["open_time"] >= now for k in read_topic(bootstrap, "md.klines"))
        finally:
            stop(up)
    finally:
        fake.stop()
