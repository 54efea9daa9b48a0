"""Circuit breakers for dependencies (the model, an image host, Redis): pure state, no I/O.

A breaker tells a worker whether a failure is an *outage* of a dependency (pause, probe,
wait; never a dead letter) or a property of one record (retry, then dead-letter). It is
owned by one worker and used from one thread or event loop; it never sleeps or calls
anything itself: the worker asks it what to do and reports what happened.

States
- closed: requests flow. ``failure_threshold`` consecutive failures open it.
- open: callers wait. A probe is due at :attr:`next_probe_at`; a failed probe pushes that
  out by the probe :class:`~schemas.retry.Backoff`; a successful one closes the breaker.

Telling records from outages: :attr:`answers` counts every success (a request or a probe).
A record remembers it at its first failure (:meth:`mark`); when the record has used its
attempts, :meth:`specific_to_record` is true only if the dependency answered since then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas.retry import Backoff


@dataclass
class CircuitBreaker:
    """See the module docstring. ``clock`` is injectable for tests."""

    name: str
    failure_threshold: int = 5
    probe: Backoff = field(default_factory=lambda: Backoff(1.0, 30.0))
    clock: Callable[[], float] = time.monotonic
    is_open: bool = False
    consecutive_failures: int = 0
    answers: int = 0
    trips: int = 0
    probes_failed: int = 0
    opened_at: float | None = None
    next_probe_at: float = 0.0
    last_error: str = ""

    def mark(self) -> int:
        """What a record remembers at its first failure (see :meth:`specific_to_record`)."""
        return self.answers

    def specific_to_record(self, mark: int) -> bool:
        """True when the dependency answered since ``mark``: the record's failure is its own."""
        return self.answers > mark

    def success(self) -> None:
        """A request through the dependency succeeded: close (if open) and reset the count."""
        self.answers += 1
        self.consecutive_failures = 0
        self._close()

    def failure(self, error: str = "") -> bool:
        """A request failed for a reason that may be an outage; returns True when this opened the breaker."""
        self.consecutive_failures += 1
        self.last_error = error or self.last_error
        if not self.is_open and self.consecutive_failures >= self.failure_threshold:
            self.trip(error)
            return True
        return False

    def trip(self, error: str = "") -> None:
        """Open now (idempotent while open); the first probe is due after one probe delay."""
        self.last_error = error or self.last_error
        if self.is_open:
            return
        self.is_open = True
        self.trips += 1
        self.probes_failed = 0
        self.opened_at = self.clock()
        self.next_probe_at = self.opened_at + self.probe.delay(1)

    def probe_due(self) -> bool:
        return self.is_open and self.clock() >= self.next_probe_at

    def probe_failed(self, error: str = "") -> None:
        """A probe found the dependency still down: next probe after a longer delay."""
        self.probes_failed += 1
        self.last_error = error or self.last_error
        self.next_probe_at = self.clock() + self.probe.delay(self.probes_failed + 1)

    def probe_succeeded(self) -> None:
        """A probe got an answer: the dependency is back."""
        self.success()

    def wait_after_failure(self, error: str, retry_delay: float) -> tuple[float, bool]:
        """For callers that retry one operation until it succeeds (the indexer, the faust agents):
        record the failure and return (seconds to wait before the next try, whether it just opened).

        Closed: ``retry_delay`` (the caller's record backoff). Open: until the next probe is due,
        the retried operation itself being the probe.
        """
        if self.is_open:
            self.probe_failed(error)
            return max(0.0, self.next_probe_at - self.clock()), False
        if self.failure(error):
            return max(0.0, self.next_probe_at - self.clock()), True
        return retry_delay, False

    def open_for_s(self) -> float:
        return 0.0 if not self.is_open or self.opened_at is None else self.clock() - self.opened_at

    def _close(self) -> None:
        self.is_open = False
        self.opened_at = None
        self.probes_failed = 0


TRANSIENT_REDIS_REPLIES = ("LOADING", "BUSY", "OOM", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS")
"""Redis error replies that mean the server cannot serve right now (an outage); any other reply is about the request."""


def redis_outage(e: BaseException) -> bool:
    """Whether a Redis client error is an outage (connection, timeout, server busy) rather than a
    reply about this request's data (a script error), which retrying would only repeat."""
    from redis.exceptions import RedisError, ResponseError

    if isinstance(e, ResponseError):
        return str(e).startswith(TRANSIENT_REDIS_REPLIES)
    return isinstance(e, (RedisError, OSError))
