"""The execution fault matrix in full (tests/fault_matrix.py): every in-process scenario — each fault kind at the calls
of the entry, protect and close paths, each on a fresh fake exchange and executor — and SIGKILL of `perpflow
connector execution` at each lifecycle state followed by a restart that resumes it. Prints the table and the summary
line `scenarios N, naked 0, duplicate 0, …`; fails when any scenario breaks an invariant."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from streams.broker import EmbeddedBroker
from tests import fault_matrix

PERPFLOW = str(Path(sys.executable).parent / "perpflow")


def run(quick: bool = False) -> bool:
    scenarios = fault_matrix.SCENARIOS[:3] if quick else fault_matrix.SCENARIOS
    kills = fault_matrix.KILL_POINTS[:1] if quick else fault_matrix.KILL_POINTS
    print(f"faults: {len(scenarios)} in-process scenarios + {len(kills)} SIGKILL points of the execution connector")
    t0 = time.monotonic()
    broker = EmbeddedBroker().start()
    try:
        results = [fault_matrix.run_scenario(broker.bootstrap, n, s) for n, s in enumerate(scenarios)]
    finally:
        broker.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERPFLOW_")}
    with tempfile.TemporaryDirectory() as home:
        env.update(PERPFLOW_HOME=home, PERPFLOW_METRICS_PORT="0", PERPFLOW_WORKER_METRICS_PORT="0",
                   PERPFLOW_LOG_LEVEL="WARNING")
        results += [fault_matrix.run_killed(n, name, f, PERPFLOW, env) for n, (name, f) in enumerate(kills)]
    print(fault_matrix.table(results))
    print(f"faults: {fault_matrix.summary(results)} ({time.monotonic() - t0:.0f} s)")
    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f"FAIL faults: {', '.join(failed)}")
    return not failed
