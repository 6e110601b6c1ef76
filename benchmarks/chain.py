"""The decision chain end to end, on the real broker with a real worker: features → predict (which runs the
policy) → risk (with its paper exchange), models trained on the bundled sample's older part (as `make run` does,
not timed).

1. Throughput at full speed: the rest of the sample replayed as fast as the broker takes it; bars/s from the first
   kline's publication to the last verdict's (Kafka timestamps), and each agent's busy time (its share of the core).
2. Latency at live pacing: the last hours replayed at PACED_SPEED× real time (a bar per symbol every 0.25 s); per
   bar, the time from the kline's publication to its verdict — the order of an approved entry leaves in the same
   batch — p50/p99, with the broker hops in between (kline → features → signal → verdict; the predict agent
   publishes a bar's prediction and signal together).

The entry thresholds are lowered (MIN_PWIN 0.30, MIN_EV −1 %) so that orders and fills are part of the load: with
the defaults these models never enter on this sample."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from benchmarks import _data
from schemas.codec import default_codec
from streams.broker import EmbeddedBroker, client_config, end_offsets
from streams.demo import train_and_promote
from streams.settings import AGENTS, Settings
from streams.up import UpOptions, run_up, wait_for_agents
from streams.worker import WorkerProcess

PACED_SPEED = 1200.0  # 5m bars at 1,200× real time: one per symbol every 0.25 s, ~2 % of the chain's capacity
PACED_HOURS = 12  # 432 bars: enough for a p99 that is not just the slowest one or two
# paced bars before those measured: the first ones meet a replay, sink and store still starting beside the worker
# on the two cores (the first three bar times took 0.2-0.7 s), which a live feed running for hours does not
PACED_LEAD_HOURS = 1
QUICK_PACED_HOURS, QUICK_PACED_LEAD_HOURS = 2, 0.5  # --quick: proves the paced run works, its p99 says little
TARGET_BARS_PER_S = 2000
TARGET_P99_MS = 50
HOPS = ("md.klines", "features", "signals", "risk.verdicts")  # the records of a bar at each broker hop


def _timestamps(bootstrap: str, topic: str) -> dict[tuple[str, int], int]:
    """(symbol, open_time) → the Kafka timestamp (ms) of the topic's first record of that bar (5m klines only)."""
    ends = {p: o for (_, p), o in end_offsets(bootstrap, [topic]).items() if o > 0}
    consumer = Consumer(client_config(bootstrap, **{"group.id": "bench-reader", "enable.auto.commit": False}))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    codec, out, done = default_codec(), {}, dict.fromkeys(ends, 0)
    try:
        while any(done[p] < ends[p] for p in ends):
            for m in consumer.consume(5000, timeout=1.0):
                if m.error() is not None:
                    continue
                done[m.partition()] = m.offset() + 1
                _, rec = codec.decode(m.value())
                if rec.get("interval", "5m") == "5m":
                    out.setdefault((rec["symbol"], rec["open_time"]), m.timestamp()[1])
    finally:
        consumer.close()
    return out


