"""Lane priority and backpressure as pure decisions (workers/flow_control.py), checked over random histories."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import Lane
from workers import flow_control as flow

RT, BF = "images.realtime", "images.backfill"
LANES = {RT: Lane.REALTIME, BF: Lane.BACKFILL}
ASSIGNED = {(RT, 0), (RT, 1), (BF, 0), (BF, 1)}


def test_the_window_shrinks_while_the_model_is_slow() -> None:
    assert flow.window([], 64, 30.0) == 64
    assert flow.window([1.0, 40.0, 50.0], 64, 30.0) == 16  # median 40 s > 30 s
    assert flow.window([1.0, 2.0, 50.0], 64, 30.0) == 64
    assert flow.window([99.0], 64, 0.0) == 64  # 0 disables
    assert flow.window([99.0], 2, 30.0) == 1


def test_realtime_backlog_counts_unknown_lag_as_backlog() -> None:
    assert flow.realtime_backlog(10.0, 0, [0, 0]) is False
    assert flow.realtime_backlog(10.0, 0, [0, None]) is True
    assert flow.realtime_backlog(10.0, 1, [0]) is True
    assert flow.realtime_backlog(0.1, 0, [0]) is True  # just delivered: more may be on the way


def test_backfill_waits_for_realtime_to_join_then_takes_its_share() -> None:
    assert flow.backfill_cap(64, 0.2, realtime_joined=False, realtime_has_backlog=False) == 0
    assert flow.backfill_cap(64, 0.2, realtime_joined=True, realtime_has_backlog=True) == 12
    assert flow.backfill_cap(64, 0.0, realtime_joined=True, realtime_has_backlog=True) == 1
    assert flow.backfill_cap(64, 0.2, realtime_joined=True, realtime_has_backlog=False) == 64


def test_pausing_has_hysteresis_and_follows_the_model_breaker() -> None:
    def pause(held: int, paused: set[tuple[str, int]], bf: int = 0, cap: int = 64, down: bool = False) -> set[tuple[str, int]]:
        return flow.partitions_to_pause(ASSIGNED, LANES, paused, held, 64, bf, cap, down)

    assert pause(64, set()) == ASSIGNED
    assert pause(40, ASSIGNED) == ASSIGNED  # paused when full: resumed only at half
    assert pause(32, ASSIGNED) == set()
    assert pause(0, set(), down=True) == ASSIGNED
    assert pause(12, set(), bf=12, cap=12) == {(BF, 0), (BF, 1)}


def test_a_brief_fill_pauses_nothing() -> None:
    """A pause drops librdkafka's prefetched records and a resume costs a fetch round trip: only a window that stays
    full (or backfill at its cap) for PAUSE_AFTER_S is paused; the quotas alone keep the window meanwhile."""
    brief = flow.PAUSE_AFTER_S / 10
    assert flow.partitions_to_pause(ASSIGNED, LANES, set(), 64, 64, 0, 64, False, full_for_s=brief) == set()
    assert flow.partitions_to_pause(ASSIGNED, LANES, set(), 64, 64, 0, 64, False, full_for_s=flow.PAUSE_AFTER_S) == ASSIGNED
    assert flow.partitions_to_pause(ASSIGNED, LANES, set(), 12, 64, 12, 12, False, capped_for_s=brief) == set()
    assert flow.partitions_to_pause(ASSIGNED, LANES, set(), 0, 64, 0, 64, True, full_for_s=0) == ASSIGNED  # outage: at once


@settings(max_examples=300, deadline=None)
@given(
    window=st.integers(1, 64),
    share=st.floats(0.0, 1.0),
    batch=st.integers(1, 32),
    steps=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40), st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=60),
)
def test_any_history_keeps_the_window_and_realtime_first(
    window: int, share: float, batch: int, steps: list[tuple[int, int, float, float]]
) -> None:
    """Each step: records arrive on both lanes, the worker takes what the quotas allow, a random share of
    each lane's records in flight finishes."""
    waiting = {Lane.REALTIME: 0, Lane.BACKFILL: 0}
    held = {Lane.REALTIME: 0, Lane.BACKFILL: 0}
    for rt_new, bf_new, rt_done, bf_done in steps:
        waiting[Lane.REALTIME] += rt_new
        waiting[Lane.BACKFILL] += bf_new
        backlog = waiting[Lane.REALTIME] > 0 or held[Lane.REALTIME] > 0
        cap = flow.backfill_cap(window, share, True, backlog)
        before = sum(held.values())
        q = flow.quotas(window, held, cap, batch)
        took_rt = min(q.realtime, waiting[Lane.REALTIME])
        waiting[Lane.REALTIME] -= took_rt
        held[Lane.REALTIME] += took_rt
        q = flow.quotas(window, held, cap, batch)
        took_bf = min(q.backfill, waiting[Lane.BACKFILL])
        waiting[Lane.BACKFILL] -= took_bf
        held[Lane.BACKFILL] += took_bf

        assert sum(held.values()) <= window  # the window is never exceeded
        if waiting[Lane.REALTIME] + took_rt > 0 and before < window:
            assert took_rt > 0  # realtime is never starved: it takes whenever there is room
        if took_bf and backlog:
            assert held[Lane.BACKFILL] <= cap  # backfill grows only within its share while realtime has backlog
        if not backlog and waiting[Lane.BACKFILL] and before < window:
            assert took_bf > 0  # an idle realtime lane leaves backfill the whole window

        for lane, done in ((Lane.REALTIME, rt_done), (Lane.BACKFILL, bf_done)):
            held[lane] -= int(held[lane] * done)
