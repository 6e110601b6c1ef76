"""Kill points: SIGKILL of the Faust worker, of the replay process and of `perpflow up` itself (its sink) at points
spread over a replay of the bundled real data, against the same replay uninterrupted. `perpflow up` restarts a killed
worker, which resumes from its changelogs and committed offsets; a killed replay or `up` is run again with the same
command. After the run every chain table (`features`, `predictions`, `signals`, `risk_verdicts`, `orders`,
`user_events`) must equal the uninterrupted run's row for row after FINAL (0 lost, 0 duplicated, 0 different).

Both runs start from one home (replayed, labelled, trained and promoted once, then copied), so the chain trades with
a promoted model and orders and fills exist. `--quick`: no model (the chain still carries every bar to a FLAT signal
and its verdict), a shorter window and four kills: three of the worker, one of the replay."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _data
from schemas.catalog import topic
from schemas.tables import select_fields

PERPFLOW = str(Path(sys.executable).parent / "perpflow")
SAMPLE = _data.ROOT / "data" / "binance-um-futures"
SYMBOLS = "BTCUSDT,ETHUSDT,1000PEPEUSDT"
TRAIN = ["--start", "2023-12-09", "--end", "2023-12-29"]
TRADE = ["--start", "2023-12-29", "--end", "2024-01-09"]  # to the sample's end: 11 days
TRADE_QUICK = ["--start", "2023-12-29", "--end", "2024-01-02"]
CHAIN = ("features", "predictions", "signals", "risk.verdicts", "orders", "user.events")
# both runs paced (the same command): at full speed the replay drained before half of the twenty kills landed (9 of 20,
# 11 of 20 at 15,000x: a kill waits for the chain's progress, read through `perpflow sql`, and a restarted worker needs
# ~15 s to start while the replay goes on); 5,000x real time is ~50 bars/s of three symbols
SPEED, SPEED_QUICK = "5000", "15000"
ENTER = {"PERPFLOW_MIN_PWIN": "0.30", "PERPFLOW_MIN_EV": "-0.01"}  # the demo model's edges are thin: let it trade


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERPFLOW_")}
    env.update(PERPFLOW_HOME=str(home), PERPFLOW_METRICS_PORT="0", PERPFLOW_WORKER_METRICS_PORT="0",
               PERPFLOW_LOG_LEVEL="WARNING", TZ="UTC", **ENTER, **extra)
    return env


def _cli(home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([PERPFLOW, *args], env=_env(home), cwd=_data.ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"perpflow {args[0]} failed: {result.stderr[-2000:]}")
    return result


def _up(window: list[str], speed: str) -> list[str]:
    return ["up", "--source", "replay", "--data", str(SAMPLE), "--symbols", SYMBOLS, *window, "--speed", speed,
            "--until-drained"]


def _children(up_pid: int) -> dict[int, bytes]:
    """The children of one `perpflow up` (the worker, the replay process): pid → command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if parent == up_pid:
            found[int(entry.name)] = cmdline
    return found


def _child_pid(up_pid: int, marker: bytes) -> int | None:
    """The child of one `perpflow up` whose command line holds `marker`."""
    return next((pid for pid, cmdline in _children(up_pid).items() if marker in cmdline), None)


def _wait_gone(pids, timeout: float = 120) -> None:
    """Until the processes are gone: a killed up's children (the replay process, multiprocessing's resource tracker)
    outlive it for a moment, and a new up started meanwhile found the store held."""
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the killed perpflow up's children {sorted(pids)} outlived it by {timeout:.0f} s")
        time.sleep(0.5)


def _tables(home: Path) -> dict[str, dict[str, str]]:
    """Every chain table: event id → the row (the records' own fields, FINAL) as one TSV line."""
    out = {}
    for name in CHAIN:
        t = topic(name)
        rows = _cli(home, "sql", f"SELECT {select_fields(t)} FROM {t.table} FINAL", "--format", "tsv").stdout
        out[name] = {line.split("\t", 1)[0]: line for line in rows.splitlines()}
    return out


def _show_differences(name: str, want: dict[str, str], got: dict[str, str], most: int = 3) -> None:
    """The first rows that differ, with the fields that differ: where to look."""
    fields = [f.strip() for f in select_fields(topic(name)).split(",")]
    for event_id in sorted(got.keys() - want.keys())[:most]:
        print(f"    {event_id}: extra: {got[event_id][:300]!r}")
    for event_id in sorted(i for i in want if want[i] != got.get(i))[:most]:
        if event_id not in got:
            print(f"    {event_id}: missing")
            continue
        pairs = zip(fields, want[event_id].split("\t"), got[event_id].split("\t"), strict=False)
        print(f"    {event_id}: " + "; ".join(f"{f} {a!r} → {b!r}" for f, a, b in pairs if a != b)[:600])


def _prepared_home(root: Path, quick: bool) -> Path:
    home = root / "trained"
    if quick:
        return home
    _cli(home, *_up(TRAIN, "max"))  # the training part: not compared
    _cli(home, "label", "--symbols", SYMBOLS, *TRAIN)
    trained = _cli(home, "train", "--symbols", SYMBOLS, *TRAIN, "--folds", "2", "--embargo-bars", "48",
                   "--max-rounds", "20", "--threads", "1")
    for model in re.findall(r"registered ((?:long|short)-\S+)", trained.stderr + trained.stdout):
        _cli(home, "models", "promote", model)
    return home


