"""The execution fault matrix: one entry intent against the fake exchange with one fault sequence each — every fault
kind Binance documents (5xx before the exchange accepts, 408 / -1007 executed or not, accepted then a late answer or a
dropped connection, executed later than its error, 429, algo rejections -2021 / -2022, protective orders cancelled,
rejected or expired later, a stop that triggers) at the calls of the entry, protect and close paths — and, in
`run_killed`, SIGKILL of the connector process at each lifecycle state with the intent replayed after the restart.

After each scenario settles, the invariants a real account needs: at most one entry fill per intent, never a position
without a matching stop-loss and take-profit for longer than `NAKED_BOUND_S`, no orphan order on a flat account, the
connector alive, and the fault fired where it was meant to. `tests/test_execution_faults.py` runs it; `python -m
benchmarks faults` prints the table with the kill points."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from dataclasses import dataclass, field
from decimal import Decimal

from connectors.binance.execution import TERMINAL, ExecutionConfig, Executor, State, client_ids
from connectors.binance.publish import Publisher
from connectors.binance.rest import RestClient
from schemas.catalog import topic
from streams.broker import ensure_topics, producer_config
from tests.fake_binance import API_KEY, API_SECRET, FakeBinance

NOW = 1_704_240_000_000  # 2024-01-03 00:00 UTC: the fake's clock
SYMBOL = "BTCUSDT"
NAKED_BOUND_S = 8.0  # the longest a filled position may stand without its matching protection
SETTLE_S = 30.0
ORDER, ALGO = "/fapi/v1/order", "/fapi/v1/algoOrder"
UNKNOWN_503 = "Unknown error, please check your request or try again later."
FAST = ExecutionConfig(unknown_lookup_s=3.0, unknown_give_up_s=8.0, maintenance_interval_s=0.3,
                       reconcile_interval_s=2.0, close_backoff_max_s=1.0)


@dataclass(frozen=True)
class F:
    """A fault at the nth call of (method, path); the other fields are `tests.fake_binance.server.Fault`'s."""

    method: str
    path: str
    nth: int
    status: int
    code: int = 0
    msg: str = ""
    times: int = 1
    retry_after: float | None = None
    delay_after_accept: float = 0.0
    executed: bool = False
    drop: bool = False
    execute_after: float = 0.0


@dataclass(frozen=True)
class Scenario:
    name: str
    faults: tuple[F, ...] = ()
    then: str = ""  # what the exchange does once the intent rests: "<end|trigger> <leg> [status]" or "replay"
    expect_fill: bool = True  # whether the entry should end up filled (checked: a fault must not lose a good entry)


