"""The stages of the enrich pipeline: decode -> read -> fetch -> look up -> generate -> emit.

Each stage works on a list of records and fills in one product of :class:`~workers.enrich.record.Record`.
:meth:`Stage.needs` says whether a record still lacks that product; the pipeline
(:mod:`workers.enrich.pipeline`) runs a stage only on the records that need it, so a poll batch of cache
hits passes generate with nothing to do, and a retry redoes only what is missing (a decoded event and
fetched bytes are kept; the cache is looked up again).

Stage contract
- ``run(records)`` returns the records that failed, each with its exception; it never raises for a record
  (only cancellation escapes). The pipeline hands each failure to the record policy.
- A stage that makes a request to a dependency (an image host, the model) reports each request's
  outcome to the :class:`~workers.dependency_gate.DependencyGate` once (``answered`` / ``failed``); the
  policy only reads the gate.
- ``detached``: the stage waits on a slow dependency per record (an http fetch, a model request); in a
  poll batch, records that need it continue in tasks of their own, so the records that do not (cache
  hits, local files) are not held back.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Protocol

from inference.client import InferenceResult, InferenceUnavailableError, ListingClient
from inference.images import PreparedImage
from schemas.category import CategoryRegistry, CategorySchema
from schemas.errors import OpalError
from schemas.events import AspectEvent, ListingImageEvent
from schemas.serde import EventCodec
from workers.dependency_gate import DependencyGate
from workers.enrich.output import Outputs
from workers.enrich.record import Answer, Record
from workers.image_loader import FetchedImage, ImageLoader, host_dependency
from workers.intake import decode_listing_event
from workers.metrics import WorkerMetrics
from workers.result_cache import CachedListing, ResultCache, images_digest

MODEL = "model"
"""Dependency name of the model endpoints (see :attr:`schemas.errors.OpalError.dependency`)."""

Failures = list[tuple[Record, Exception]]
Flight = tuple[InferenceResult, list[tuple[str, str, float]]]
"""A model request's result and its aspects with confidences, shared by every record of its single flight."""


class Stage(Protocol):
    """One step of the pipeline (see the module contract)."""

    name: str
    detached: bool

    def needs(self, record: Record) -> bool: ...

    async def run(self, records: list[Record]) -> Failures: ...


