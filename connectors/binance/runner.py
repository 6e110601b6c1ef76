"""Wires the Binance connectors for `perpflow up --source binance [--live]`, `perpflow connector` and
`perpflow backfill`.

One RestClient is shared by every connector of a process: Binance counts request weight per IP, so one
budget is the honest one. The market connector resumes after the newest bar already in md.klines, or in the archive
(`perpflow up` passes it: its embedded broker starts empty after a restart).
With `live`, the user data stream and the execution connector run too; orders wait while the user
stream is down (dropped, or silent past PERPFLOW_BINANCE_USER_STALE_SECONDS), and every (re)connect
reconciles with the exchange — and, for the publishing user connector, fetches the fills it missed —
before trading resumes.
"""

from __future__ import annotations

import asyncio
import logging

from connectors.binance.execution import ExecutionConfig, Executor, OrderConsumer
from connectors.binance.market import MarketConnector, MarketState
from connectors.binance.publish import Publisher
from connectors.binance.rest import RestClient
from connectors.binance.user_stream import UserStream
from schemas.codec import DecodeError, default_codec
from schemas.records import INTERVAL_MS
from streams.broker import read_messages
from streams.console import ProgressLine
from streams.settings import Settings

log = logging.getLogger(__name__)

TAIL = 5000  # messages read back per md.klines partition to find where to resume


def rest_client(settings: Settings) -> RestClient:
    return RestClient(settings.binance_rest_base, settings.binance_api_key.get_secret_value(),
                      settings.binance_api_secret.get_secret_value(), settings.binance_recv_window_ms)


def last_published_bars(bootstrap: str, prefix: str = "") -> dict[tuple[str, str], int]:
    """The newest open time per (symbol, interval) in the tail of md.klines."""
    last: dict[tuple[str, str], int] = {}
    codec = default_codec()
    try:
        for m in read_messages(bootstrap, prefix + "md.klines", tail=TAIL, timeout=30):
            try:
                _, r = codec.decode(m.value())
            except DecodeError:
                continue
            key = (r["symbol"], r["interval"])
            last[key] = max(last.get(key, r["open_time"]), r["open_time"])
    except TimeoutError as exc:  # what was read is still the best start: the gap fill fetches the rest
        log.warning("md.klines tail not read to its end: %s", exc)
    return last


PARTS = ("market", "user", "execution")


class BinanceSource:
    """The live Binance connectors in one asyncio loop: `parts` of market, user, execution.

    `perpflow up --source binance` runs market (and with --live all three) in a thread; `perpflow connector
    market|user|execution` runs one part as its own process. Run together, one user data stream publishes
    user.events and feeds the executor. The execution part alone watches the account through a user data stream of
    its own (same listenKey, nothing published: user.events is the user connector's), because trading must stop
    the moment the account is unobserved and a fired stop-loss must cancel its take-profit at once, without
    depending on another process or on a Kafka hop; every (re)connect of that stream reconciles first.
    """

    def __init__(self, settings: Settings, bootstrap: str, symbols: list[str], live: bool,
                 start_ms: int | None = None, parts: tuple[str, ...] | None = None,
                 archived_bars: dict[tuple[str, str], int] | None = None):
        self.settings, self.bootstrap, self.symbols, self.live = settings, bootstrap, symbols, live
        self.start_ms = start_ms
        # the newest archived bar per (symbol, interval), from the process that owns the store: after a restart of the
        # embedded broker md.klines is empty, and the market connector backfills from there instead
        self.archived_bars = archived_bars or {}
        self.parts = parts if parts is not None else (PARTS if live else ("market",))
        if not set(self.parts) <= set(PARTS):
            raise ValueError(f"unknown Binance connector parts {self.parts}; known: {PARTS}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.market: MarketConnector | None = None
        self.user: UserStream | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)

    async def _main(self) -> None:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        s = self.settings
        publisher = Publisher(self.bootstrap)
        async with rest_client(s) as rest:
            await rest.sync_time()  # "now" is the exchange's clock
            jobs = []
            if "market" in self.parts:
                last = await asyncio.to_thread(last_published_bars, self.bootstrap)
                for key, open_time in self.archived_bars.items():
                    last[key] = max(last.get(key, open_time), open_time)
                state = MarketState(last_open=last)
                start = self.start_ms or int(rest.server_now_ms() - s.binance_backfill_hours * 3_600_000)
                self.market = MarketConnector(rest, s.binance_ws_base, publisher, self.symbols, s.binance_intervals,
                                              start, s.binance_stale_seconds, s.binance_max_connection_seconds,
                                              s.binance_open_interest_seconds, state)
                jobs.append(self.market.run())
            executor = None
            if "execution" in self.parts:
                executor = Executor(rest, publisher, self.symbols, s.binance_leverage, ExecutionConfig(
                    max_intent_age_s=s.execution_max_intent_age_seconds,
                    reconcile_interval_s=s.execution_reconcile_seconds), bootstrap=self.bootstrap)
                await executor.start()  # with the lifecycles persisted on execution.intents: open ones resume
            if "user" in self.parts or executor is not None:
                publishing = "user" in self.parts
                self.user = UserStream(rest, s.binance_ws_base, publisher, s.binance_listen_key_keepalive_seconds,
                                       stale_s=s.binance_user_stale_seconds,
                                       max_connection_s=s.binance_max_connection_seconds,
                                       on_event=executor.on_user_event if executor else None,
                                       on_reconnected=executor.reconcile if executor else None,
                                       publish=publishing, name="binance-user" if publishing else "binance-execution",
                                       symbols=self.symbols)
                jobs.append(self.user.run())
            if executor is not None:
                jobs.append(OrderConsumer(self.bootstrap, executor, ready=self.user.healthy).run())
                jobs.append(executor.maintain())  # lifecycles waiting on the exchange, periodic reconcile
            try:
                await asyncio.gather(*jobs)
            finally:
                await asyncio.to_thread(publisher.flush)


async def backfill(settings: Settings, bootstrap: str, symbols: list[str], start_ms: int, end_ms: int) -> dict:
    """History [start, end) → the md.* topics through the market connector's own backfill code."""
    publisher = Publisher(bootstrap)
    total = sum((end_ms - start_ms) // INTERVAL_MS[i] for i in settings.binance_intervals) * len(symbols)
    progress = ProgressLine("backfill", total=total, unit="bars")
    done = 0

    def on_progress(_: str, n: int) -> None:
        nonlocal done
        done += n
        progress.update(done)

    async with rest_client(settings) as rest:
        await rest.sync_time()
        market = MarketConnector(rest, settings.binance_ws_base, publisher, symbols, settings.binance_intervals,
                                 start_ms, on_progress=on_progress)
        await market.backfill(end_ms)
    remaining = await asyncio.to_thread(publisher.flush, 60)
    if remaining:
        raise RuntimeError(f"{remaining} backfilled messages were not delivered to the broker")
    progress.done(done)
    return dict(publisher.published)