def _entry(name: str, **kw) -> Scenario:
    return Scenario(name, (F("POST", ORDER, 1, **kw),), expect_fill=kw.get("executed", False)
                    or bool(kw.get("delay_after_accept") or kw.get("drop") or kw.get("execute_after"))
                    or kw.get("status") == 429)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("clean"),
    _entry("entry 503 before accept", status=503, msg="Service Unavailable."),
    _entry("entry 408/-1007 not executed", status=408, code=-1007, msg="Timeout waiting for response"),
    _entry("entry 408/-1007 executed", status=408, code=-1007, msg="Timeout waiting for response", executed=True),
    _entry("entry 503 executed", status=503, msg=UNKNOWN_503, executed=True),
    _entry("entry accepted, late answer", status=200, delay_after_accept=2.5),
    _entry("entry accepted, connection dropped", status=200, drop=True),
    _entry("entry 503, executed 1.5 s later", status=503, msg=UNKNOWN_503, execute_after=1.5),
    _entry("entry 429", status=429, code=-1003, msg="Too many requests.", retry_after=0.5),
    Scenario("entry -2019 margin", (F("POST", ORDER, 1, 400, -2019, "Margin is insufficient."),), expect_fill=False),
    Scenario("entry dropped, lookup 408", (F("POST", ORDER, 1, 200, drop=True),
                                           F("GET", ORDER, 1, 408, -1007, "Timeout waiting for response"))),
    Scenario("entry dropped, lookup 503 x4", (F("POST", ORDER, 1, 200, drop=True),
                                              F("GET", ORDER, 1, 503, 0, "Service Unavailable.", times=4))),
    Scenario("sl 503 before accept", (F("POST", ALGO, 1, 503, 0, "Service Unavailable."),)),
    Scenario("sl 408/-1007 executed", (F("POST", ALGO, 1, 408, -1007, "Timeout", executed=True),)),
    Scenario("sl accepted, connection dropped", (F("POST", ALGO, 1, 200, drop=True),)),
    Scenario("sl accepted, late answer", (F("POST", ALGO, 1, 200, delay_after_accept=2.5),)),
    Scenario("sl 429", (F("POST", ALGO, 1, 429, -1003, "Too many requests.", retry_after=0.5),)),
    Scenario("sl -2021 would trigger", (F("POST", ALGO, 1, 400, -2021, "Order would immediately trigger."),)),
    Scenario("sl -2022 reduce-only rejected", (F("POST", ALGO, 1, 400, -2022, "ReduceOnly Order is rejected."),)),
    Scenario("tp -2021 would trigger", (F("POST", ALGO, 2, 400, -2021, "Order would immediately trigger."),)),
    Scenario("tp 503 x3", (F("POST", ALGO, 2, 503, 0, "Service Unavailable.", times=3),)),
    Scenario("sl -2021, close 408/-1007", (F("POST", ALGO, 1, 400, -2021, "Order would immediately trigger."),
                                           F("POST", ORDER, 2, 408, -1007, "Timeout"))),
    Scenario("sl -2021, close 408/-1007 executed", (F("POST", ALGO, 1, 400, -2021, "Order would immediately trigger."),
                                                    F("POST", ORDER, 2, 408, -1007, "Timeout", executed=True))),
    Scenario("sl -2021, close 503 x4", (F("POST", ALGO, 1, 400, -2021, "Order would immediately trigger."),
                                        F("POST", ORDER, 2, 503, 0, "Service Unavailable.", times=4))),
    Scenario("sl -2021, close dropped", (F("POST", ALGO, 1, 400, -2021, "Order would immediately trigger."),
                                         F("POST", ORDER, 2, 200, drop=True))),
    Scenario("tp -2021, sl cancel 503", (F("POST", ALGO, 2, 400, -2021, "Order would immediately trigger."),
                                         F("DELETE", ALGO, 1, 503, 0, "Service Unavailable."))),
    Scenario("tp -2021, sl cancel 503 x4", (F("POST", ALGO, 2, 400, -2021, "Order would immediately trigger."),
                                            F("DELETE", ALGO, 1, 503, 0, "Service Unavailable.", times=4))),
    Scenario("sl canceled later", then="end sl CANCELED"),
    Scenario("sl rejected later", then="end sl REJECTED"),
    Scenario("tp expired later", then="end tp EXPIRED"),
    Scenario("sl canceled later, replacement -2021",
             (F("POST", ALGO, 3, 400, -2021, "Order would immediately trigger."),), then="end sl CANCELED"),
    Scenario("sl triggers, fills late", then="trigger sl"),
    Scenario("replayed after it rested", then="replay"),
)


@dataclass
class Result:
    name: str
    outcome: str = ""
    state: str = ""
    entry_fills: int = 0
    naked_max_s: float = 0.0
    position: str = "0"
    orphans: list[str] = field(default_factory=list)
    fired: int = 0
    wanted: int = 0
    crashed: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def intent(intent_id: str, price: float, event_time: int) -> dict:
    # barriers far from the price: the fake's mark must not fire them during a scenario
    return {"event_id": f"order:{intent_id}", "event_time": event_time, "symbol": SYMBOL, "intent_id": intent_id,
            "action": "OPEN", "side": "BUY", "quantity": 0.02, "stop_loss": round(price * 0.9, 1),
            "take_profit": round(price * 1.1, 1), "leverage": 3, "source": "fault-matrix"}


