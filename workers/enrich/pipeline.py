"""The enrich pipeline: stages over lists of records, and the policy for a record whose stage failed.

A poll batch goes through the stages in one task (:meth:`Pipeline.run_batch`). A stage marked
``detached`` (a slow request per record) is where records that need it leave the batch for tasks of
their own (:meth:`Pipeline.spawn`) and go on from that stage; the others go on in the batch at once. So
a batch of cache hits is the fast case of the same stages: nothing leaves it, generate has nothing to do.

A record whose stage fails leaves the batch too: its own task hands the failure to :class:`RecordPolicy`
(retry after backoff, wait for a dependency, or dead-letter) and, on a retry, runs it through the stages
again (each stage skips what the record already has). Adding a stage (a retrieval stage before generate)
means adding it to the list the worker builds: the loop, the consumers and the gate do not change.

Contract: every record handed to :meth:`run_batch` ends in exactly one output (an AspectEvent from the emit
stage, or a DeadLetter from the policy), or in no output only when the worker is stopping (its offset is
then not stored and the record is replayed by the next owner). A task that escapes with an exception, or
is cancelled while the worker is not stopping, is fatal (:attr:`Pipeline.fatal`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from schemas.errors import ErrorKind, OpalError
from schemas.retry import Backoff
from schemas.settings import WorkerSettings
from workers.dependency_gate import DependencyGate
from workers.enrich.output import FatalWorkerError, Outputs
from workers.enrich.record import Record
from workers.enrich.stages import MODEL, Stage
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class RecordPolicy:
    """What a failed attempt of one record leads to (the one retry policy of :mod:`schemas.retry`).

    - A failure through a dependency whose breaker is open, or one that would use up the record's attempts
      while the dependency answered nobody since the record's first failure, is an outage: the record waits
      for the dependency without spending an attempt (an image host at most ``image_host_max_wait_s``, then
      a dead letter; the model as long as it takes), then starts again with a full budget.
    - Other retriable failures are retried after a capped, jittered backoff up to ``max_attempts``.
    - Everything else is a dead letter with its reason; an unexpected exception (a bug) is an ``internal``
      dead letter, or, while the worker is stopping, no output (replayed).
    """

    def __init__(self, w: WorkerSettings, gate: DependencyGate, outputs: Outputs, metrics: WorkerMetrics, stopping: asyncio.Event) -> None:
        self.w, self.gate, self.outputs, self.metrics, self.stopping = w, gate, outputs, metrics, stopping
        self.retry = Backoff(w.retry_backoff_s, w.retry_backoff_max_s)

    async def again(self, r: Record, error: Exception) -> bool:
        """Settle one failed attempt of ``r``: True when the record should be tried again now; False when it is
        finished (dead-lettered) or given up because the worker is stopping."""
        r.attempts += 1
        if not isinstance(error, OpalError):
            if self.stopping.is_set():  # clients closing under it: not the record's fault; not stored, replayed
                log.warning(
                    "%s left without an output at shutdown (%s: %s); replayed by the next owner", r.where(), type(error).__name__, error
                )
                return False
            log.error("unexpected error processing %s", r.where(), exc_info=error)
            internal = OpalError(f"{type(error).__name__}: {error}")
            internal.reason = ErrorKind.INTERNAL
            self.outputs.dead_letter(r, internal)
            return False
        if error.dependency is not None:
            name = error.dependency
            mark = r.marks.setdefault(name, self.gate.mark(name))
            spent = r.attempts >= self.w.max_attempts or not error.retriable
            if self.gate.is_open(name) or (spent and not self.gate.specific_to_record(name, mark)):
                return await self._outage(r, name, error)
        if error.retriable and r.attempts < self.w.max_attempts:
            self.metrics.retries.labels(str(error.reason)).inc()
            await asyncio.sleep(self.retry.delay(r.attempts))
            return True
        self.outputs.dead_letter(r, error)
        return False

    async def _outage(self, r: Record, name: str, error: OpalError) -> bool:
        """Wait for ``name`` without spending an attempt; a full budget afterwards."""
        self.gate.trip(name, error)
        r.attempts -= 1
        limit: float | None = None
        if name != MODEL:  # an image host may be gone for good: bounded wait
            r.waiting_since = r.waiting_since or time.monotonic()
            limit = self.w.image_host_max_wait_s - (time.monotonic() - r.waiting_since)
            if limit <= 0:
                self.outputs.dead_letter(r, type(error)(f"{error} (host down for {self.w.image_host_max_wait_s:.0f} s)", name))
                return False
        self.metrics.dependency_waits.labels(name).inc()
        if not await self.gate.wait_closed(name, self.stopping, limit):
            return False  # stopping: no output, offset not stored, the record is replayed
        r.attempts = 0  # failures before the outage were probably the outage: a full budget again
        return True


class Pipeline:
    """See the module docstring. ``stopping`` is set when the worker shuts down."""

    def __init__(self, stages: Sequence[Stage], policy: RecordPolicy, stopping: asyncio.Event) -> None:
        self.stages = list(stages)
        self.policy = policy
        self.stopping = stopping
        self.fatal: BaseException | None = None

    def start_batch(self, records: list[Record]) -> None:
        """Run a poll batch in a task of its own (each record remembers the task it is in)."""
        if not records:
            return
        task = asyncio.create_task(self.run_batch(records))
        task.add_done_callback(self._task_done)
        for r in records:
            r.task = task

    async def run_batch(self, records: list[Record]) -> None:
        """The batch through every stage; records that fail, or need a detached stage, go on in tasks of their own."""
        live = records
        for i, stage in enumerate(self.stages):
            todo = [r for r in live if stage.needs(r)]
            if not todo:
                continue
            if stage.detached:
                for r in todo:
                    self.spawn(r, i, None)
            else:
                failures = await stage.run(todo)
                for r, e in failures:
                    self.spawn(r, i, e)
                todo = [r for r, _ in failures]
            if todo:
                gone = {id(r) for r in todo}
                live = [r for r in live if id(r) not in gone]

    def spawn(self, r: Record, start: int, error: Exception | None) -> None:
        """Continue ``r`` in a task of its own from stage ``start``, or settle ``error`` first (then from the start)."""
        r.task = asyncio.create_task(self._alone(r, start, error))
        r.task.add_done_callback(self._task_done)

    async def _alone(self, r: Record, start: int, error: Exception | None) -> None:
        while True:
            if error is not None:
                if not await self.policy.again(r, error):
                    return
                start = 0
            error = await self._through(r, start)
            if error is None:
                return

    async def _through(self, r: Record, start: int) -> Exception | None:
        """One attempt of ``r`` through the stages from ``start``; its failure, if any."""
        for stage in self.stages[start:]:
            if stage.needs(r):
                failures = await stage.run([r])
                if failures:
                    return failures[0][1]
        return None

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A task must end in outputs or a fatal stop: an escaped exception is fatal (replay), and so is a task
        cancelled while the worker is not stopping (its records would hold the window and their partitions' stored
        prefix without an output)."""
        if self.fatal is not None:
            return
        if task.cancelled():
            if not self.stopping.is_set():
                self.fatal = FatalWorkerError("a record task was cancelled; its records were not stored and will replay")
        elif task.exception() is not None:
            self.fatal = task.exception()
