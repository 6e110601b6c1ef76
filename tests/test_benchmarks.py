"""The benchmarks keep working: `python -m benchmarks --quick` runs each one on the bundled sample and exits non-zero
when one fails its own checks (every published message archived, the chain's decisions equal to the offline
pass's, ...). Their figures are not judged here — performance is measured in benchmarks, not in timed tests — but
a benchmark that no longer runs (one broke unnoticed when the predict agent's per-batch call changed) fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.__main__ import BENCHMARKS
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_every_benchmark_runs_and_passes_its_own_checks():
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick"], cwd=ROOT, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    headers = {line.split(":")[0] for line in result.stdout.splitlines() if ":" in line}
    assert {name.replace("_", " ") for name in BENCHMARKS} <= headers, result.stdout  # each one ran
    assert "DIFFERENT" not in result.stdout and "FAIL " not in result.stdout