def protection_matches(fake: FakeBinance, order: dict) -> bool:
    """A stop-loss and a take-profit stand that close the long at the intent's prices (rounded to the tick)."""
    open_ = fake.open_algo_orders({"symbol": SYMBOL})
    wanted = {("STOP_MARKET", Decimal(str(order["stop_loss"]))),
              ("TAKE_PROFIT_MARKET", Decimal(str(order["take_profit"])))}
    have = {(a["orderType"], Decimal(a["triggerPrice"])) for a in open_ if a["side"] == "SELL" and a["closePosition"]}
    return wanted <= have


def check(fake: FakeBinance, order: dict, r: Result) -> None:
    """The settled account against the invariants; what fails goes to `r.problems`."""
    ids = client_ids(order["intent_id"])
    r.entry_fills = sum(1 for o in fake.exchange_orders(SYMBOL) if o["clientOrderId"] == ids["entry"]
                        and o["status"] == "FILLED")
    amount = fake.account.positions[SYMBOL].amount
    r.position = str(amount)
    standing = [a["clientAlgoId"] for a in fake.open_algo_orders({})] + [o["clientOrderId"]
                                                                          for o in fake.open_orders({})]
    r.orphans = standing if amount == 0 else []
    if r.entry_fills > 1:
        r.problems.append(f"duplicate entry: {r.entry_fills} fills")
    if amount != 0 and not protection_matches(fake, order):
        r.problems.append(f"naked: position {amount} without matching protection")
    if r.naked_max_s > NAKED_BOUND_S:
        r.problems.append(f"naked for {r.naked_max_s:.1f} s (bound {NAKED_BOUND_S} s)")
    if r.orphans:
        r.problems.append(f"orphans on a flat account: {r.orphans}")
    if r.crashed:
        r.problems.append(f"crashed: {r.crashed}")
    if r.fired < r.wanted:
        r.problems.append(f"only {r.fired} of {r.wanted} faults fired")


async def _forward_events(fake: FakeBinance, ex: Executor, order: dict, r: Result) -> None:
    """The user data stream, in process: every event the fake pushed reaches the executor, in order; meanwhile the
    longest stretch with a position and no matching protection is measured."""
    seen, naked_since = 0, None
    while True:
        events = fake.user_events[seen:]
        seen += len(events)
        for e in events:
            await ex.on_user_event(e)
        now = time.monotonic()
        if fake.account.positions[SYMBOL].amount != 0 and not protection_matches(fake, order):
            naked_since = naked_since or now
            r.naked_max_s = max(r.naked_max_s, now - naked_since)
        else:
            naked_since = None
        await asyncio.sleep(0.05)


async def _then(fake: FakeBinance, ex: Executor, order: dict, action: str) -> None:
    ids = client_ids(order["intent_id"])
    if action == "replay":
        await ex.execute(order)
        return
    verb, leg, *status = action.split()
    open_ = [a["clientAlgoId"] for a in fake.open_algo_orders({"symbol": SYMBOL})
             if a["clientAlgoId"].startswith(ids[leg])]
    if not open_:
        raise AssertionError(f"no open {leg} to {verb}")
    if verb == "end":
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fake.end_algo(open_[0], status[0]), fake.loop))
    else:  # the stop fires; its market order fills a second later: the take-profit must stand until then
        future = asyncio.run_coroutine_threadsafe(fake.trigger_algo(open_[0], fill_delay_s=1.0), fake.loop)
        await asyncio.sleep(0.6)
        if not any(a["clientAlgoId"].startswith(ids["tp"]) for a in fake.open_algo_orders({"symbol": SYMBOL})):
            raise AssertionError("the take-profit was cancelled before the triggered stop filled")
        await asyncio.wrap_future(future)


