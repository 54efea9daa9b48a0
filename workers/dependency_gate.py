"""The dependency gate: the one owner of circuit breakers, probes and waits for a worker's dependencies.

A worker calls shared services (the model, image hosts, Redis, a judge endpoint). When one fails,
the gate decides whether that is an *outage* (wait, probe, never a dead letter) or a property of
one record (retry, then dead-letter); the breakers themselves are pure state
(:class:`workers.circuit.CircuitBreaker`). Three kinds of caller share it:

- the enrich worker's records: the stage that makes a request reports its outcome once per request
  (:meth:`answered`, :meth:`failed`); a record whose dependency is down parks in
  :meth:`wait_closed` without spending an attempt, while :meth:`start_probes` (called from the
  worker's loop) probes each open dependency at the probe backoff until it answers;
- the faust agents: :meth:`call` retries one awaited operation until it succeeds (the operation is
  its own probe): record backoff first, then, once the breaker opens, the probe backoff;
- the search indexer (synchronous): :meth:`call_blocking`, the same policy with a caller-given
  wait that keeps its consumer polled.

Contract
- One gate per worker, used from one thread (and, for the async methods, one event loop).
- A breaker exists from a dependency's first failure (or :meth:`breaker`) on; :meth:`answered` for
  a dependency that never failed costs a dict look-up.
- ``on_open(name, error)`` runs once per outage, when the breaker goes from closed to open;
  ``on_close(name, open_for_s)`` once when it closes again; ``on_probe(name, up)`` after each probe;
  ``on_wait(name)`` before each wait of :meth:`call` / :meth:`call_blocking`.
  Hooks must not raise or block (metrics, logging, pausing partitions).
- :meth:`call` / :meth:`call_blocking` re-raise at once what ``is_outage`` does not accept; they
  return only with the operation's result (or raise :class:`GateStopped` when ``stop`` is set
  while waiting). The operation must be safe to repeat.
- Why no retry library (tenacity, stamina): the waits here are decided by a breaker shared by every
  record and caller (the probe schedule), not by the retried call; records park on an event rather
  than loop around a call. A library would replace only the few lines of :meth:`call`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from schemas.errors import OpalError, clean_message
from schemas.retry import Backoff
from workers.circuit import CircuitBreaker

log = logging.getLogger(__name__)
T = TypeVar("T")


class GateStopped(RuntimeError):
    """The caller was told to stop while waiting for a dependency: the operation never succeeded."""


@dataclass
class _Dependency:
    breaker: CircuitBreaker
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    probing: bool = False

    def __post_init__(self) -> None:
        self.closed.set()


def dependency_failure(e: BaseException) -> bool:
    """The default ``is_outage``: an :class:`OpalError` that names a dependency."""
    return isinstance(e, OpalError) and e.dependency is not None


class DependencyGate:
    """See the module docstring. ``prober(name)`` checks a dependency (raises while it is down)."""

    def __init__(
        self,
        failure_threshold: int,
        probe: Backoff,
        retry: Backoff,
        prober: Callable[[str], Awaitable[None]] | None = None,
        on_open: Callable[[str, str], None] | None = None,
        on_close: Callable[[str, float], None] | None = None,
        on_probe: Callable[[str, bool], None] | None = None,
        on_wait: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.probe_backoff = probe
        self.retry = retry
        self.prober = prober
        self.on_open = on_open
        self.on_close = on_close
        self.on_probe = on_probe
        self.on_wait = on_wait
        self.clock = clock
        self._deps: dict[str, _Dependency] = {}
        self._probes: set[asyncio.Task[None]] = set()

    # -- state -------------------------------------------------------------------------------
    def breaker(self, name: str) -> CircuitBreaker:
        """The breaker of ``name`` (created closed on first use)."""
        return self._dependency(name).breaker

    def _dependency(self, name: str) -> _Dependency:
        dep = self._deps.get(name)
        if dep is None:
            dep = self._deps[name] = _Dependency(CircuitBreaker(name, self.failure_threshold, self.probe_backoff, self.clock))
        return dep

    def is_open(self, name: str) -> bool:
        dep = self._deps.get(name)
        return dep is not None and dep.breaker.is_open

    def mark(self, name: str) -> int:
        """What a record remembers at its first failure through ``name`` (see :meth:`specific_to_record`)."""
        return self.breaker(name).mark()

    def specific_to_record(self, name: str, mark: int) -> bool:
        """True when ``name`` answered since ``mark``: a record's failures through it are its own."""
        return self.breaker(name).specific_to_record(mark)

    # -- outcomes ----------------------------------------------------------------------------
    def answered(self, name: str) -> None:
        """A request through ``name`` succeeded: the breaker (if any) closes and waiting callers go on."""
        dep = self._deps.get(name)
        if dep is None:
            return
        was_open, open_for = dep.breaker.is_open, dep.breaker.open_for_s()
        dep.breaker.success()
        dep.closed.set()
        if was_open:
            log.warning("dependency %s answers again after %.1f s; resuming", name, open_for)
            if self.on_close is not None:
                self.on_close(name, open_for)

    def failed(self, name: str, error: BaseException | str) -> bool:
        """One request through ``name`` failed in a way that may be an outage (count it once per request, not per
        record sharing it). Returns True when this opened the breaker (then waiting starts at once)."""
        dep = self._dependency(name)
        if dep.breaker.failure(str(error)):
            self._opened(dep, str(error))
            return True
        return False

    def trip(self, name: str, error: BaseException | str) -> None:
        """Open ``name`` now (idempotent while open): a record used its attempts and nothing answered meanwhile."""
        dep = self._dependency(name)
        dep.breaker.trip(str(error))
        if dep.closed.is_set():
            self._opened(dep, str(error))

    def _opened(self, dep: _Dependency, error: str) -> None:
        dep.closed.clear()
        log.warning("dependency %s is down (%s); waiting and probing", dep.breaker.name, clean_message(error, 300))
        if self.on_open is not None:
            self.on_open(dep.breaker.name, error)

    # -- waiting on an open breaker (async records) -----------------------------------------------
    async def wait_closed(self, name: str, stopping: asyncio.Event, limit_s: float | None = None) -> bool:
        """Wait until ``name`` is closed (or ``limit_s`` passed); False when ``stopping`` was set instead."""
        dep = self._deps.get(name)
        if dep is None or not dep.breaker.is_open:
            return not stopping.is_set()
        closed = asyncio.ensure_future(dep.closed.wait())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({closed, stop}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            stop.cancel()
        return not stopping.is_set()

    def start_probes(self) -> None:
        """Start one probe task per open breaker whose probe is due (at most one at a time each)."""
        if self.prober is None:
            return
        for name, dep in self._deps.items():
            if not dep.probing and dep.breaker.probe_due():
                dep.probing = True
                task = asyncio.create_task(self._probe(name, dep))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _probe(self, name: str, dep: _Dependency) -> None:
        assert self.prober is not None
        try:
            await self.prober(name)
        except Exception as e:  # any failure of a probe means: still down
            dep.breaker.probe_failed(f"{type(e).__name__}: {e}")
            up = False
        else:
            self.answered(name)
            up = True
        finally:
            dep.probing = False
        if self.on_probe is not None:
            self.on_probe(name, up)

    def stop_probes(self) -> None:
        """Cancel running probes (shutdown; idempotent)."""
        for task in list(self._probes):
            task.cancel()

    # -- retrying one operation (faust agents, the indexer) ------------------------------------
    def _after_failure(self, name: str, error: Exception, attempt: int) -> float:
        """Record a failed try of a retried operation; the seconds to wait before the next one."""
        text = f"{type(error).__name__}: {error}"
        dep = self._dependency(name)
        if dep.breaker.is_open:  # the retried operation is the probe
            dep.breaker.probe_failed(text)
            return max(0.0, dep.breaker.next_probe_at - self.clock())
        if self.failed(name, text):
            return max(0.0, dep.breaker.next_probe_at - self.clock())
        delay = self.retry.delay(attempt)
        log.warning("%s: attempt %d failed (%s); retrying in %.1f s", name, attempt, clean_message(text, 300), delay)
        return delay

    def _next_try_in(self, name: str, error: Exception, attempt: int, is_outage: Callable[[Exception], bool]) -> float:
        """A failed try of :meth:`call` / :meth:`call_blocking`: re-raised when ``is_outage`` does not accept it, else
        recorded and announced (``on_wait``); the seconds to wait before the next try."""
        if not is_outage(error):
            raise error
        delay = self._after_failure(name, error, attempt)
        if self.on_wait is not None:
            self.on_wait(name)
        return delay

    async def call(
        self,
        name: str,
        op: Callable[[], Awaitable[T]],
        is_outage: Callable[[Exception], bool] = dependency_failure,
        stop: asyncio.Event | None = None,
    ) -> T:
        """``await op()`` until it succeeds (see the module contract)."""
        attempt = 0
        while True:
            try:
                result = await op()
            except Exception as e:
                attempt += 1
                delay = self._next_try_in(name, e, attempt, is_outage)
            else:
                self.answered(name)
                return result
            if stop is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except TimeoutError:
                    continue
                raise GateStopped(f"stopped while waiting for {name}")

    def call_blocking(
        self,
        name: str,
        op: Callable[[], T],
        is_outage: Callable[[Exception], bool],
        wait: Callable[[float], None],
        stop: threading.Event | None = None,
    ) -> T:
        """``op()`` until it succeeds, for a synchronous caller; ``wait(seconds)`` sleeps while serving the caller's
        consumer. Raises :class:`GateStopped` when ``stop`` is set before a try."""
        attempt = 0
        while True:
            if stop is not None and stop.is_set():
                raise GateStopped(f"stopped while waiting for {name}")
            try:
                result = op()
            except Exception as e:
                attempt += 1
                wait(self._next_try_in(name, e, attempt, is_outage))
                continue
            self.answered(name)
            return result