async def each(records: list[Record], step: Callable[[Record], Awaitable[None]]) -> Failures:
    """``step`` for every record, concurrently; the failures. One record is awaited directly, so its failure reaches
    the policy in the same turn of the event loop (no probe can close a breaker in between and make an outage's
    failure look like the record's own)."""
    if len(records) == 1:
        try:
            await step(records[0])
        except Exception as e:
            return [(records[0], e)]
        return []
    results = await asyncio.gather(*(step(r) for r in records), return_exceptions=True)
    failures: Failures = []
    for r, result in zip(records, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result  # cancelled
            failures.append((r, result))
    return failures


def _report(gate: DependencyGate, e: Exception) -> None:
    """Count a failed request against the dependency it names (once per request)."""
    if isinstance(e, OpalError) and e.dependency is not None:
        gate.failed(e.dependency, e)


class Decode:
    """The ListingImageEvent, checked against the schema set (an unknown category needs the generic fallback). Writer
    schemas a registry holds are fetched for the whole list first (:meth:`schemas.serde.EventCodec.warm`), so decoding
    never blocks the event loop; a registry that fails is a retriable failure of the record."""

    name, detached = "decode", False

    def __init__(self, codec: EventCodec[ListingImageEvent], categories: Callable[[], CategoryRegistry], fallback: bool) -> None:
        self.codec, self.categories, self.fallback = codec, categories, fallback

    def needs(self, record: Record) -> bool:
        return record.event is None

    async def run(self, records: list[Record]) -> Failures:
        await self.codec.warm([r.msg.value() for r in records])  # writer schemas from a registry, without blocking the loop
        failures: Failures = []
        categories = self.categories()
        for r in records:
            try:
                r.event = decode_listing_event(r.msg, self.codec, categories, self.fallback)
            except Exception as e:
                failures.append((r, e))
        return failures


class ReadLocal:
    """Images that need no network, read in place (file:// under the root; a refused URI fails here). A record
    with an http(s) image is left to :class:`Fetch`."""

    name, detached = "read", False

    def __init__(self, loader: ImageLoader, per_prompt: int, gate: DependencyGate) -> None:
        self.loader, self.per_prompt, self.gate = loader, per_prompt, gate

    def needs(self, record: Record) -> bool:
        return record.fetched is None

    async def run(self, records: list[Record]) -> Failures:
        failures: Failures = []
        for r in records:
            assert r.event is not None
            t0 = time.perf_counter()
            try:
                local = [self.loader.fetch_local(img.uri) for img in r.event.images[: self.per_prompt]]
            except Exception as e:
                _report(self.gate, e)
                failures.append((r, e))
                continue
            if all(f is not None for f in local):
                r.fetched = [f for f in local if f is not None]
                r.image_ms = (time.perf_counter() - t0) * 1000
        return failures


class Fetch:
    """The record's images over http(s) (and any local ones beside them), header-checked and hashed."""

    name, detached = "fetch", True

    def __init__(self, loader: ImageLoader, per_prompt: int, gate: DependencyGate) -> None:
        self.loader, self.per_prompt, self.gate = loader, per_prompt, gate

    def needs(self, record: Record) -> bool:
        return record.fetched is None

    async def run(self, records: list[Record]) -> Failures:
        return await each(records, self._fetch)

    async def _fetch(self, r: Record) -> None:
        assert r.event is not None
        t0 = time.perf_counter()
        fetched: list[FetchedImage] = []
        for img in r.event.images[: self.per_prompt]:
            try:
                fetched.append(await self.loader.fetch(img.uri))
            except Exception as e:
                _report(self.gate, e)
                raise
            if img.uri.startswith(("http://", "https://")):
                self.gate.answered(host_dependency(urllib.parse.urlsplit(img.uri)))
        r.fetched = fetched
        r.image_ms = (time.perf_counter() - t0) * 1000


def cached_answer(cached: CachedListing) -> Answer:
    """A cache entry as an answer: the stored listing and the schema check it got when it was generated."""
    return Answer(
        title=cached.title,
        aspects=cached.aspects,
        model={"name": cached.model_name, "version": cached.model_version},
        check={
            "valid": cached.valid,
            "unknown_keys": cached.unknown_keys,
            "invalid_values": cached.invalid_values,
            "missing_required": cached.missing_required,
        },
        cache_hit=True,
    )


class LookUp:
    """The category schema in use now and the images' digest; then the cached answer, one MGET for the list."""

    name, detached = "look-up", False

    def __init__(
        self,
        cache: ResultCache | None,
        categories: Callable[[], CategoryRegistry],
        fallback: bool,
        model_version: str,
        metrics: WorkerMetrics,
    ) -> None:
        self.cache, self.categories, self.fallback = cache, categories, fallback
        self.model_version, self.metrics = model_version, metrics

    def needs(self, record: Record) -> bool:
        return record.answer is None

    async def run(self, records: list[Record]) -> Failures:
        failures: Failures = []
        keyed: list[Record] = []
        categories = self.categories()
        for r in records:
            assert r.event is not None and r.fetched is not None
            try:
                r.schema = categories.resolve(r.event.category, self.fallback)
                r.digest = images_digest([f.sha256 for f in r.fetched])
                keyed.append(r)
            except Exception as e:  # the schema set changed while http images were fetched
                failures.append((r, e))
        if self.cache is None or not keyed:
            return failures
        entries = await self.cache.get_many([(self.model_version, r.schema.key, r.digest) for r in keyed])  # type: ignore[union-attr]
        hits = 0
        for r, entry in zip(keyed, entries, strict=True):
            if entry is not None:
                r.answer = cached_answer(entry)
                hits += 1
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(keyed) - hits)
        return failures


def _aspects(result: InferenceResult) -> list[tuple[str, str, float]]:
    conf = result.aspect_confidence
    return [(n, v, conf.get(n, 0.0)) for n, v in result.listing.aspects.items()]


