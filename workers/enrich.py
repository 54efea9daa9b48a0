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
- Retriable failures (image fetch timeouts/5xx, model unavailable, schema registry
  down) are retried in place with exponential backoff up to ``worker.max_attempts``,
  then dead-lettered with the attempt count. Everything else is dead-lettered at once.
- A failed *produce* (broker refused the output after librdkafka's own retries) is
  fatal: the worker stops without storing that offset, so the record is replayed.

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
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from inference.client import InferenceResult, ListingClient, model_info
from schemas.category import CategoryRegistry
from schemas.errors import ErrorKind, OpalError
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
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from workers.image_loader import ImageLoader
from workers.intake import dead_letter_for, decode_listing_event
from workers.metrics import WorkerMetrics
from workers.result_cache import CachedListing, ResultCache, images_digest

log = logging.getLogger(__name__)


class FatalWorkerError(RuntimeError):
    """The worker cannot continue without risking loss (e.g. an output was not stored)."""


@dataclass
class _Partition:
    """Offsets of one partition: which are in flight, which are done."""

    pending: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    next_to_commit: int | None = None  # lowest offset not yet done and stored

    def add(self, offset: int) -> None:
        if self.next_to_commit is None or offset < self.next_to_commit:
            self.next_to_commit = offset
        self.pending.add(offset)

    def finish(self, offset: int) -> int | None:
        """Mark done; returns the new offset to store (next to consume) when the prefix advanced."""
        self.pending.discard(offset)
        self.done.add(offset)
        advanced = None
        while self.next_to_commit is not None and self.next_to_commit in self.done:
            self.done.discard(self.next_to_commit)
            self.next_to_commit += 1
            advanced = self.next_to_commit
        return advanced


class OffsetTracker:
    """Contiguous-prefix offset storing across partitions (pure bookkeeping)."""

    def __init__(self) -> None:
        self.partitions: dict[tuple[str, int], _Partition] = {}

    def add(self, topic: str, partition: int, offset: int) -> None:
        self.partitions.setdefault((topic, partition), _Partition()).add(offset)

    def finish(self, topic: str, partition: int, offset: int) -> int | None:
        p = self.partitions.get((topic, partition))
        return None if p is None else p.finish(offset)

    def drop(self, topic: str, partition: int) -> None:
        self.partitions.pop((topic, partition), None)


@dataclass
class _Job:
    msg: Message
    lane: Lane
    consumed_at: float
    task: asyncio.Task[None] | None = None


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
        categories: CategoryRegistry,
        codec: EventCodec[ListingImageEvent],
        aspect_codec: EventCodec[AspectEvent],
        dl_codec: EventCodec[DeadLetter],
        metrics: WorkerMetrics | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.s = settings
        self.w = settings.worker
        self.consumers = consumers
        self.producer = producer
        self.client = client
        self.loader = loader
        self.cache = cache
        self.categories = categories
        self.codec = codec
        self.aspect_codec = aspect_codec
        self.dl_codec = dl_codec
        self.metrics = metrics or WorkerMetrics()
        self._sleep = sleep
        self.tracker = OffsetTracker()
        self.jobs: dict[tuple[str, int, int], _Job] = {}
        self.assigned: set[tuple[str, int]] = set()
        self.paused: set[tuple[str, int]] = set()
        self.model_version = ""
        self.model = ModelInfo(name="", version="")
        self._fatal: BaseException | None = None
        self._latencies: deque[float] = deque(maxlen=50)
        self._lag: dict[tuple[str, int], int] = {}
        self._last_lag_check = 0.0
        self.lanes = {settings.topics.images_realtime: Lane.REALTIME, settings.topics.images_backfill: Lane.BACKFILL}
        self.outputs = 0
        self._last_rt = 0.0  # when the realtime lane last delivered records
        self._joined: set[Lane] = set()  # lanes whose consumer completed a group join

    # -- lifecycle -------------------------------------------------------------------------
    def _consumer_of(self, topic: str) -> Consumer:
        return self.consumers[self.lanes.get(topic, Lane.BACKFILL)]

    def subscribe(self) -> None:
        for lane, consumer in self.consumers.items():
            topic = self.s.topics.images_realtime if lane is Lane.REALTIME else self.s.topics.images_backfill
            consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke)

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._joined |= {lane for lane, c in self.consumers.items() if c is consumer}  # also on an empty assignment
        for tp in parts:
            self.assigned.add((tp.topic, tp.partition))
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in parts))

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._commit(consumer)
        for tp in parts:
            key = (tp.topic, tp.partition)
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
        """Process until ``stop`` is set (or nothing arrived for ``idle_exit_s``), then shut down cleanly."""
        self.model = model_info(await self.client.served_model())
        self.model_version = f"{self.model.name}@{self.model.version}"
        self.subscribe()
        last_activity = time.monotonic()
        try:
            while not stop.is_set():
                if self._fatal is not None:
                    raise FatalWorkerError(str(self._fatal)) from self._fatal
                self.producer.poll(0)
                self._update_lag()
                self._flow_control()
                window = self._window()
                got: list[Message] = []
                # realtime first: it may take the whole window
                space = window - len(self.jobs)
                if space > 0 or self._lane_paused(Lane.REALTIME):  # paused consumers are still polled (callbacks, liveness)
                    got = self._consume(Lane.REALTIME, max(1, min(space, self.w.batch_max_size)), 0)
                    for m in got:
                        self._start(m)
                    if got:
                        self._last_rt = time.monotonic()
                # backfill only up to its cap (the whole window when realtime is idle)
                room = min(window - len(self.jobs), self._backfill_cap(window) - self._lane_in_flight(Lane.BACKFILL))
                if room > 0 or self._lane_paused(Lane.BACKFILL):
                    timeout = 0 if (self.jobs or got) else 0.1  # block briefly only when there is nothing else to do
                    bf = self._consume(Lane.BACKFILL, max(1, min(room, self.w.batch_max_size)), timeout)
                    for m in bf:
                        self._start(m)
                    got += bf
                if got:
                    self.metrics.batch_size.observe(len(got))
                    last_activity = time.monotonic()
                if self.jobs:
                    last_activity = time.monotonic()
                    await self._sleep(0.002)
                else:
                    if self._joined != set(self.consumers):
                        last_activity = time.monotonic()  # idle time counts only once both lanes are assigned
                    elif idle_exit_s is not None and time.monotonic() - last_activity > idle_exit_s:
                        break
                    await self._sleep(0)  # always yield: signal handlers and tasks run on this loop
        finally:
            await self._shutdown(grace_s)

    async def _shutdown(self, grace_s: float) -> None:
        # tansu 0.6 bug: a member that leaves while its JoinGroup is pending leaves the group stuck for every later
        # member (Apache Kafka handles it). So finish joining before leaving; records fetched meanwhile are not
        # stored and will be consumed again by the next owner.
        deadline = time.monotonic() + self.s.kafka.session_timeout_ms / 1000 + 10
        for lane, consumer in self.consumers.items():
            while lane not in self._joined and time.monotonic() < deadline:
                consumer.poll(0.1)
                await self._sleep(0)
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        self.producer.flush(grace_s)
        self.producer.poll(0)
        for consumer in self.consumers.values():
            self._commit(consumer)
            consumer.close()  # leaves the group
        log.info("worker stopped; %d outputs, %d records handed back", self.outputs, len(self.jobs))

    # -- flow control ----------------------------------------------------------------------
    def _window(self) -> int:
        lat = sorted(self._latencies)
        if lat and self.w.max_model_latency_s and lat[len(lat) // 2] > self.w.max_model_latency_s:
            return max(1, self.w.max_in_flight // 4)
        return self.w.max_in_flight

    def _lane_in_flight(self, lane: Lane) -> int:
        return sum(1 for j in self.jobs.values() if j.lane is lane)

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

    def _realtime_backlog(self) -> bool:
        """True unless every assigned realtime partition is known to be drained (unknown lag counts as backlog)."""
        if time.monotonic() - self._last_rt < 0.5 or self._lane_in_flight(Lane.REALTIME) > 0:
            return True
        rt = [tp for tp in self.assigned if self.lanes.get(tp[0]) is Lane.REALTIME]
        return any(self._lag.get(tp, 1) > 0 for tp in rt)

    def _backfill_cap(self, window: int) -> int:
        if Lane.REALTIME not in self._joined:
            return 0  # until the realtime lane has joined, its backlog is unknown: take no backfill
        return max(1, int(window * self.w.backfill_share)) if self._realtime_backlog() else window

    def _flow_control(self) -> None:
        """Pause what must not be fetched: everything when the window is full (resume at half),
        backfill when it holds its share while realtime has backlog."""
        window = self._window()
        all_paused = bool(self.assigned) and self.paused >= self.assigned
        full = len(self.jobs) >= window or (all_paused and len(self.jobs) > window // 2)
        if full:
            want = set(self.assigned)
        elif self._lane_in_flight(Lane.BACKFILL) >= self._backfill_cap(window):
            want = {tp for tp in self.assigned if self.lanes.get(tp[0]) is Lane.BACKFILL}
        else:
            want = set()
        for lane, consumer in self.consumers.items():
            pause = [TopicPartition(t, p) for t, p in want - self.paused if self.lanes.get(t) is lane]
            resume = [TopicPartition(t, p) for t, p in (self.paused - want) & self.assigned if self.lanes.get(t) is lane]
            if pause:
                consumer.pause(pause)
            if resume:
                consumer.resume(resume)
        self.paused = want & self.assigned
        self.metrics.paused.set(len(self.paused))

    # -- per record ------------------------------------------------------------------------
    def _start(self, msg: Message) -> None:
        topic, part, off = msg.topic(), msg.partition(), msg.offset()
        lane = self.lanes.get(topic, Lane.BACKFILL)
        self.metrics.consumed.labels(lane.value).inc()
        self.tracker.add(topic, part, off)
        job = _Job(msg, lane, time.monotonic())
        self.jobs[(topic, part, off)] = job
        self.metrics.in_flight.labels(lane.value).inc()
        job.task = asyncio.create_task(self._process(job))

    async def _process(self, job: _Job) -> None:
        msg = job.msg
        attempts = 0
        listing_id: str | None = None
        while True:
            attempts += 1
            try:
                event = decode_listing_event(msg, self.codec, self.categories)
                listing_id = event.listing_id
                out = await self._enrich(event, job)
                self._produce(job, self.s.topics.aspects, event.listing_id.encode(), self.aspect_codec.encode(out), None)
                return
            except OpalError as e:
                if e.retriable and attempts < self.w.max_attempts:
                    self.metrics.retries.labels(str(e.reason)).inc()
                    await self._sleep(min(30.0, self.w.retry_backoff_s * 2 ** (attempts - 1)))
                    continue
                self._dead_letter(job, e, attempts, listing_id)
                return
            except Exception as e:  # a bug must not drop the record: dead-letter it with the reason
                log.exception("unexpected error processing %s[%d]@%d", msg.topic(), msg.partition(), msg.offset())
                err = OpalError(f"{type(e).__name__}: {e}")
                err.reason = ErrorKind.INTERNAL
                self._dead_letter(job, err, attempts, listing_id)
                return

    async def _enrich(self, event: ListingImageEvent, job: _Job) -> AspectEvent:
        t0 = time.perf_counter()
        images = [await self.loader.load(img.uri) for img in event.images[: self.s.vllm.images_per_prompt]]
        image_ms = (time.perf_counter() - t0) * 1000
        digest = images_digest(images)
        cached = await self.cache.get(self.model_version, event.category, digest) if self.cache else None
        if cached is not None:
            self.metrics.cache_hits.inc()
            return AspectEvent(
                listing_id=event.listing_id,
                source_event_id=event.event_id,
                category=event.category,
                title=cached.title,
                aspects=[AspectValue(name=n, value=v, confidence=c) for n, v, c in cached.aspects],
                model=ModelInfo(name=cached.model_name, version=cached.model_version),
                schema_check=SchemaCheck(valid=True),
                image_sha256=digest,
                cache_hit=True,
                timings=Timings(image_ms=image_ms, total_ms=(time.monotonic() - job.consumed_at) * 1000),
                **_judge_context(event),
            )
        self.metrics.cache_misses.inc()
        self.metrics.model_requests.inc()
        t1 = time.perf_counter()
        result: InferenceResult = await self.client.generate(images, event.category)
        latency = time.perf_counter() - t1
        self._latencies.append(latency)
        self.metrics.model_latency.observe(latency)
        aspects = [AspectValue(name=n, value=v, confidence=result.aspect_confidence.get(n, 0.0)) for n, v in result.listing.aspects.items()]
        if self.cache is not None:
            await self.cache.put(
                self.model_version,
                event.category,
                digest,
                CachedListing(
                    result.listing.title,
                    [(a.name, a.value, a.confidence) for a in aspects],
                    model_name=result.model.name,
                    model_version=result.model.version,
                ),
            )
        return AspectEvent(
            listing_id=event.listing_id,
            source_event_id=event.event_id,
            category=event.category,
            title=result.listing.title,
            aspects=aspects,
            model=result.model,
            schema_check=result.check,
            image_sha256=digest,
            cache_hit=False,
            timings=Timings(
                queued_ms=result.queued_ms,
                image_ms=image_ms,
                inference_ms=result.inference_ms,
                total_ms=(time.monotonic() - job.consumed_at) * 1000,
            ),
            **_judge_context(event),
        )

    def _dead_letter(self, job: _Job, error: OpalError, attempts: int, listing_id: str | None) -> None:
        dl = dead_letter_for(job.msg, error, attempts=attempts, listing_id=listing_id)
        self._produce(job, self.s.topics.dead_letters, job.msg.key(), self.dl_codec.encode(dl), str(error.reason))

    def _produce(self, job: _Job, topic: str, key: bytes | None, value: bytes, dead_reason: str | None) -> None:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self._fatal = RuntimeError(f"produce to {topic} failed: {err}; offset not stored, will replay")
                return
            if dead_reason is None:
                self.metrics.produced.inc()
            else:
                self.metrics.dead_lettered.labels(dead_reason).inc()
            self._finish(job)

        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: serve callbacks, then try again
                self.producer.poll(0.05)

    def _finish(self, job: _Job) -> None:
        msg = job.msg
        key = (msg.topic(), msg.partition(), msg.offset())
        self.jobs.pop(key, None)
        self.outputs += 1
        self.metrics.in_flight.labels(job.lane.value).dec()
        nxt = self.tracker.finish(*key)
        if nxt is not None and (key[0], key[1]) in self.assigned:
            try:
                self._consumer_of(key[0]).store_offsets(offsets=[TopicPartition(key[0], key[1], nxt)])
            except Exception as e:
                log.warning("could not store offset %s: %s", key, e)

    def _commit(self, consumer: Consumer) -> None:
        """Synchronously commit what has been stored (nothing stored is not an error)."""
        try:
            consumer.commit(asynchronous=False)
        except Exception as e:
            log.debug("commit: %s", e)


def _judge_context(event: ListingImageEvent) -> dict[str, Any]:
    """What the judge needs besides the output: the images and the seller's listing (AspectEvent v2 fields)."""
    return {"images": event.images, "seller_title": event.seller_title, "seller_aspects": event.seller_aspects}


def build_worker(settings: OpalSettings, metrics: WorkerMetrics | None = None) -> EnrichWorker:
    """An EnrichWorker with real clients from settings (Kafka, Redis, vLLM endpoints)."""
    from schemas.category import default_categories
    from schemas.serde import framing_for
    from workers.kafka_clients import make_consumer, make_producer

    if not settings.vllm.endpoints:
        raise ValueError("no vLLM endpoint: set OPAL_VLLM_ENDPOINTS (see `opal serve`)")
    w = settings.worker
    framing = framing_for(settings.kafka.schema_registry_url, settings.kafka.schema_registry_auth)
    client = ListingClient(
        settings.vllm.endpoints,
        model=settings.vllm.model,
        api_key=settings.vllm.api_key.get_secret_value() if settings.vllm.api_key else None,
        max_concurrency=min(settings.vllm.max_concurrency, w.max_in_flight),
        timeout_s=settings.vllm.request_timeout_s,
        max_retries=settings.vllm.max_retries,
        max_image_bytes=w.image_max_bytes,
        max_image_pixels=w.image_max_pixels,
    )
    loader = ImageLoader(
        w.allowed_file_root,
        w.allowed_http_hosts,
        w.image_max_bytes,
        w.image_max_pixels,
        w.image_fetch_timeout_s,
        allow_private_addresses=w.allow_private_addresses,
    )
    cache = ResultCache(settings.redis.url_value(), settings.redis.cache_ttl_s, settings.redis.key_prefix) if settings.redis.url else None
    return EnrichWorker(
        settings,
        # one consumer (and group) per lane: pausing or draining one lane never touches the other's fetch queue
        consumers={
            Lane.REALTIME: make_consumer(settings.kafka, f"{w.group_id}.realtime"),
            Lane.BACKFILL: make_consumer(settings.kafka, f"{w.group_id}.backfill"),
        },
        producer=make_producer(settings.kafka),
        client=client,
        loader=loader,
        cache=cache,
        categories=default_categories(),
        codec=EventCodec(ListingImageEvent, framing=framing),
        aspect_codec=EventCodec(AspectEvent, framing=framing),
        dl_codec=EventCodec(DeadLetter, framing=framing),
        metrics=metrics,
    )


async def run_worker(
    settings: OpalSettings, stop: asyncio.Event, idle_exit_s: float | None = None, metrics: WorkerMetrics | None = None
) -> EnrichWorker:
    """Build, run until ``stop`` (or idle), close clients. Returns the worker for its counters."""
    worker = build_worker(settings, metrics)
    async with worker.client:
        try:
            await worker.run(stop, idle_exit_s=idle_exit_s)
        finally:
            await worker.loader.aclose()
            if worker.cache is not None:
                await worker.cache.aclose()
    return worker
