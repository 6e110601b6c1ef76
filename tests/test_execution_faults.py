"""The execution fault matrix (tests/fault_matrix.py): each fault kind at the calls of the entry, protect and close
paths of one intent (one representative scenario per kind here, all of them in `python -m benchmarks faults`), each
on a fresh fake exchange and executor → at most one entry fill, never naked beyond the bound, no orphan, the connector
alive, each fault fired. The kill points (SIGKILL of `perpflow connector execution` in a lifecycle state, then a
restart that resumes it): two here, all five in the benchmark."""

from __future__ import annotations

import pytest

from streams.broker import EmbeddedBroker
from tests import fault_matrix
from tests.conftest import PERPFLOW, cli_env


@pytest.fixture(scope="module")
def bootstrap():
    b = EmbeddedBroker().start()
    yield b.bootstrap
    b.stop()


# one scenario per fault kind and path (the suite's time is counted); `python -m benchmarks faults` runs all 38
REPRESENTATIVE = ("clean", "entry 503 before accept", "entry 408/-1007 executed", "entry accepted, connection dropped",
                  "entry 503, executed 1.5 s later", "entry dropped, lookup 503 x4", "sl accepted, late answer",
                  "sl -2021 would trigger", "tp 503 x3", "sl -2021, close 503 x4", "tp -2021, sl cancel 503",
                  "sl canceled later", "sl canceled later, replacement -2021", "sl triggers, fills late")


@pytest.mark.timeout(900)
def test_every_fault_kind_leaves_one_protected_entry_or_a_flat_clean_account(bootstrap):
    scenarios = [s for s in fault_matrix.SCENARIOS if s.name in REPRESENTATIVE]
    assert len(scenarios) == len(REPRESENTATIVE), "a representative scenario was renamed"
    results = [fault_matrix.run_scenario(bootstrap, n, s) for n, s in enumerate(scenarios)]
    print("\n" + fault_matrix.table(results) + "\n" + fault_matrix.summary(results))
    assert [r.name for r in results if not r.ok] == [], fault_matrix.table([r for r in results if not r.ok])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("point", [0, 3], ids=["entry accepted", "emergency close accepted"])
def test_a_connector_killed_mid_intent_resumes_it_after_restart(tmp_path, point):
    name, faults = fault_matrix.KILL_POINTS[point]
    r = fault_matrix.run_killed(point, name, faults, PERPFLOW, cli_env(tmp_path / "home", PERPFLOW_LOG_LEVEL="INFO"))
    print("\n" + fault_matrix.table([r]))
    assert r.ok, r.problems
    assert r.entry_fills == 1
