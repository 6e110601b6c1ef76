"""ContiguousInput: an agent handles each input offset once and in order, whatever order Faust hands them in."""

import asyncio
from types import SimpleNamespace

from faust.types import TP

import streams.input_offsets as input_offsets
from streams.input_offsets import ContiguousInput

KLINES = TP("md.klines", 2)
MARKS = TP("md.markprice", 2)


class Consumer:
    """Records the seeks an agent asks for (the only consumer call ContiguousInput makes)."""

    def __init__(self) -> None:
        self.seeks: list[tuple[TP, int]] = []

    async def seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))


def app(starts: dict[TP, int]) -> SimpleNamespace:
    a = SimpleNamespace(consumer=Consumer())
    a._perpflow_starts = dict(starts)
    return a


def msg(tp: TP, offset: int) -> SimpleNamespace:
    return SimpleNamespace(tp=tp, offset=offset)


def handed(guard: ContiguousInput, offsets: list[tuple[TP, int]]) -> list[int]:
    admitted = [off for tp, off in offsets if guard.admit(msg(tp, off))]
    asyncio.run(guard.settle())
    return admitted


def test_nothing_is_admitted_before_the_start_position_is_known():
    a = app({})
    guard = ContiguousInput(a, "features")
    assert handed(guard, [(KLINES, 819), (KLINES, 820)]) == []
    assert a.consumer.seeks == []
    a._perpflow_starts[KLINES] = 347  # the seek to the committed offset happened
    assert handed(guard, [(KLINES, 821), (KLINES, 347), (KLINES, 348)]) == [347, 348]


def test_a_stale_fetch_past_the_committed_offset_is_sought_back_and_handed_again_in_order():
    """The restart that lost bars: offsets 819.. handed while the committed offset was 347."""
    a = app({KLINES: 347})
    guard = ContiguousInput(a, "features")
    assert handed(guard, [(KLINES, 819), (KLINES, 820)]) == []
    assert a.consumer.seeks == [(KLINES, 347)]  # one seek for the gap, not one per message
    assert handed(guard, [(KLINES, o) for o in range(347, 822)]) == list(range(347, 822))
    assert handed(guard, [(KLINES, 819), (KLINES, 822)]) == [822]  # a redelivery of handled offsets is dropped
    assert a.consumer.seeks == [(KLINES, 347)]


def test_partitions_are_independent_and_reset_forgets_what_was_handled():
    a = app({KLINES: 10, MARKS: 0})
    guard = ContiguousInput(a, "features")
    assert handed(guard, [(KLINES, 10), (MARKS, 0), (KLINES, 11), (MARKS, 5)]) == [10, 0, 11]
    assert a.consumer.seeks == [(MARKS, 1)]
    guard.reset()  # a revocation: the next owner (maybe this worker again) starts from the new start positions
    a._perpflow_starts.update({KLINES: 11, MARKS: 1})
    assert handed(guard, [(KLINES, 11), (MARKS, 1)]) == [11, 1]


def test_a_gap_is_sought_back_again_until_filled_never_skipped(monkeypatch):
    """A seek back that brings nothing is made again every REFETCH_SECONDS, however long; the records past the
    gap are never handed before it is filled."""
    now = [1000.0]
    monkeypatch.setattr(input_offsets.time, "monotonic", lambda: now[0])
    a = app({KLINES: 100})
    guard = ContiguousInput(a, "risk")
    assert handed(guard, [(KLINES, 150)]) == []
    for _ in range(3):
        now[0] += input_offsets.REFETCH_SECONDS
        assert handed(guard, [(KLINES, 150), (KLINES, 151)]) == []
    assert a.consumer.seeks == [(KLINES, 100)] * 4
    assert handed(guard, [(KLINES, o) for o in range(100, 152)]) == list(range(100, 152))
    assert guard.gaps == {}


def test_a_gap_that_never_fills_stops_the_worker_loudly(monkeypatch):
    """After MAX_REFETCHES seeks the worker exits non-zero (its restart starts from the committed offset): input is
    never skipped on a timer."""
    now = [1000.0]
    monkeypatch.setattr(input_offsets.time, "monotonic", lambda: now[0])
    exits: list[str] = []
    monkeypatch.setattr(input_offsets, "exit_loudly", exits.append)
    a = app({KLINES: 100})
    guard = ContiguousInput(a, "features")
    handed(guard, [(KLINES, 150)])
    for _ in range(input_offsets.MAX_REFETCHES):
        now[0] += input_offsets.REFETCH_SECONDS
        assert not exits
        assert handed(guard, [(KLINES, 150)]) == []
    now[0] += input_offsets.REFETCH_SECONDS
    asyncio.run(guard.settle())  # on the agent's timer: nothing more handed
    assert len(exits) == 1 and "offset 100 of md.klines[2]" in exits[0]
    assert len(a.consumer.seeks) == input_offsets.MAX_REFETCHES + 1
    assert 150 not in handed(guard, [(KLINES, 150)])  # still not skipped
