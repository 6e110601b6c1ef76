"""`python -m benchmarks [--quick] [codec] [archive_path]`: the machine, then each benchmark in turn."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib.metadata import version

from benchmarks import archive_path, codec

BENCHMARKS = {"codec": codec.run, "archive_path": archive_path.run}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="bundled sample only, fewer repetitions (< 1 min)")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"run only these: {', '.join(BENCHMARKS)}")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    import confluent_kafka

    print(f"nproc {len(os.sched_getaffinity(0))}, {platform.machine()}, Python {platform.python_version()}, "
          f"fastavro {version('fastavro')}, confluent-kafka {confluent_kafka.version()[0]} "
          f"(librdkafka {confluent_kafka.libversion()[0]}), chdb {version('chdb')}, "
          f"clickhouse-connect {version('clickhouse-connect')}, pyarrow {version('pyarrow')}"
          + (", --quick" if args.quick else ""))
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