async def _settle(ex: Executor, fake: FakeBinance, order: dict, r: Result) -> None:
    """Until the intent rests (protected or terminal), no order of a flat account stands and the account holds its
    invariants for a second — or SETTLE_S."""
    deadline, calm_since = time.monotonic() + SETTLE_S, None
    while time.monotonic() < deadline:
        lc = ex.lifecycles.get(order["intent_id"])
        amount = fake.account.positions[SYMBOL].amount
        resting = lc is not None and (lc.state in TERMINAL or lc.state == State.PROTECTED)
        calm = resting and (protection_matches(fake, order) if amount != 0 else
                            not fake.open_algo_orders({}) and not fake.open_orders({}))
        if calm:
            calm_since = calm_since or time.monotonic()
            if time.monotonic() - calm_since > 1.0:
                return
        else:
            calm_since = None
        await asyncio.sleep(0.1)


def run_scenario(bootstrap: str, n: int, s: Scenario, config: ExecutionConfig = FAST) -> Result:
    """One scenario on a fresh fake exchange and executor (topics of its own on the shared broker)."""
    prefix = f"fm{n}-{int(time.time() * 1000) % 10**8}."
    ensure_topics(bootstrap, [topic("execution.intents"), topic("risk.events"), topic("deadletter")], prefix=prefix)
    fake = FakeBinance([SYMBOL], NOW).start()
    r = Result(s.name, wanted=sum(f.times for f in s.faults))
    try:
        for f in s.faults:
            kw = {k: v for k, v in dataclasses.asdict(f).items() if k not in ("method", "path", "nth")}
            fake.fail_next(f.path, method=f.method, nth=f.nth, **kw)
        order = intent(f"fm-{n}", fake.market.price(SYMBOL, fake.clock.now()), fake.clock.now())

        async def main() -> None:
            rest = RestClient(fake.rest_url, API_KEY, API_SECRET, timeout_s=1.0, max_retries=6)
            ex = Executor(rest, Publisher(bootstrap, prefix=prefix), [SYMBOL], leverage=3, config=config,
                          bootstrap=bootstrap)
            await ex.start()
            tasks = [asyncio.create_task(ex.maintain()), asyncio.create_task(_forward_events(fake, ex, order, r))]
            try:
                r.outcome = await ex.execute(order)
                await _settle(ex, fake, order, r)
                if s.then:
                    await _then(fake, ex, order, s.then)
                    await _settle(ex, fake, order, r)
                for t in tasks:
                    if t.done():
                        r.crashed = repr(t.exception())
                lc = ex.lifecycles.get(order["intent_id"])
                r.state = str(lc.state) if lc else ""
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                ex.publisher.flush()
                await rest.close()

        try:
            asyncio.run(main())
        except Exception as exc:  # noqa: BLE001 — a crash is a result of the matrix, not of the test's code
            r.crashed = f"{type(exc).__name__}: {exc}"
        r.fired = len(fake.fired)
        check(fake, order, r)
        if s.expect_fill and r.entry_fills == 0 and not r.crashed:
            r.problems.append("an entry that executed (or should have) is not filled")
    finally:
        fake.stop()
    return r


def table(results: list[Result]) -> str:
    lines = [f"{'scenario':44} {'outcome':10} {'state':10} {'fills':>5} {'naked s':>7} {'position':>8} "
             f"{'faults':>6}  ok"]
    for r in results:
        lines.append(f"{r.name[:44]:44} {r.outcome:10} {r.state:10} {r.entry_fills:5d} {r.naked_max_s:7.1f} "
                     f"{r.position:>8} {r.fired:>3}/{r.wanted:<2}  {'yes' if r.ok else '; '.join(r.problems)}")
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    naked = sum(any(p.startswith("naked") for p in r.problems) for r in results)
    duplicate = sum(r.entry_fills > 1 for r in results)
    crashed = sum(bool(r.crashed) for r in results)
    orphans = sum(bool(r.orphans) for r in results)
    failed = sum(not r.ok for r in results)
    return (f"scenarios {len(results)}, naked {naked}, duplicate {duplicate}, orphans {orphans}, crashed {crashed}, "
            f"failed {failed}")


