"""`python -m benchmarks [--quick] [NAME ...]`: the machine and versions, then each benchmark in turn;
exits non-zero when a benchmark failed its checks (a missed throughput target is not a failure)."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from importlib.metadata import version

import confluent_kafka

from benchmarks import _data, archive_path, backtest, chain, codec, faults, features, killpoints, labels, rebalance

BENCHMARKS = {"codec": codec.run, "features": features.run, "archive_path": archive_path.run, "labels": labels.run,
              "chain": chain.run, "backtest": backtest.run, "faults": faults.run, "kill_points": killpoints.run,
              "rebalance": rebalance.run}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=_data.ROOT).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true",
                        help="bundled sample only, shorter windows, fewer repetitions (each benchmark ≤ ~2 min)")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"run only these: {', '.join(BENCHMARKS)}")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    sys.stdout.reconfigure(line_buffering=True)  # in order with the replay's progress lines on stderr

    print(f"nproc {len(os.sched_getaffinity(0))}, {platform.machine()}, Python {platform.python_version()}, "
          f"fastavro {version('fastavro')}, confluent-kafka {version('confluent-kafka')} "
          f"(librdkafka {confluent_kafka.libversion()[0]}), chdb {version('chdb')}, "
          f"clickhouse-connect {version('clickhouse-connect')}, pyarrow {version('pyarrow')}")
    dirty = " + uncommitted changes" if _git("status", "--porcelain") else ""
    print(f"perpflow {_git('rev-parse', '--short', 'HEAD') or 'unknown'}{dirty}" + (", --quick" if args.quick else ""))
    failed = []
    for name in args.names or BENCHMARKS:
        print()
        if not BENCHMARKS[name](quick=args.quick):
            failed.append(name)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
