"""The benchmarks keep working: `python -m benchmarks --quick NAME` runs one on the bundled sample and exits non-zero
when it fails its own checks (every published message archived, the chain's decisions equal to the offline
pass's, ...). Their figures are not judged here — performance is measured in benchmarks, not in timed tests — but
a benchmark that no longer runs (one broke unnoticed when the predict agent's per-batch call changed) fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.__main__ import BENCHMARKS
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_the_benchmark_runs_and_passes_its_own_checks(name):
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", name], cwd=ROOT, capture_output=True,
                            text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    headers = {line.split(":")[0] for line in result.stdout.splitlines() if ":" in line}
    assert name.replace("_", " ") in headers, result.stdout  # it ran and said so
    assert "DIFFERENT" not in result.stdout and "FAIL " not in result.stdout