# -- SIGKILL of the connector process ----------------------------------------------------------------------------------
KILL_POINTS: tuple[tuple[str, tuple[F, ...]], ...] = (
    # the exchange holds the answer of the last fault's call; the connector is killed while it waits, in that state
    ("ENTRY_SENT, entry accepted", (F("POST", ORDER, 1, 200, delay_after_accept=8.0),)),
    ("PROTECTING, stop-loss accepted", (F("POST", ALGO, 1, 200, delay_after_accept=8.0),)),
    ("PROTECTING, take-profit accepted", (F("POST", ALGO, 2, 200, delay_after_accept=8.0),)),
    ("CLOSING, emergency close accepted", (F("POST", ALGO, 1, 400, -2021, "Order would immediately trigger."),
                                           F("POST", ORDER, 2, 200, delay_after_accept=8.0))),
    ("PROTECTED", ()),
)


def run_killed(n: int, name: str, faults: tuple[F, ...], perpflow: str, env: dict) -> Result:
    """`perpflow connector execution` as its own process, on a broker and exchange of its own: an intent on `orders`,
    SIGKILL while the exchange holds the answer of `fault`'s call (or once the intent is protected), then a second
    process resumes: the lifecycle from `execution.intents`, the intent replayed from `orders` (its offset was never
    committed)."""
    from confluent_kafka import Producer

    from schemas.codec import default_codec
    from streams.broker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    bootstrap = broker.bootstrap
    fake = FakeBinance([SYMBOL], NOW).start()
    r = Result(f"SIGKILL at {name}", wanted=len(faults))
    procs: list[subprocess.Popen] = []
    try:
        for f in faults:
            kw = {k: v for k, v in dataclasses.asdict(f).items() if k not in ("method", "path", "nth")}
            fake.fail_next(f.path, method=f.method, nth=f.nth, **kw)
        ensure_topics(bootstrap)
        env = {**env, "PERPFLOW_KAFKA_BOOTSTRAP": bootstrap, "PERPFLOW_BINANCE_REST_URL": fake.rest_url,
               "PERPFLOW_BINANCE_WS_URL": fake.ws_url, "PERPFLOW_BINANCE_API_KEY": API_KEY,
               "PERPFLOW_BINANCE_API_SECRET": API_SECRET, "PERPFLOW_PAPER_TRADING": "false",
               "PERPFLOW_EXECUTION_RECONCILE_SECONDS": "3"}

        def start() -> subprocess.Popen:
            p = subprocess.Popen([perpflow, "connector", "execution", "--symbols", SYMBOL], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            return p

        order = intent(f"kill-{n}", fake.market.price(SYMBOL, fake.clock.now()), fake.clock.now())
        producer = Producer(producer_config(bootstrap))
        producer.produce("orders", default_codec().encode("order", order), SYMBOL.encode())
        producer.flush()
        first = start()
        deadline = time.monotonic() + 60
        while not (len(fake.fired) == len(faults) if faults else protection_matches(fake, order)):
            if first.poll() is not None or time.monotonic() > deadline:
                tail = first.stderr.read()[-500:] if first.stderr and first.poll() is not None else ""
                r.crashed = f"first connector: exit {first.poll()}, {tail}"
                return r
            time.sleep(0.05)
        time.sleep(0.3)  # the call is in the exchange's hands
        first.kill()
        first.wait(10)
        r.fired = len(fake.fired)
        second = start()
        deadline, calm_since = time.monotonic() + 60, None
        while time.monotonic() < deadline:  # settled: protected, or flat with nothing standing
            amount = fake.account.positions[SYMBOL].amount
            calm = (protection_matches(fake, order) if amount != 0
                    else not fake.open_algo_orders({}) and not fake.open_orders({}))
            if second.poll() is not None:
                r.crashed = f"second connector: exit {second.poll()}"
                break
            calm_since = (calm_since or time.monotonic()) if calm else None
            if calm_since and time.monotonic() - calm_since > 4.0:
                break
            time.sleep(0.2)
        r.outcome = "resumed"
        check(fake, order, r)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        fake.stop()
        broker.stop()
    return r