def _signals(home: Path) -> int | None:
    """How many signals the running `up` has archived (through its API), or None while it cannot say."""
    try:
        result = subprocess.run([PERPFLOW, "sql", "SELECT count() FROM signals", "--format", "tsv"], env=_env(home),
                                cwd=_data.ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    return int(result.stdout.split()[-1]) if result.returncode == 0 and result.stdout.strip() else None


def schedule(kills: int) -> list[str]:
    """What each kill point kills: mostly the worker (`up` restarts it), every seventh the replay process (`up` fails
    and is run again) and every seventh, offset, `up` itself with its sink (run again)."""
    return ["replay" if i % 7 == 3 else "up" if i % 7 == 6 else "worker" for i in range(kills)]


def _restart(start) -> subprocess.Popen:
    """`perpflow up` again; started again while the store is still held (a safety net: the caller waits for the killed
    one's children to be gone)."""
    for _ in range(30):
        proc = start()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            return proc  # running
        _, err = proc.communicate()
        if "is held by" not in err:
            raise RuntimeError(f"perpflow up did not start again ({proc.returncode}): {err[-2000:]}")
        time.sleep(1.0)
    raise RuntimeError("the store of the killed perpflow up stayed held for 2 minutes")


def _killed_run(home: Path, window: list[str], speed: str, kills: int, bars: int) -> tuple[dict[str, int], str]:
    """The trading replay with SIGKILLs spread evenly over its `bars` (a kill waits until the chain has archived a
    share of them since the last: one before any progress is no kill point); a killed replay or `up` is started
    again with the same command, as an operator would. (kills made per target, the last up's stdout)."""
    def start() -> subprocess.Popen:
        return subprocess.Popen([PERPFLOW, *_up(window, speed)], env=_env(home), cwd=_data.ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    targets = schedule(kills)
    made: dict[str, int] = {t: 0 for t in set(targets)}
    proc, step, last, i = start(), max(bars // (6 * kills), 1), None, 0
    try:
        while i < kills:
            if proc.poll() is not None:
                break  # drained before the last kill point
            time.sleep(0.5)
            n = _signals(home)
            if n is None:
                continue
            last = n if last is None else last
            if n - last < step:
                continue
            target = targets[i]
            pid = proc.pid if target == "up" else _child_pid(proc.pid, b"worker" if target == "worker"
                                                              else b"spawn_main")  # not the resource tracker
            if pid is None:
                continue
            children = _children(proc.pid)
            os.kill(pid, signal.SIGKILL)
            made[target] += 1
            i, last = i + 1, n
            if target != "worker":  # up is gone (or fails for its replay): run it again
                proc.wait(120)
                proc.communicate()
                _wait_gone(children)
                proc, last = _restart(start), None
        out, err = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"perpflow up after the kills failed ({proc.returncode}): {err[-3000:]}")
    return made, out


def run(quick: bool = False) -> bool:
    kills, window, days, speed = (4, TRADE_QUICK, 4, SPEED_QUICK) if quick else (20, TRADE, 11, SPEED)
    print(f"kill points: {kills} SIGKILLs of the worker, the replay and up over a replay of {SYMBOLS} "
          f"{' '.join(window)} at {speed}x real time{' (no model)' if quick else ', promoted model'}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        base = _prepared_home(root, quick)
        if base.exists():
            for copy in ("reference", "killed"):  # chDB links metadata/ into store/: keep the links
                shutil.copytree(base, root / copy, symlinks=True)
        t1 = time.monotonic()
        _cli(root / "reference", *_up(window, speed))
        t2 = time.monotonic()
        made, out = _killed_run(root / "killed", window, speed, kills, days * 288 * len(SYMBOLS.split(",")))
        t3 = time.monotonic()
        want, got = _tables(root / "reference"), _tables(root / "killed")
    restarts = re.search(r"worker restarts: (\d+)", out)
    print(f"kill points: prepared in {t1 - t0:.0f} s, uninterrupted run {t2 - t1:.0f} s, killed run {t3 - t2:.0f} s "
          f"with kills {made} ({restarts.group(1) if restarts else '?'} worker restarts in the last up)")
    ok = sum(made.values()) >= 1
    for name in CHAIN:
        a, b = want[name], got[name]
        missing, extra = len(a.keys() - b.keys()), len(b.keys() - a.keys())
        different = sum(1 for i in a.keys() & b.keys() if a[i] != b[i])
        print(f"  {name:14} rows {len(a):7,} uninterrupted, {len(b):7,} killed: {missing} missing, {extra} extra, "
              f"{different} different")
        if missing or extra or different:
            _show_differences(name, a, b)
        ok = ok and missing == extra == different == 0
    if not quick and not want["orders"]:
        print("kill points: the uninterrupted run placed no order: the comparison does not cover orders and fills")
    if sum(made.values()) < kills:
        print(f"kill points: only {sum(made.values())} of {kills} kills landed before the replay drained")
    if not ok:
        print("FAIL kill points: the chain tables differ from the uninterrupted run's")
    return ok
