"""Offset bookkeeping of the worker: only a contiguous prefix of finished offsets is ever stored."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from workers.offsets import OffsetTracker


def test_out_of_order_completion_stores_only_the_prefix() -> None:
    t = OffsetTracker()
    for off in (10, 11, 12, 13):
        t.add("t", 0, off)
    assert t.finish("t", 0, 12) is None  # 10 and 11 still in flight
    assert t.finish("t", 0, 10) == 11
    assert t.finish("t", 0, 13) is None
    assert t.finish("t", 0, 11) == 14  # 11, 12, 13 done: next to consume is 14


def test_partitions_are_independent_and_dropped_on_revoke() -> None:
    t = OffsetTracker()
    t.add("t", 0, 5)
    t.add("t", 1, 7)
    assert t.finish("t", 1, 7) == 8
    t.drop("t", 0)
    assert t.finish("t", 0, 5) is None  # revoked: never stored by this worker


@given(st.permutations(list(range(30))))
def test_any_completion_order_ends_at_the_end(order: list[int]) -> None:
    t = OffsetTracker()
    for off in range(30):
        t.add("t", 0, 100 + off)
    stored = []
    done: set[int] = set()
    for off in order:
        done.add(off)
        nxt = t.finish("t", 0, 100 + off)
        if nxt is not None:
            stored.append(nxt)
            assert all(o in done for o in range(nxt - 100))  # never past an unfinished offset
    assert stored[-1] == 130 and stored == sorted(stored)
