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
  (:mod:`workers.dependency_gate`): records already held wait without spending attempts, the model's
  breaker pauses every assigned partition, and the dependency is probed with backoff until
  it answers; then partitions resume and the waiting records go on.
- Concurrent cache misses on the same (model version, category, images) key share one
  model request (single flight).
- One pipeline of stages (:mod:`workers.enrich.stages`: decode -> read -> fetch -> look up ->
  generate -> emit) over a poll batch; a cache hit decodes no pixel and needs no task of its
  own. A record that needs a slow stage (an http fetch, a model request) or fails continues in a
  task of its own through the same stages (:mod:`workers.enrich.pipeline`).
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
import signal

from schemas.events import AspectEvent, DeadLetter, Lane, ListingImageEvent
from schemas.schema_source import SchemaWatcher
from schemas.settings import OpalSettings
from workers.enrich.output import FatalWorkerError
from workers.enrich.worker import EnrichClients, EnrichWorker
from workers.metrics import WorkerMetrics

__all__ = ["EnrichClients", "EnrichWorker", "FatalWorkerError", "build_worker", "run_worker"]


def build_worker(settings: OpalSettings, metrics: WorkerMetrics | None = None) -> EnrichWorker:
    """An EnrichWorker with real clients from settings (Kafka, Redis, vLLM endpoints)."""
    from inference.client import ListingClient
    from schemas.serde import CodecSet
    from topology.declared import enrich_group_id
    from workers.image_loader import ImageLoader
    from workers.kafka_clients import make_consumer, make_producer
    from workers.result_cache import ResultCache

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
    cache = ResultCache(settings.redis.url_value(), settings.redis.cache_ttl_s, settings.redis.key_prefix) if settings.redis.url else None
    clients = EnrichClients(
        # one consumer (and group) per lane: pausing or draining one lane never touches the other's fetch queue
        consumers={lane: make_consumer(settings.kafka, enrich_group_id(w.group_id, lane)) for lane in (Lane.REALTIME, Lane.BACKFILL)},
        producer=make_producer(settings.kafka),
        model=client,
        loader=ImageLoader.from_settings(w),
        cache=cache,
        schemas=SchemaWatcher(settings.schemas.paths, settings.schemas.reload_s),
        listing_codec=codecs[ListingImageEvent],
        aspect_codec=codecs[AspectEvent],
        dead_letter_codec=codecs[DeadLetter],
    )
    return EnrichWorker(settings, clients, metrics)


async def run_worker(
    settings: OpalSettings, stop: asyncio.Event, idle_exit_s: float | None = None, metrics: WorkerMetrics | None = None
) -> EnrichWorker:
    """Build, run until ``stop`` (or idle), close clients. Returns the worker for its counters.

    In the main thread SIGHUP makes the worker re-read its schema files before the next batch."""
    worker = build_worker(settings, metrics)
    clients = worker.clients
    loop = asyncio.get_running_loop()
    hup = False
    if isinstance(clients.schemas, SchemaWatcher) and hasattr(signal, "SIGHUP"):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread: no handler
            loop.add_signal_handler(signal.SIGHUP, clients.schemas.request_reload)
            hup = True
    async with clients.model:
        try:
            await worker.run(stop, idle_exit_s=idle_exit_s)
        finally:
            await clients.loader.aclose()
            if clients.cache is not None:
                await clients.cache.aclose()
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
    return worker