class Generate:
    """The model's answer for a cache miss: images fully decoded once (bombs and truncated bodies refused, off the
    event loop), one request per (model version, schema key, images) however many records share it (single
    flight), stored in the cache before it is shared."""

    name, detached = "generate", True

    def __init__(
        self,
        client: ListingClient,
        loader: ImageLoader,
        decoder: Executor,
        cache: ResultCache | None,
        gate: DependencyGate,
        model_version: str,
        metrics: WorkerMetrics,
        latencies: deque[float],
    ) -> None:
        self.client, self.loader, self.decoder, self.cache, self.gate = client, loader, decoder, cache, gate
        self.model_version, self.metrics, self.latencies = model_version, metrics, latencies
        self._flights: dict[tuple[str, str, str], asyncio.Future[Flight]] = {}

    def needs(self, record: Record) -> bool:
        return record.answer is None

    async def run(self, records: list[Record]) -> Failures:
        return await each(records, self._answer)

    async def _answer(self, r: Record) -> None:
        assert r.schema is not None
        t0 = time.perf_counter()
        images = await self.prepared(r)
        r.image_ms += (time.perf_counter() - t0) * 1000
        result, aspects = await self._flight(images, r.schema, r.digest)
        r.answer = Answer(
            title=result.listing.title,
            aspects=aspects,
            model={"name": result.model.name, "version": result.model.version},
            check=result.check.model_dump(),
            cache_hit=False,
            queued_ms=result.queued_ms,
            inference_ms=result.inference_ms,
        )

    async def prepared(self, r: Record) -> list[PreparedImage]:
        """The fetched images fully decoded and normalised, once per record (a retry reuses them); the raw bytes are
        dropped afterwards."""
        if r.images is None:
            assert r.fetched is not None
            loop = asyncio.get_running_loop()
            r.images = [await loop.run_in_executor(self.decoder, self.loader.prepare, f) for f in r.fetched]
            r.fetched = [FetchedImage(b"", f.header) for f in r.fetched]
        return r.images

    async def _flight(self, images: Sequence[PreparedImage], schema: CategorySchema, digest: str) -> Flight:
        key = (self.model_version, schema.key, digest)
        shared = self._flights.get(key)
        if shared is not None:
            self.metrics.coalesced.inc()
            return await asyncio.shield(shared)
        fut: asyncio.Future[Flight] = asyncio.get_running_loop().create_future()
        self._flights[key] = fut
        self.metrics.model_requests.inc()
        try:
            result = await self._request(list(images), schema, digest)
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
        return result

    async def _request(self, images: list[PreparedImage], schema: CategorySchema, digest: str) -> Flight:
        """One model request (the flight's owner): its outcome counted once at the gate; the result cached."""
        t1 = time.perf_counter()
        try:
            result = await self.client.generate(images, schema)
        except Exception as e:
            _report(self.gate, e)
            raise
        latency = time.perf_counter() - t1
        self.latencies.append(latency)
        self.metrics.model_latency.observe(latency)
        self.gate.answered(MODEL)
        aspects = _aspects(result)
        if self.cache is not None:
            cached = CachedListing(
                result.listing.title,
                aspects,
                unknown_keys=result.check.unknown_keys,
                invalid_values=result.check.invalid_values,
                model_name=result.model.name,
                model_version=result.model.version,
                missing_required=result.check.missing_required,
            )
            await self.cache.put(self.model_version, schema.key, digest, cached)
        return result, aspects


class Emit:
    """The AspectEvent of each record handed to the producer (its offset is stored once acknowledged)."""

    name, detached = "emit", False

    def __init__(self, outputs: Outputs) -> None:
        self.outputs = outputs

    def needs(self, record: Record) -> bool:
        return True

    async def run(self, records: list[Record]) -> Failures:
        failures: Failures = []
        now = time.monotonic()
        for r in records:
            try:
                self.outputs.aspect(r, aspect_event(r, now))
            except Exception as e:  # e.g. an output over the size limit: the policy dead-letters it
                failures.append((r, e))
        return failures


def aspect_event(r: Record, now: float) -> AspectEvent:
    """The AspectEvent of a record with an answer (what the judge needs rides along: images, seller listing), validated
    once here from plain data."""
    event, answer, schema = r.event, r.answer, r.schema
    assert event is not None and answer is not None and schema is not None
    return AspectEvent.model_validate(
        {
            "listing_id": event.listing_id,
            "source_event_id": event.event_id,
            "category": event.category,
            "title": answer.title,
            "aspects": [{"name": n, "value": v, "confidence": c} for n, v, c in answer.aspects],
            "model": answer.model,
            "schema_check": answer.check,
            "image_sha256": r.digest,
            "cache_hit": answer.cache_hit,
            "timings": r.timings(now),
            "category_schema": schema.ref,
            "generic_schema": schema.generic,
            "images": event.images,
            "seller_title": event.seller_title,
            "seller_aspects": event.seller_aspects,
        }
    )