def _broker_floor(bootstrap: str, n: int = 200) -> list[float]:
    """One plain hop on the same broker, with the worker's clients: the agents' producer settings (linger 1 ms) to
    an aiokafka consumer with the worker's fetch wait (`streams.app.FETCH_MAX_WAIT_MS`), ms per message — what each
    of the chain's hops costs before any agent work. Timed once the consumer has received a first message
    (the first one waits for the group join and the first fetch: with few samples it made the whole p99)."""
    import asyncio
    import threading

    from aiokafka import AIOKafkaConsumer, TopicPartition
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from streams.app import FETCH_MAX_WAIT_MS
    from streams.broker import producer_config

    admin = AdminClient(client_config(bootstrap))
    admin.create_topics([NewTopic("bench.floor", 1, 1)])["bench.floor"].result()
    latencies: list[float] = []
    warm, done = threading.Event(), threading.Event()

    def produce() -> None:
        producer = Producer(producer_config(bootstrap, **{"linger.ms": 1}))
        deadline = time.monotonic() + 30
        while not warm.is_set() and time.monotonic() < deadline:
            producer.produce("bench.floor", b"warm-up")
            producer.flush()
            warm.wait(0.2)
        for _ in range(n):
            producer.produce("bench.floor", str(time.time() * 1000).encode())
            producer.poll(0)
            time.sleep(0.02)
        producer.flush()
        time.sleep(1)
        done.set()

    async def consume() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
        await consumer.start()
        try:
            consumer.assign([TopicPartition("bench.floor", 0)])
            await consumer.seek_to_beginning()
            while not done.is_set():
                for messages in (await consumer.getmany(timeout_ms=50)).values():
                    for m in messages:
                        if m.value == b"warm-up":
                            warm.set()
                        else:
                            latencies.append(time.time() * 1000 - float(m.value))
        finally:
            await consumer.stop()

    writer = threading.Thread(target=produce, daemon=True)
    writer.start()
    asyncio.run(consume())
    writer.join(5)
    return latencies


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> float:
    """CPU seconds every core of the machine has been busy (not idle, not waiting for I/O), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def run(quick: bool = False) -> bool:
    data = _data.BUNDLED  # the models and the window come from the sample `make run` uses
    home = Path(tempfile.mkdtemp(prefix="perpflow-bench-chain-"))
    os.environ.update({"PERPFLOW_MIN_PWIN": "0.30", "PERPFLOW_MIN_EV": "-0.01"})  # the worker reads its env
    broker = EmbeddedBroker().start()
    try:
        settings = Settings(home=home, kafka_bootstrap=broker.bootstrap, clickhouse_url="", metrics_port=0,
                            worker_metrics_port=0, log_level="WARNING", symbols=_data.SYMBOLS)
        p = _data.sample_plan(quick)
        say = (lambda line: None) if quick else (lambda line: print(f"  {line}", file=sys.stderr))
        train_and_promote(settings, p, say, max_rounds=_data.training_rounds(quick))
        # the broker outlives each run_up (it is external to them) and still holds the training part: only the bars
        # replayed from here on are measured (and the agents' state carries over, warm)
        before = {t: set(_timestamps(broker.bootstrap, t)) for t in ("md.klines",)}
        paced_hours, lead_hours = (QUICK_PACED_HOURS, QUICK_PACED_LEAD_HOURS) if quick else (PACED_HOURS,
                                                                                             PACED_LEAD_HOURS)
        paced_start = p.end_ms - int(paced_hours * 3_600_000)
        lead_start = paced_start - int(lead_hours * 3_600_000)
        settings.run_worker = False  # this benchmark's own worker: its /metrics outlive the replays
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        worker = WorkerProcess(settings, broker.bootstrap, _data.SYMBOLS)
        try:
            cpu = worker.metric("process_cpu_seconds_total") or 0.0
            broker_cpu, machine_cpu = _process_cpu(broker.process.pid), _machine_cpu()
            run_up(settings, UpOptions("replay", str(data), _data.SYMBOLS, p.train_end_ms, lead_start, None, True))
            wait_for_agents(broker.bootstrap, worker)
            broker_cpu, machine_cpu = _process_cpu(broker.process.pid) - broker_cpu, _machine_cpu() - machine_cpu
            cpu = (worker.metric("process_cpu_seconds_total") or 0.0) - cpu
            busy = {a: worker.metric("perpflow_agent_busy_seconds_total", agent=a) or 0.0 for a in AGENTS}
            stamps = {t: _timestamps(broker.bootstrap, t) for t in HOPS}
            new = [k for k in stamps["md.klines"] if k not in before["md.klines"]]
            bars = len(new)
            first = min(stamps["md.klines"][k] for k in new)
            last = max(stamps["risk.verdicts"][k] for k in new if k in stamps["risk.verdicts"])
            seconds = (last - first) / 1000
            run_up(settings, UpOptions("replay", str(data), _data.SYMBOLS, lead_start, p.end_ms, PACED_SPEED, True))
            wait_for_agents(broker.bootstrap, worker)
            stamps = {t: _timestamps(broker.bootstrap, t) for t in HOPS}
        finally:
            worker.stop()
        floor = _broker_floor(broker.bootstrap)
        paced = [k for k in stamps["risk.verdicts"] if k[1] >= paced_start]
        e2e = [stamps["risk.verdicts"][k] - stamps["md.klines"][k] for k in paced if k in stamps["md.klines"]]
        hops = {f"{a}→{b}": [stamps[b][k] - stamps[a][k] for k in paced if k in stamps[a] and k in stamps[b]]
                for a, b in zip(HOPS, HOPS[1:], strict=False)}
    finally:
        broker.stop()
    total_busy = sum(busy.values()) or 1.0
    rate = bars / seconds if seconds > 0 else float("nan")
    print(f"chain: data {data}, {', '.join(_data.SYMBOLS)}; models trained {p.start_ms} → {p.train_end_ms} "
          "(not timed)")
    print(f"  full speed: {bars:,} bars through features → predict + policy → risk + paper in {seconds:.1f} s = "
          f"{rate:,.0f} bars/s (target ≥ {TARGET_BARS_PER_S:,}: {rate / TARGET_BARS_PER_S:.2f}× of it)")
    print("  busy time per agent: " + ", ".join(
        f"{a} {busy[a]:.1f} s ({busy[a] / total_busy:.0%})" for a in AGENTS))
    if bars and cpu:
        print(f"  worker CPU: {cpu:.1f} s = {cpu / bars * 1e6:,.0f} µs per bar ({cpu / seconds:.0%} of one core over "
              f"the run; a core fully busy at that cost would do {bars / cpu:,.0f} bars/s)")
    if bars:
        cores = len(os.sched_getaffinity(0))
        print(f"  whole machine: {machine_cpu:.1f} s of CPU = {machine_cpu / bars * 1e6:,.0f} µs per bar (the broker "
              f"{broker_cpu / bars * 1e6:,.0f}, the worker {cpu / bars * 1e6:,.0f}, the rest — replay, sink, this "
              f"process — {(machine_cpu - broker_cpu - cpu) / bars * 1e6:,.0f}); at that cost {cores} cores fully "
              f"busy would do {cores * bars / machine_cpu:,.0f} bars/s")
    if e2e:
        print(f"  live pacing ({PACED_SPEED:g}× real time, {len(e2e):,} bars): kline published → verdict (and order) "
              f"p50 {_pct(e2e, 50):.0f} ms, p90 {_pct(e2e, 90):.0f} ms, p99 {_pct(e2e, 99):.0f} ms, "
              f"max {max(e2e):.0f} ms "
              f"(target p99 ≤ {TARGET_P99_MS} ms: {_pct(e2e, 99) / TARGET_P99_MS:.1f}× of it)")
        print("  hops p50 / p99 (ms): " + ", ".join(
            f"{h} {_pct(v, 50):.0f} / {_pct(v, 99):.0f}" for h, v in hops.items() if v))
    if floor:
        print(f"  broker floor, same broker: one plain produce → consume hop ({len(floor)} messages) p50 "
              f"{_pct(floor, 50):.0f} ms, p99 {_pct(floor, 99):.0f} ms; the chain has {len(HOPS) - 1} hops: "
              f"≥ {(len(HOPS) - 1) * _pct(floor, 50):.0f} ms at p50 before any agent work")
    ok = bars > 0 and len(e2e) > 0
    if not ok:
        print("FAIL chain: no bars or no verdicts measured")
    return ok
