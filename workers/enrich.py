"""The enrichment worker: ListingImageEvents in, AspectEvents (or DeadLetters) out.

Delivery contract (at-least-once, nothing dropped)
- Every consumed record ends as exactly one produced output: an AspectEvent keyed by
  listing id on the aspects topic, or a DeadLetter (reason + raw bytes) on the
  dead-letter topic. Its offset is *stored* only after the broker acknowledged that
  output, and only as part of a contiguous prefix per partition; librdkafka's
  background commit then persists stored offsets (and shutdown commits synchronously).
- A crash (even kill -9) therefore loses nothing: records whose output was not yet
  acknowledged and committed are consumed again after restart. A replay may produce a
  second AspectEvent for the same listing; the aspects topic is compacted by listing
  id, so a reader that keeps the latest record per key still sees exactly one current
  record per listing.
- Retries follow the one policy in :mod:`schemas.retry`. Failures that may be specific
  to the record (an image URL answering 5xx, the schema registry refusing) are retried in
  place with capped, jittered backoff up to ``worker.max_attempts``, then dead-lettered
  with the attempt count. Everything else about the input is dead-lettered at once.
- Dependency outages are not dead letters. When the model (or an image host) fails for
  ``worker.breaker_failures`` consecutive records, or a record would use up its attempts
  while nothing answered since its first failure, that dependency's circuit breaker opens
  (:mod:`workers.circuit`): records already held wait without spending attempts, the model's
  breaker pauses every assigned partition, and the dependency is probed with backoff until
  it answers; then partitions resume and the waiting records go on.
- Concurrent cache misses on the same (model version, category, images) key share one
  model request (single flight).
- A poll batch is handled as a batch first (:meth:`EnrichWorker._run_batch`): decoded, its
  images read and header-checked (no pixel decoded), one MGET, its cache hits produced in a
  loop. A miss or a failure continues in a task of its own, which treats the batch pass's
  failure as its first attempt's; the contract above holds for both paths alike.
- The output path cannot wedge a partition: a dead letter always fits (raw value cut to
  ``worker.dead_letter_max_value_bytes`` with its size and SHA-256 kept); an AspectEvent
  the broker or librdkafka refuses as too large becomes an ``output_too_large`` dead
  letter; any other failure to hand an output to the producer, or a dead letter the
  broker refuses, is fatal: the worker stops without storing that offset (the record is
  replayed by the next owner).

Flow control
- At most ``worker.max_in_flight`` records are held; when full, every assigned
  partition is paused (librdkafka stops fetching and drops its prefetch), and resumed
  at half. Memory is bounded by that window plus librdkafka's capped fetch queue.
- The realtime lane goes first: while realtime has backlog (lag from the high-water
  marks on fetched messages, or realtime records in flight), backfill may hold at most
  ``worker.backfill_share`` of the window; its partitions are paused beyond that.
- When the model's recent latency passes ``worker.max_model_latency_s`` the window
  shrinks to a quarter until latency recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import urllib.parse
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from inference.client import InferenceResult, InferenceUnavailableError, ListingClient, model_info
from inference.images import PixelBudget, PreparedImage
from schemas.category import CategoryRegistry, CategorySchema
from schemas.errors import ErrorKind, OpalError, OutputTooLargeError, clean_message
from schemas.events import (
    AspectEvent,
    AspectValue,
    DeadLetter,
    Lane,
    ListingImageEvent,
    ModelInfo,
    SchemaCheck,
    Timings,
)
from schemas.retry import Backoff
from schemas.schema_source import SchemaWatcher
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from workers import flow_control as flow
from workers.circuit import CircuitBreaker
from workers.image_loader import FetchedImage, ImageLoader, host_dependency
from workers.intake import dead_letter_for, decode_listing_event
from workers.metrics import WorkerMetrics
from workers.offsets import OffsetTracker
from workers.result_cache import CachedListing, ResultCache, images_digest

log = logging.getLogger(__name__)


DECODE_THREADS = 2
"""Images decoded at once on cache misses (each full decode of a large photo holds ~100 MB while it runs)."""
IDLE_BLOCK_S = 0.005
"""Longest wait for a record on the backfill consumer when nothing is in flight (see the loop in :meth:`EnrichWorker.run`)."""


class FatalWorkerError(RuntimeError):
    """The worker cannot continue without risking loss (e.g. an output was not stored)."""


MODEL = "model"
"""Dependency name of the model endpoints (see :attr:`schemas.errors.OpalError.dependency`)."""
_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
_BROKER_SAFE_BYTES = 900_000
"""An output above this is itself too large when the broker refuses its batch (Kafka's default limit is ~1 MB)."""


@dataclass
class _Job:
    msg: Message
    lane: Lane
    consumed_at: float
    task: asyncio.Task[None] | None = None
    attempts: int = 0  # tries that counted against the record (outages do not)
    fetched: list[FetchedImage] | None = None  # fetched and header-checked once, reused by retries
    image_ms: float = 0.0  # time spent fetching them
    event: ListingImageEvent | None = None  # decoded once (by the batch pass), reused by retries
    error: BaseException | None = None  # a failure of the batch pass, for _process to handle as its first attempt's
    looked_up: bool = False  # the batch pass found no cached result: the first attempt does not look again
    images: list[PreparedImage] | None = None  # decoded once (only on a cache miss), reused by retries
    listing_id: str | None = None


@dataclass
class _Report:
    """One delivery report, recorded in librdkafka's callback and acted on after poll() returns."""

    job: _Job
    topic: str
    key: bytes | None
    value: bytes
    dead_reason: str | None
    tries: int
    err: KafkaError | None


@dataclass
class _Dependency:
    """A breaker plus the event records wait on while it is open."""

    breaker: CircuitBreaker
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    probing: bool = False


class EnrichWorker:
    """One worker process. Build with :meth:`from_settings` or inject clients (tests)."""

    def __init__(
        self,
        settings: OpalSettings,
        consumers: dict[Lane, Consumer],
        producer: Producer,
        client: ListingClient,
        loader: ImageLoader,
        cache: ResultCache | None,
        categories: CategoryRegistry | SchemaWatcher,
        codec: EventCodec[ListingImageEvent],
        aspect_codec: EventCodec[AspectEvent],
        dl_codec: EventCodec[DeadLetter],
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.s = settings
        self.w = settings.worker
        self.consumers = consumers
        self.producer = producer
        self.client = client
        self.loader = loader
        self.cache = cache
        # a fixed registry, or a watcher that swaps in changed schema files between records (poll() in the loop)
        self.schemas = categories if isinstance(categories, SchemaWatcher) else None
        self._fixed = categories if isinstance(categories, CategoryRegistry) else None
        self.codec = codec
        self.aspect_codec = aspect_codec
        self.dl_codec = dl_codec
        self.metrics = metrics or WorkerMetrics()
        self.tracker = OffsetTracker()
        self.jobs: dict[tuple[str, int, int], _Job] = {}
        self._held = dict.fromkeys(Lane, 0)  # records held per lane (the jobs of each lane, counted as they come and go)
        self._to_store: dict[tuple[str, int], int] = {}  # offsets to store after the current delivery reports
        # metric children bound once (a labels() look-up per record costs more than the increment)
        self._m_consumed = {lane: self.metrics.consumed.labels(lane.value) for lane in Lane}
        self._m_in_flight = {lane: self.metrics.in_flight.labels(lane.value) for lane in Lane}
        self.assigned: set[tuple[str, int]] = set()
        self.paused: set[tuple[str, int]] = set()
        self.model_version = ""
        self.model = ModelInfo(name="", version="")
        self._fatal: BaseException | None = None
        self._latencies: deque[float] = deque(maxlen=50)
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="opal-decode")
        self._full_since: float | None = None  # since when the window has been full (flow control)
        self._capped_since: float | None = None  # since when backfill has held its cap
        self._lag: dict[tuple[str, int], int] = {}
        self._last_lag_check = 0.0
        self.lanes = {settings.topics.images_realtime: Lane.REALTIME, settings.topics.images_backfill: Lane.BACKFILL}
        self.outputs = 0
        self._last_rt = 0.0  # when the realtime lane last delivered records
        self._joined: set[Lane] = set()  # lanes whose consumer completed a group join
        self._last_rebalance = 0.0
        self._settle_s = settings.kafka.session_timeout_ms / 1000 + 1.0
        self._retry = Backoff(self.w.retry_backoff_s, self.w.retry_backoff_max_s)
        self._deps: dict[str, _Dependency] = {}
        self._flights: dict[tuple[str, str, str], asyncio.Future[InferenceResult]] = {}
        self._stopping = asyncio.Event()
        self._probe_tasks: set[asyncio.Task[None]] = set()
        self._reports: list[_Report] = []
        if cache is not None:
            cache.on_error = lambda op: self.metrics.cache_errors.labels(op).inc()

    @property
    def categories(self) -> CategoryRegistry:
        """The schema set in use now: a record is checked against the set current when its enrichment starts."""
        return self.schemas.registry if self.schemas is not None else self._fixed  # type: ignore[return-value]

    def _poll_schemas(self) -> None:
        if self.schemas is None:
            return
        failures = self.schemas.failures
        if self.schemas.poll():
            self.metrics.schema_reloads.labels("ok").inc()
        elif self.schemas.failures > failures:
            self.metrics.schema_reloads.labels("refused").inc()
        self.metrics.schema_categories.set(len(self.schemas.registry))

    # -- lifecycle -------------------------------------------------------------------------
    def _lane_of(self, topic: str) -> Lane:
        return self.lanes.get(topic, Lane.BACKFILL)

    def subscribe(self) -> None:
        for lane, consumer in self.consumers.items():
            topic = self.s.topics.images_realtime if lane is Lane.REALTIME else self.s.topics.images_backfill
            consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke)

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._joined |= {lane for lane, c in self.consumers.items() if c is consumer}  # also on an empty assignment
        self._last_rebalance = time.monotonic()
        for tp in parts:
            self.assigned.add((tp.topic, tp.partition))
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in parts))

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._last_rebalance = time.monotonic()
        self._commit(consumer)
        for tp in parts:
            key = (tp.topic, tp.partition)
            self._lag.pop(key, None)
            for gauge in (self.metrics.lag, self.metrics.commit_lag):  # another member reports it now
                with contextlib.suppress(KeyError):
                    gauge.remove(tp.topic, str(tp.partition))
            self.assigned.discard(key)
            self.paused.discard(key)
            self.tracker.drop(*key)  # in-flight results of a revoked partition are produced but not stored
        log.info("revoked %s", [(tp.topic, tp.partition) for tp in parts])

    def _lane_paused(self, lane: Lane) -> bool:
        """True when the lane has no partition it could fetch from (none assigned yet, or all paused)."""
        mine = {tp for tp in self.assigned if self.lanes.get(tp[0]) is lane}
        return not mine or mine <= self.paused

    def _consume(self, lane: Lane, n: int, timeout: float) -> list[Message]:
        msgs = self.consumers[lane].consume(n, timeout)
        for m in msgs:
            err = m.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error (%s lane): %s", lane.value, err)
        return [m for m in msgs if m.error() is None]

    async def run(self, stop: asyncio.Event, idle_exit_s: float | None = None, grace_s: float = 30.0) -> None:
        """Process until ``stop`` is set (or nothing arrived for ``idle_exit_s``), then shut down cleanly.

        Idle time starts only when both lanes are assigned and a session timeout has passed since the
        last rebalance, so a batch run does not exit while a dead member's partitions are about to move
        to it (``--idle-exit`` means: the group has nothing left for this worker).
        """
        served = await self._served_model(stop)
        if served is None:
            return  # stopped before the model ever answered: nothing consumed
        self.model = model_info(served)
        self.model_version = f"{self.model.name}@{self.model.version}"
        await self._learn_pixel_budget()
        self.subscribe()
        last_activity = time.monotonic()
        try:
            while not stop.is_set():
                if self._fatal is not None:
                    raise FatalWorkerError(str(self._fatal)) from self._fatal
                self._poll(0)
                self._update_lag()
                self._probe_dependencies()
                self._flow_control()
                window = self._window()
                self._poll_schemas()
                got: list[Message] = []
                # realtime first: it may take the whole window
                q = flow.quotas(window, self._in_flight(), self._backfill_cap(window), self.w.batch_max_size)
                if q.realtime > 0 or self._lane_paused(Lane.REALTIME):  # paused consumers are still polled (callbacks, liveness)
                    got = self._consume(Lane.REALTIME, max(1, q.realtime), 0)
                    self._start_batch(got)
                    if got:
                        self._last_rt = time.monotonic()
                # backfill only up to its cap (the whole window when realtime is idle)
                q = flow.quotas(window, self._in_flight(), self._backfill_cap(window), self.w.batch_max_size)
                if q.backfill > 0 or self._lane_paused(Lane.BACKFILL):
                    # block briefly only when there is nothing else to do, and only for a few ms: a longer block here
                    # holds back realtime records that arrive meanwhile (a fetch from the broker brings one batch), and
                    # a worker whose records finish within a loop turn spent most of its time in that block
                    timeout = 0 if (self.jobs or got) else IDLE_BLOCK_S
                    bf = self._consume(Lane.BACKFILL, max(1, q.backfill), timeout)
                    self._start_batch(bf)
                    got += bf
                if got:
                    self.metrics.batch_size.observe(len(got))
                    last_activity = time.monotonic()
                if self.jobs:
                    last_activity = time.monotonic()
                    await asyncio.sleep(0.002)
                else:
                    if self._joined != set(self.consumers) or time.monotonic() - self._last_rebalance < self._settle_s:
                        # idle time counts only once both lanes are assigned and a session timeout has passed since the
                        # last rebalance: a member that died holding partitions is noticed only then (we get them next)
                        last_activity = time.monotonic()
                    elif idle_exit_s is not None and time.monotonic() - last_activity > idle_exit_s:
                        break
                    await asyncio.sleep(0)  # always yield: signal handlers and tasks run on this loop
        finally:
            await self._shutdown(grace_s)

    async def _served_model(self, stop: asyncio.Event) -> str | None:
        """The served model's name, waiting (probing with the breaker backoff) while the model is down."""
        backoff = Backoff(self.w.breaker_probe_s, self.w.breaker_probe_max_s)
        tries = 0
        while True:
            try:
                return await self.client.served_model()
            except InferenceUnavailableError as e:
                tries += 1
                log.warning("model not answering at start (%s); retrying (%d)", e, tries)
            try:
                await asyncio.wait_for(stop.wait(), backoff.delay(tries))
                return None
            except TimeoutError:
                continue

    async def _learn_pixel_budget(self) -> None:
        """Set the loader's image budget: ``vllm.max_pixels`` when configured, else the served model's processor
        config when its folder is readable here, else none (photos capped at 1024 px a side). Logged either way."""
        if self.s.vllm.max_pixels is not None:
            self.loader.budget = PixelBudget(self.s.vllm.max_pixels, source="OPAL_VLLM_MAX_PIXELS")
        else:
            try:
                self.loader.budget = await self.client.pixel_budget()
            except Exception as e:  # a gateway without /models, an odd answer: the budget is only an optimisation
                log.warning("could not read the served model's image budget (%s: %s); photos capped at 1024 px a side", type(e).__name__, e)
                return
        b = self.loader.budget
        if b is None:
            log.info("served model's image budget unknown (set OPAL_VLLM_MAX_PIXELS); photos capped at 1024 px a side")
        else:
            log.info(
                "photos resized on the worker to the served model's budget: %d px, sides in multiples of %d (%s)",
                b.max_pixels,
                b.factor,
                b.source,
            )

    async def _shutdown(self, grace_s: float) -> None:
        self._stopping.set()  # records waiting for a dependency give up their turn (not stored: replayed)
        # tansu 0.6 bug: a member that leaves while its JoinGroup is pending leaves the group stuck for every later
        # member (Apache Kafka handles it). So finish joining before leaving; records fetched meanwhile are not
        # stored and will be consumed again by the next owner.
        deadline = time.monotonic() + self.s.kafka.session_timeout_ms / 1000 + 10
        for lane, consumer in self.consumers.items():
            while lane not in self._joined and time.monotonic() < deadline:
                consumer.poll(0.1)
                await asyncio.sleep(0)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:  # a batch ending meanwhile hands its misses to tasks of their own: wait for those too
            tasks = {j.task for j in self.jobs.values() if j.task is not None and not j.task.done()}
            if not tasks:
                break
            await asyncio.wait(tasks, timeout=deadline - time.monotonic())
        deadline = time.monotonic() + grace_s
        while True:  # a report may produce again (a dead letter, a retry): flush until nothing is left
            self.producer.flush(max(0.0, deadline - time.monotonic()))
            self._poll(0)
            if (not self._reports and len(self.producer) == 0) or time.monotonic() >= deadline:
                break
        for task in self._probes():
            task.cancel()
        for consumer in self.consumers.values():
            self._commit(consumer)
            consumer.close()  # leaves the group
        self._decoder.shutdown(wait=False, cancel_futures=True)
        log.info("worker stopped; %d outputs, %d records handed back", self.outputs, len(self.jobs))

    # -- flow control (decisions in workers/flow_control.py) --------------------------------
    def _window(self) -> int:
        return flow.window(self._latencies, self.w.max_in_flight, self.w.max_model_latency_s)

    def _lane_in_flight(self, lane: Lane) -> int:
        return self._held[lane]

    def _in_flight(self) -> dict[Lane, int]:
        return dict(self._held)

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag_check < 0.2 or not self.assigned:
            return
        self._last_lag_check = now
        for lane, consumer in self.consumers.items():
            tps = [TopicPartition(t, p) for t, p in self.assigned if self.lanes.get(t) is lane]
            if not tps:
                continue
            try:
                positions = consumer.position(tps)
            except Exception:  # position() can fail mid-rebalance; lag is advisory
                continue
            for tp in positions:
                try:
                    low, high = consumer.get_watermark_offsets(tp, cached=True)
                except Exception:
                    continue
                if high is None or high < 0:
                    continue  # no fetch response yet: lag unknown
                if tp.offset >= 0:
                    lag = max(0, high - tp.offset)
                elif low is not None and low >= 0:
                    lag = max(0, high - low)  # nothing consumed yet: count the whole partition (conservative)
                else:
                    continue
                self._lag[(tp.topic, tp.partition)] = lag
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
                tracked = self.tracker.resume_at(tp.topic, tp.partition)
                resume_at = tracked if tracked is not None else tp.offset
                if resume_at is not None and resume_at >= 0:
                    self.metrics.commit_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - resume_at))
        oldest = min((j.consumed_at for j in self.jobs.values()), default=None)
        self.metrics.oldest_in_flight.set(0.0 if oldest is None else now - oldest)

    def _realtime_backlog(self) -> bool:
        rt = [tp for tp in self.assigned if self.lanes.get(tp[0]) is Lane.REALTIME]
        return flow.realtime_backlog(
            time.monotonic() - self._last_rt, self._lane_in_flight(Lane.REALTIME), (self._lag.get(tp) for tp in rt)
        )

    def _backfill_cap(self, window: int) -> int:
        return flow.backfill_cap(window, self.w.backfill_share, Lane.REALTIME in self._joined, self._realtime_backlog())

    def _flow_control(self) -> None:
        """Pause and resume partitions as :func:`workers.flow_control.partitions_to_pause` decides."""
        window = self._window()
        now = time.monotonic()
        held, bf, cap = len(self.jobs), self._lane_in_flight(Lane.BACKFILL), self._backfill_cap(window)
        self._full_since = (self._full_since or now) if held >= window else None
        self._capped_since = (self._capped_since or now) if bf >= cap else None
        want = flow.partitions_to_pause(
            self.assigned,
            self.lanes,
            self.paused,
            held=held,
            window_size=window,
            backfill_in_flight=bf,
            cap=cap,
            model_down=MODEL in self._deps and self._deps[MODEL].breaker.is_open,
            full_for_s=0.0 if self._full_since is None else now - self._full_since,
            capped_for_s=0.0 if self._capped_since is None else now - self._capped_since,
        )
        for lane, consumer in self.consumers.items():
            pause = [TopicPartition(t, p) for t, p in want - self.paused if self.lanes.get(t) is lane]
            resume = [TopicPartition(t, p) for t, p in (self.paused - want) & self.assigned if self.lanes.get(t) is lane]
            if pause:
                consumer.pause(pause)
            if resume:
                consumer.resume(resume)
        self.paused = want & self.assigned
        self.metrics.paused.set(len(self.paused))

    # -- dependencies (circuit breakers) ----------------------------------------------------
    def _dependency(self, name: str) -> _Dependency:
        dep = self._deps.get(name)
        if dep is None:
            probe = Backoff(self.w.breaker_probe_s, self.w.breaker_probe_max_s)
            dep = self._deps[name] = _Dependency(CircuitBreaker(name, self.w.breaker_failures, probe))
            dep.closed.set()
        return dep

    def _answered(self, name: str) -> None:
        """A request through ``name`` succeeded (no breaker is created for a dependency that never failed)."""
        dep = self._deps.get(name)
        if dep is not None:
            was_open = dep.breaker.is_open
            dep.breaker.success()
            dep.closed.set()
            self.metrics.breaker_open.labels(name).set(0)
            if was_open:
                log.warning("dependency %s answers again; resuming", name)

    def _trip(self, dep: _Dependency, error: OpalError) -> None:
        """Open ``dep`` (idempotent); the first call after the breaker opened (itself, on a failure,
        or here) makes records wait and counts the trip: ``dep.closed`` still set means not yet done."""
        dep.breaker.trip(str(error))
        if not dep.closed.is_set():
            return
        dep.closed.clear()
        self.metrics.breaker_trips.labels(dep.breaker.name).inc()
        self.metrics.breaker_open.labels(dep.breaker.name).set(1)
        action = "pausing all partitions" if dep.breaker.name == MODEL else "holding its records"
        log.warning("dependency %s is down (%s); %s and probing", dep.breaker.name, clean_message(str(error), 300), action)

    def _probes(self) -> list[asyncio.Task[None]]:
        return [t for t in self._probe_tasks if not t.done()]

    def _probe_dependencies(self) -> None:
        """Start one probe per open breaker whose probe is due (at most one at a time each)."""
        for name, dep in self._deps.items():
            if dep.breaker.probe_due() and not dep.probing:
                dep.probing = True
                task = asyncio.create_task(self._probe(name, dep))
                self._probe_tasks = {*self._probes(), task}

    async def _probe(self, name: str, dep: _Dependency) -> None:
        try:
            if name == MODEL:
                await self.client.probe()
            else:
                await self.loader.probe(name)
        except Exception as e:  # any failure of a probe means: still down
            dep.breaker.probe_failed(f"{type(e).__name__}: {e}")
            self.metrics.probes.labels(name, "down").inc()
        else:
            self.metrics.probes.labels(name, "up").inc()
            self._answered(name)
        finally:
            dep.probing = False

    async def _wait_for(self, dep: _Dependency, limit_s: float | None) -> bool:
        """Wait until ``dep`` is closed (or ``limit_s`` passed); False when the worker is stopping instead."""
        if not dep.breaker.is_open:
            return True
        closed = asyncio.ensure_future(dep.closed.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({closed, stopping}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            stopping.cancel()
        return not self._stopping.is_set()

    # -- per poll batch ----------------------------------------------------------------------
    def _start_batch(self, msgs: list[Message]) -> None:
        """Hold a poll batch's records and start one task for all of them (:meth:`_run_batch`)."""
        if not msgs:
            return
        jobs = [self._start(m) for m in msgs]
        task = asyncio.create_task(self._run_batch(jobs))
        task.add_done_callback(self._task_done)
        for job in jobs:
            job.task = task

    def _start(self, msg: Message) -> _Job:
        """Hold one record: tracked for its offset, counted in its lane's window."""
        topic, part, off = msg.topic(), msg.partition(), msg.offset()
        lane = self._lane_of(topic)
        self._m_consumed[lane].inc()
        self.tracker.add(topic, part, off)
        job = _Job(msg, lane, time.monotonic())
        replaced = self.jobs.get((topic, part, off))
        if replaced is not None:  # consumed again after a rebalance while its first copy is still out
            self._held[replaced.lane] -= 1
        self.jobs[(topic, part, off)] = job
        self._held[lane] += 1
        self._m_in_flight[lane].inc()
        return job

    def _spawn(self, job: _Job) -> None:
        """Give a record a task of its own (:meth:`_process`): a cache miss, or a failure of the batch pass."""
        job.task = asyncio.create_task(self._process(job))
        job.task.add_done_callback(self._task_done)

    async def _run_batch(self, jobs: list[_Job]) -> None:
        """A poll batch's cache hits, stage by stage, in one task: decode every record, read and header-check its
        images (local files in place, http(s) fetches concurrently), one MGET for the batch, then build, encode and
        produce each hit. No pixel is decoded and no task is made per record on this path.

        A record that misses the cache, or fails at any stage, continues in a task of its own (:meth:`_process`),
        keeping what was done (decoded event, fetched bytes); a stage's failure is handled there as its first
        attempt's, so retries, breakers and dead letters have one code path. Outputs go out as on that path: the
        offset is stored once the broker acknowledged them (:meth:`_deliveries`).
        """
        fallback = self.w.generic_fallback
        per_prompt = self.s.vllm.images_per_prompt
        ready: list[tuple[_Job, ListingImageEvent]] = []
        remote: list[tuple[_Job, ListingImageEvent]] = []
        for job in jobs:
            try:
                event = job.event = decode_listing_event(job.msg, self.codec, self.categories, fallback)
                job.listing_id = event.listing_id
                t0 = time.perf_counter()
                local = [self.loader.fetch_local(img.uri) for img in event.images[:per_prompt]]
                if any(f is None for f in local):
                    remote.append((job, event))  # an http(s) image: fetched after the local records are out
                    continue
                job.fetched = [f for f in local if f is not None]
                job.image_ms = (time.perf_counter() - t0) * 1000
                ready.append((job, event))
            except Exception as e:
                job.error = e
                self._spawn(job)
        await self._look_up_and_produce(ready)  # local hits do not wait for a slow image host
        if remote:
            fetched = await asyncio.gather(*(self._fetch_images(event, job) for job, event in remote), return_exceptions=True)
            ready = []
            for (job, event), result in zip(remote, fetched, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, Exception):  # cancelled: the batch task ends cancelled (see _task_done)
                        raise result
                    job.error = result
                    self._spawn(job)
                else:
                    ready.append((job, event))
            await self._look_up_and_produce(ready)

    async def _look_up_and_produce(self, ready: list[tuple[_Job, ListingImageEvent]]) -> None:
        """One MGET for ``ready`` (records whose images are fetched), then each hit built, encoded and produced; a
        miss or a failure goes to a task of its own (:meth:`_spawn`), the look-up done (it is not repeated)."""
        fallback = self.w.generic_fallback
        keyed: list[tuple[_Job, ListingImageEvent, CategorySchema, str]] = []
        for job, event in ready:
            try:
                schema = self.categories.resolve(event.category, fallback)
                keyed.append((job, event, schema, images_digest([f.sha256 for f in job.fetched or ()])))
            except Exception as e:  # the schema set changed while http images were fetched
                job.error = e
                self._spawn(job)
        if not keyed:
            return
        if self.cache is not None:
            cached = await self.cache.get_many([(self.model_version, schema.key, digest) for _, _, schema, digest in keyed])
        else:
            cached = [None] * len(keyed)
        hits = misses = 0
        for (job, event, schema, digest), entry in zip(keyed, cached, strict=True):
            if entry is None:
                misses += 1
                job.looked_up = self.cache is not None
                self._spawn(job)  # to the model
                continue
            hits += 1
            try:
                out = self._hit_event(event, job, schema, digest, entry, job.image_ms)
                self._produce(job, self.s.topics.aspects, event.listing_id.encode(), self.aspect_codec.encode(out), None)
            except Exception as e:  # e.g. an output over the size limit: a dead letter from the record's own task
                job.error = e
                self._spawn(job)
        self.metrics.cache_hits.inc(hits)
        if self.cache is not None:
            self.metrics.cache_misses.inc(misses)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A record's task must end in an output or a fatal stop; an escaped exception is fatal (replay), and so is a
        task cancelled while the worker is not stopping (its records would hold the window and their partitions'
        stored prefix without an output)."""
        if self._fatal is not None:
            return
        if task.cancelled():
            if not self._stopping.is_set():
                self._fatal = FatalWorkerError("a record task was cancelled; its records were not stored and will replay")
        elif task.exception() is not None:
            self._fatal = task.exception()

    async def _process(self, job: _Job) -> None:
        """One record to exactly one output (or a fatal stop). Never raises for bad input."""
        msg = job.msg
        marks: dict[str, int] = {}  # per dependency: its answer count at this record's first failure
        waited_since: float | None = None  # when this record first waited for a dependency other than the model
        while True:
            job.attempts += 1
            try:
                if job.error is not None:  # the batch pass failed on this record: this attempt's failure
                    error, job.error = job.error, None
                    raise error
                event = job.event or decode_listing_event(msg, self.codec, self.categories, self.w.generic_fallback)
                job.event, job.listing_id = event, event.listing_id
                out = await self._enrich(event, job)
                self._produce(job, self.s.topics.aspects, event.listing_id.encode(), self.aspect_codec.encode(out), None)
                return
            except OpalError as e:
                if e.dependency is not None:
                    dep = self._dependency(e.dependency)
                    marks.setdefault(e.dependency, dep.breaker.mark())
                    if not getattr(e, "_opal_counted", False):  # a shared (single-flight) failure counts once
                        e._opal_counted = True  # type: ignore[attr-defined]
                        dep.breaker.failure(str(e))  # may open it: handled just below
                    spent = job.attempts >= self.w.max_attempts or not e.retriable
                    if dep.breaker.is_open or (spent and not dep.breaker.specific_to_record(marks[e.dependency])):
                        # an outage, not this record: wait for the dependency without spending an attempt
                        self._trip(dep, e)
                        job.attempts -= 1
                        limit: float | None = None
                        if e.dependency != MODEL:  # an image host may be gone for good: bounded wait
                            waited_since = waited_since or time.monotonic()
                            limit = self.w.image_host_max_wait_s - (time.monotonic() - waited_since)
                            if limit <= 0:
                                self._dead_letter(job, type(e)(f"{e} (host down for {self.w.image_host_max_wait_s:.0f} s)", e.dependency))
                                return
                        self.metrics.dependency_waits.labels(e.dependency).inc()
                        if not await self._wait_for(dep, limit):
                            return  # stopping: no output, offset not stored, the record is replayed
                        job.attempts = 0  # failures before the outage were probably the outage: a full budget again
                        continue
                if e.retriable and job.attempts < self.w.max_attempts:
                    self.metrics.retries.labels(str(e.reason)).inc()
                    await asyncio.sleep(self._retry.delay(job.attempts))
                    continue
                self._dead_letter(job, e)
                return
            except Exception as e:  # a bug must not drop the record: dead-letter it with the reason
                if self._stopping.is_set():  # clients closing under it: not the record's fault; not stored, replayed
                    log.warning(
                        "%s left without an output at shutdown (%s: %s); replayed by the next owner", _where(msg), type(e).__name__, e
                    )
                    return
                log.exception("unexpected error processing %s[%d]@%d", msg.topic(), msg.partition(), msg.offset())
                err = OpalError(f"{type(e).__name__}: {e}")
                err.reason = ErrorKind.INTERNAL
                self._dead_letter(job, err)
                return

    async def _fetch_images(self, event: ListingImageEvent, job: _Job) -> list[FetchedImage]:
        """The record's images, fetched and header-checked once (no pixel decoded: a cache hit needs none); a retry
        reuses them (a retry after a failed fetch fetches again, since nothing was kept)."""
        if job.fetched is not None:
            return job.fetched
        t0 = time.perf_counter()
        fetched = []
        for img in event.images[: self.s.vllm.images_per_prompt]:
            fetched.append(await self.loader.fetch(img.uri))
            if img.uri.startswith(("http://", "https://")) and self._deps:
                self._answered(host_dependency(urllib.parse.urlsplit(img.uri)))
        job.fetched = fetched
        job.image_ms = (time.perf_counter() - t0) * 1000
        return fetched

    async def _prepared(self, job: _Job) -> list[PreparedImage]:
        """The fetched images fully decoded and normalised (bombs and truncated bodies refused) before any model
        request; once per record, off the event loop (a 3 MP JPEG costs ~40 ms of CPU)."""
        if job.images is None:
            assert job.fetched is not None
            loop = asyncio.get_running_loop()
            job.images = [await loop.run_in_executor(self._decoder, self.loader.prepare, f) for f in job.fetched]
            job.fetched = [FetchedImage(b"", f.header) for f in job.fetched]  # the raw bytes are not needed again
        return job.images

    async def _generate(
        self, images: list[PreparedImage], schema: CategorySchema, digest: str
    ) -> tuple[InferenceResult, list[AspectValue]]:
        """The model's answer for (version, category schema, images), stored in the cache before it is shared.

        Concurrent callers with the same key share one request (single flight); the flight
        ends only after the cache write, so a later caller finds the cached result instead.
        """
        key = (self.model_version, schema.key, digest)
        shared = self._flights.get(key)
        if shared is not None:
            self.metrics.coalesced.inc()
            result = await asyncio.shield(shared)
            return result, _aspects(result)
        fut: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        self._flights[key] = fut
        self.metrics.model_requests.inc()
        try:
            t1 = time.perf_counter()
            result = await self.client.generate(images, schema)
            latency = time.perf_counter() - t1
            self._latencies.append(latency)
            self.metrics.model_latency.observe(latency)
            self._answered(MODEL)
            aspects = _aspects(result)
            if self.cache is not None:
                cached = CachedListing(
                    result.listing.title,
                    [(a.name, a.value, a.confidence) for a in aspects],
                    unknown_keys=result.check.unknown_keys,
                    invalid_values=result.check.invalid_values,
                    model_name=result.model.name,
                    model_version=result.model.version,
                    missing_required=result.check.missing_required,
                )
                await self.cache.put(self.model_version, schema.key, digest, cached)
        except asyncio.CancelledError:
            # sharers must not end cancelled (a cancelled task has no output): they see an outage and wait or retry
            fut.set_exception(InferenceUnavailableError("the shared model request was cancelled"))
            fut.exception()
            raise
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody shared it
            raise
        else:
            fut.set_result(result)
        finally:
            self._flights.pop(key, None)
        return result, aspects

    async def _enrich(self, event: ListingImageEvent, job: _Job) -> AspectEvent:
        fetched = await self._fetch_images(event, job)
        image_ms = job.image_ms
        digest = images_digest([f.sha256 for f in fetched])
        schema = self.categories.resolve(event.category, self.w.generic_fallback)
        if job.looked_up:  # the batch pass just missed (and counted it); a retry looks again
            job.looked_up = False
        elif self.cache is not None:
            cached = await self.cache.get(self.model_version, schema.key, digest)
            if cached is not None:
                self.metrics.cache_hits.inc()
                return self._hit_event(event, job, schema, digest, cached, image_ms)
            self.metrics.cache_misses.inc()
        t0 = time.perf_counter()
        images = await self._prepared(job)
        image_ms += (time.perf_counter() - t0) * 1000
        result, aspects = await self._generate(images, schema, digest)
        timings = Timings(queued_ms=result.queued_ms, image_ms=image_ms, inference_ms=result.inference_ms)
        return self._aspect_event(event, job, schema, digest, result.listing.title, aspects, result.model, result.check, timings, False)

    @classmethod
    def _hit_event(
        cls, event: ListingImageEvent, job: _Job, schema: CategorySchema, digest: str, cached: CachedListing, image_ms: float
    ) -> AspectEvent:
        """The AspectEvent of a cache hit: the stored listing and the schema check it got when generated."""
        check = SchemaCheck(
            valid=cached.valid,
            unknown_keys=cached.unknown_keys,
            invalid_values=cached.invalid_values,
            missing_required=cached.missing_required,
        )
        aspects = [AspectValue(name=n, value=v, confidence=c) for n, v, c in cached.aspects]
        model = ModelInfo(name=cached.model_name, version=cached.model_version)
        return cls._aspect_event(event, job, schema, digest, cached.title, aspects, model, check, Timings(image_ms=image_ms), True)

    @staticmethod
    def _aspect_event(
        event: ListingImageEvent,
        job: _Job,
        schema: CategorySchema,
        digest: str,
        title: str,
        aspects: list[AspectValue],
        model: ModelInfo,
        check: SchemaCheck,
        timings: Timings,
        cache_hit: bool,
    ) -> AspectEvent:
        """The AspectEvent of a record, from the model or from the cache (which has no model times)."""
        return AspectEvent(
            listing_id=event.listing_id,
            source_event_id=event.event_id,
            category=event.category,
            title=title,
            aspects=aspects,
            model=model,
            schema_check=check,
            image_sha256=digest,
            cache_hit=cache_hit,
            timings=timings.model_copy(update={"total_ms": (time.monotonic() - job.consumed_at) * 1000}),
            category_schema=schema.ref,
            generic_schema=schema.generic,
            **_judge_context(event),
        )

    # -- output ----------------------------------------------------------------------------
    def _dead_letter(self, job: _Job, error: OpalError) -> None:
        """Produce the record's DeadLetter; any failure to hand it to the producer is fatal (replay)."""
        dl = dead_letter_for(
            job.msg, error, attempts=max(1, job.attempts), listing_id=job.listing_id, max_value_bytes=self.w.dead_letter_max_value_bytes
        )
        try:
            self._produce(job, self.s.topics.dead_letters, dl.key, self.dl_codec.encode(dl), str(error.reason))
        except KafkaException as e:
            self._fatal = FatalWorkerError(f"dead letter for {_where(job.msg)} not accepted by the producer: {e}; offset not stored")

    def _produce(self, job: _Job, topic: str, key: bytes | None, value: bytes, dead_reason: str | None, tries: int = 1) -> None:
        """Hand one output to the producer; the delivery report is handled by :meth:`_deliveries`.

        An AspectEvent over librdkafka's ``message.max.bytes`` raises :class:`OutputTooLargeError`
        (the caller dead-letters the record). Any other refusal of an AspectEvent sets the fatal
        stop; a dead letter the producer refuses raises KafkaException (the caller makes it fatal).
        """

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            # runs inside producer.poll()/flush(): only record the report, never produce from here
            self._reports.append(_Report(job, topic, key, value, dead_reason, tries, err))

        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: serve callbacks, then try again
                self._poll(0.05)
            except KafkaException as e:
                code = e.args[0].code() if e.args and isinstance(e.args[0], KafkaError) else None
                if dead_reason is None and code in _TOO_LARGE:
                    raise OutputTooLargeError(f"AspectEvent of {len(value)} bytes is over the producer's message.max.bytes") from None
                if dead_reason is None:
                    self._fatal = FatalWorkerError(f"produce to {topic} failed for {_where(job.msg)}: {e}; offset not stored")
                    return
                raise

    def _poll(self, timeout: float = 0) -> None:
        """Serve delivery callbacks, then act on their reports (outside librdkafka's callback)."""
        self.producer.poll(timeout)
        self._deliveries()

    def _deliveries(self) -> None:
        """Act on delivery reports: success stores the offset; a refused output is handled once, here.

        A broker refusing a produce request as too large refuses its whole batch, so an output is
        dead-lettered as ``output_too_large`` only when it alone is over ``_BROKER_SAFE_BYTES``;
        a smaller one is produced again on its own (up to 3 tries), then the worker stops (replay).
        """
        produced = 0
        while self._reports:
            reports, self._reports = self._reports, []
            for r in reports:
                if r.err is None:
                    if r.dead_reason is None:
                        produced += 1
                    else:
                        self.metrics.dead_lettered.labels(r.dead_reason).inc()
                    self._finish(r.job)
                    continue
                size = len(r.value) + len(r.key or b"")
                if r.err.code() in _TOO_LARGE and r.dead_reason is None and size > _BROKER_SAFE_BYTES:
                    self._dead_letter(r.job, OutputTooLargeError(f"AspectEvent of {size} bytes refused by the broker: {r.err.str()}"))
                elif r.err.code() in _TOO_LARGE and r.tries < 3:
                    try:
                        self._produce(r.job, r.topic, r.key, r.value, r.dead_reason, r.tries + 1)  # its batch was refused, not it
                    except Exception as e:
                        self._fatal = FatalWorkerError(f"produce to {r.topic} failed again for {_where(r.job.msg)}: {e}; offset not stored")
                else:
                    self._fatal = FatalWorkerError(
                        f"produce to {r.topic} failed for {_where(r.job.msg)}: {r.err}; offset not stored, will replay"
                    )
        if produced:
            self.metrics.produced.inc(produced)
        self._store_offsets()

    def _finish(self, job: _Job) -> None:
        """The record's output is acknowledged: release it; its offset is stored with the others of this round of
        reports (:meth:`_store_offsets`) once every offset before it on its partition has finished too."""
        msg = job.msg
        key = (msg.topic(), msg.partition(), msg.offset())
        released = self.jobs.pop(key, None)
        if released is not None:
            self._held[released.lane] -= 1
        self.outputs += 1
        self._m_in_flight[job.lane].dec()
        nxt = self.tracker.finish(*key)
        if nxt is not None:
            self._to_store[(key[0], key[1])] = nxt

    def _store_offsets(self) -> None:
        """Store the newest finished prefix of each partition still assigned: one call per lane's consumer."""
        if not self._to_store:
            return
        todo, self._to_store = self._to_store, {}
        for lane, consumer in self.consumers.items():
            tps = [TopicPartition(t, p, o) for (t, p), o in todo.items() if (t, p) in self.assigned and self._lane_of(t) is lane]
            if tps:
                try:
                    consumer.store_offsets(offsets=tps)
                except Exception as e:
                    log.warning("could not store offsets %s: %s", [(tp.topic, tp.partition, tp.offset) for tp in tps], e)

    def _commit(self, consumer: Consumer) -> None:
        """Synchronously commit what has been stored (nothing stored is not an error)."""
        try:
            consumer.commit(asynchronous=False)
        except Exception as e:
            log.debug("commit: %s", e)


def _aspects(result: InferenceResult) -> list[AspectValue]:
    conf = result.aspect_confidence
    return [AspectValue(name=n, value=v, confidence=conf.get(n, 0.0)) for n, v in result.listing.aspects.items()]


def _where(msg: Message) -> str:
    return f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"


def _judge_context(event: ListingImageEvent) -> dict[str, Any]:
    """What the judge needs besides the output: the images and the seller's listing (AspectEvent v2 fields)."""
    return {"images": event.images, "seller_title": event.seller_title, "seller_aspects": event.seller_aspects}


def build_worker(settings: OpalSettings, metrics: WorkerMetrics | None = None) -> EnrichWorker:
    """An EnrichWorker with real clients from settings (Kafka, Redis, vLLM endpoints)."""
    from schemas.serde import CodecSet
    from topology.declared import enrich_group_id
    from workers.kafka_clients import make_consumer, make_producer

    if not settings.vllm.endpoints:
        raise ValueError("no vLLM endpoint: set OPAL_VLLM_ENDPOINTS (see `opal serve`)")
    w = settings.worker
    codecs = CodecSet.of(settings.kafka)
    client = ListingClient(
        settings.vllm.endpoints,
        model=settings.vllm.model,
        api_key=settings.vllm.api_key.get_secret_value() if settings.vllm.api_key else None,
        max_concurrency=min(settings.vllm.max_concurrency, w.max_in_flight),
        timeout_s=settings.vllm.request_timeout_s,
        # failover only (each endpoint once per call, no sleeping): the worker owns retries in time (schemas/retry.py)
        max_retries=len(settings.vllm.endpoints) - 1,
        backoff_base_s=0.0,
        max_image_bytes=w.image_max_bytes,
        max_image_pixels=w.image_max_pixels,
        repetition_penalty=settings.vllm.repetition_penalty,
        frequency_penalty=settings.vllm.frequency_penalty,
    )
    loader = ImageLoader.from_settings(w)
    cache = ResultCache(settings.redis.url_value(), settings.redis.cache_ttl_s, settings.redis.key_prefix) if settings.redis.url else None
    return EnrichWorker(
        settings,
        # one consumer (and group) per lane: pausing or draining one lane never touches the other's fetch queue
        consumers={lane: make_consumer(settings.kafka, enrich_group_id(w.group_id, lane)) for lane in (Lane.REALTIME, Lane.BACKFILL)},
        producer=make_producer(settings.kafka),
        client=client,
        loader=loader,
        cache=cache,
        categories=SchemaWatcher(settings.schemas.paths, settings.schemas.reload_s),
        codec=codecs[ListingImageEvent],
        aspect_codec=codecs[AspectEvent],
        dl_codec=codecs[DeadLetter],
        metrics=metrics,
    )


async def run_worker(
    settings: OpalSettings, stop: asyncio.Event, idle_exit_s: float | None = None, metrics: WorkerMetrics | None = None
) -> EnrichWorker:
    """Build, run until ``stop`` (or idle), close clients. Returns the worker for its counters.

    In the main thread SIGHUP makes the worker re-read its schema files before the next record."""
    worker = build_worker(settings, metrics)
    loop = asyncio.get_running_loop()
    hup = False
    if worker.schemas is not None and hasattr(signal, "SIGHUP"):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread: no handler
            loop.add_signal_handler(signal.SIGHUP, worker.schemas.request_reload)
            hup = True
    async with worker.client:
        try:
            await worker.run(stop, idle_exit_s=idle_exit_s)
        finally:
            await worker.loader.aclose()
            if worker.cache is not None:
                await worker.cache.aclose()
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
    return worker
