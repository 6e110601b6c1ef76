"""Walk-forward folds with a purge and an embargo.

The rows' time span is cut into n + 1 equal blocks; fold k (1 … n) tests on block k and trains on every row
before it whose label was settled before the test block starts: a row at t is labeled from bars up to
t + (horizon + 1) bars, so rows within `purge` of the test start are dropped (purge ≥ label horizon). The embargo
drops a further stretch before the test start: slow features (EMA200 ≈ 17 h) computed just before and just after
the boundary share most of their inputs, and the test should not start where training left off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fold:
    k: int
    train: np.ndarray  # row indices
    test: np.ndarray
    test_start: int  # ms
    test_end: int
    dropped: int  # rows before the test block excluded by the purge and the embargo


def walk_forward(times: np.ndarray, n_folds: int, purge_ms: int, embargo_ms: int) -> list[Fold]:
    if n_folds < 1:
        raise ValueError("at least one fold")
    if len(times) == 0:
        return []
    lo, hi = int(times.min()), int(times.max()) + 1
    edges = [lo + (hi - lo) * i // (n_folds + 1) for i in range(n_folds + 2)]
    folds = []
    for k in range(1, n_folds + 1):
        start, end = edges[k], edges[k + 1]
        before = times < start
        train = np.flatnonzero(before & (times < start - purge_ms - embargo_ms))
        folds.append(Fold(k, train, np.flatnonzero(~before & (times < end)), start, end,
                          int(before.sum()) - len(train)))
    return folds
