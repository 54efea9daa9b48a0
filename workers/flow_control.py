"""Lane priority and backpressure of the enrichment worker, as pure decisions (no Kafka, no asyncio).

The worker asks three questions every loop turn and acts on the answers (pause/resume
partitions, consume up to a quota):

- :func:`window`: how many records may be held at once (``max_in_flight``; a quarter of it
  while the model's median recent latency is above ``max_model_latency_s``).
- :func:`quotas`: how many records each lane may take now. Realtime first, up to the free
  window; backfill gets what is left, but while realtime has backlog at most
  :func:`backfill_cap` records in flight (``backfill_share`` of the window), and none until
  the realtime lane has joined its group (its backlog is unknown before). A quota never
  makes the records held exceed the window.
- :func:`partitions_to_pause`: every assigned partition when the window has been full for
  :data:`PAUSE_AFTER_S` (resumed at half: hysteresis) or the model's breaker is open; the
  backfill partitions when backfill has held its cap that long; none otherwise. The quotas
  alone keep the window; pausing is for a window that stays full (liveness while not
  consuming, and memory). It waits because a pause drops what librdkafka prefetched and a
  resume costs a fetch round trip: pausing on every brief fill (cache hits finish within
  milliseconds) held the cache-hit path at 65-80 records/s on tansu, against ~1,850 without
  (docs/BENCHMARKS.md).

Properties (``tests/workers/test_flow_control.py``, hypothesis): the window is never exceeded; while
realtime has backlog and the window has room, realtime's quota is positive and backfill
never holds more than its cap; backfill alone may use the whole window.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from schemas.events import Lane

TopicPartitionKey = tuple[str, int]


def window(latencies_s: Iterable[float], max_in_flight: int, max_model_latency_s: float) -> int:
    """Records that may be held at once: the full window, or a quarter while the median latency is too high."""
    lat = sorted(latencies_s)
    if lat and max_model_latency_s and lat[len(lat) // 2] > max_model_latency_s:
        return max(1, max_in_flight // 4)
    return max_in_flight


def realtime_backlog(since_last_realtime_s: float, realtime_in_flight: int, realtime_lags: Iterable[int | None]) -> bool:
    """True unless realtime is known to be drained: nothing delivered for 0.5 s, nothing in flight, and every
    assigned realtime partition at lag 0 (an unknown lag, None, counts as backlog)."""
    if since_last_realtime_s < 0.5 or realtime_in_flight > 0:
        return True
    return any(lag is None or lag > 0 for lag in realtime_lags)


def backfill_cap(window_size: int, backfill_share: float, realtime_joined: bool, realtime_has_backlog: bool) -> int:
    """Backfill records that may be in flight: 0 before realtime joined, ``backfill_share`` of the window (at
    least 1) while realtime has backlog, else the whole window."""
    if not realtime_joined:
        return 0
    return max(1, int(window_size * backfill_share)) if realtime_has_backlog else window_size


@dataclass(frozen=True)
class Quotas:
    """Records each lane may take in this turn."""

    realtime: int
    backfill: int


def quotas(window_size: int, in_flight: Mapping[Lane, int], cap: int, batch_max: int) -> Quotas:
    """Realtime's quota (the free window, at most ``batch_max``), and backfill's from what is left, bounded by
    ``cap``. Call again once realtime consumed: its new records are in ``in_flight`` then."""
    held = sum(in_flight.values())
    rt = max(0, min(window_size - held, batch_max))
    room = min(window_size - held, cap - in_flight.get(Lane.BACKFILL, 0))
    return Quotas(realtime=rt, backfill=max(0, min(room, batch_max)))


PAUSE_AFTER_S = 1.0
"""How long the window must stay full (or backfill at its cap) before partitions are paused (module docstring)."""


def partitions_to_pause(
    assigned: Collection[TopicPartitionKey],
    lane_of: Mapping[str, Lane],
    paused: Collection[TopicPartitionKey],
    held: int,
    window_size: int,
    backfill_in_flight: int,
    cap: int,
    model_down: bool,
    full_for_s: float = PAUSE_AFTER_S,
    capped_for_s: float = PAUSE_AFTER_S,
) -> set[TopicPartitionKey]:
    """The partitions that should be paused now (module docstring); always a subset of ``assigned``.

    ``full_for_s`` / ``capped_for_s``: how long the window has been full / backfill at its cap (the caller's clock).
    """
    assigned = set(assigned)
    all_paused = bool(assigned) and set(paused) >= assigned
    full = (held >= window_size and full_for_s >= PAUSE_AFTER_S) or (all_paused and held > window_size // 2)
    if full or model_down:
        return assigned
    backfill_paused = {tp for tp in assigned if lane_of.get(tp[0]) is Lane.BACKFILL}
    if backfill_in_flight >= cap and (capped_for_s >= PAUSE_AFTER_S or (backfill_paused and set(paused) >= backfill_paused)):
        return backfill_paused
    return set()
