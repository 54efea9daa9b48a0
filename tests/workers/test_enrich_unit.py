"""Pieces of the enrichment worker's per-record pipeline, with fakes for its clients (pure logic)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from inference.images import ImageRejectedError, PreparedImage, inspect_image, prepare_image
from schemas.category import default_categories
from schemas.events import ImageRef, Lane, ListingImageEvent
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from tests.support import REPO
from workers.enrich import EnrichWorker, _Job
from workers.image_loader import FetchedImage
from workers.result_cache import CachedListing, images_digest

PHOTO = (REPO / "data" / "sample" / "images" / "00020b5a.jpg").read_bytes()


class CountingLoader:
    """The real loader's fetch/prepare split over one photo, counting calls."""

    def __init__(self, photo: bytes = PHOTO) -> None:
        self.photo = photo
        self.fetches = 0
        self.decodes = 0

    async def fetch(self, uri: str) -> FetchedImage:
        self.fetches += 1
        return FetchedImage(self.photo, inspect_image(self.photo))

    def prepare(self, fetched: FetchedImage) -> PreparedImage:
        self.decodes += 1
        return prepare_image(fetched.data, header=fetched.header)


class HitCache:
    def __init__(self) -> None:
        self.keys: list[tuple[str, str, str]] = []

    async def get(self, version: str, schema_key: str, digest: str) -> CachedListing:
        self.keys.append((version, schema_key, digest))
        return CachedListing("A red shoe", [("Color", "Red", 0.9)], model_name="opal-tiny", model_version="v1")


def _worker(loader: CountingLoader, cache: object = None) -> EnrichWorker:
    codec: EventCodec[Any] = EventCodec(ListingImageEvent)
    return EnrichWorker(OpalSettings(), {}, None, None, loader, cache, default_categories(), codec, codec, codec)  # type: ignore[arg-type]


EVENT = ListingImageEvent(listing_id="l1", category="shoes", images=[ImageRef(uri="file:///x.jpg")])


def test_a_record_fetches_and_decodes_its_images_once_however_often_it_is_retried() -> None:
    loader = CountingLoader()
    w = _worker(loader)
    job = _Job(msg=None, lane=Lane.REALTIME, consumed_at=0.0)  # type: ignore[arg-type]

    async def twice() -> tuple[list[PreparedImage], list[PreparedImage]]:
        await w._fetch_images(EVENT, job)
        await w._fetch_images(EVENT, job)
        return await w._prepared(job), await w._prepared(job)

    first, again = asyncio.run(twice())
    assert loader.fetches == 1 and loader.decodes == 1 and first is again
    assert first[0].data == PHOTO and first[0].source_sha256 == hashlib.sha256(PHOTO).hexdigest()


def test_a_cache_hit_decodes_no_pixels() -> None:
    """Header checks and the hash of the raw bytes find the result; the full decode is only for a model request."""
    loader, cache = CountingLoader(), HitCache()
    w = _worker(loader, cache)
    job = _Job(msg=None, lane=Lane.REALTIME, consumed_at=0.0)  # type: ignore[arg-type]
    out = asyncio.run(w._enrich(EVENT, job))
    assert out.cache_hit and out.title == "A red shoe" and loader.fetches == 1 and loader.decodes == 0
    assert cache.keys[0][2] == images_digest([hashlib.sha256(PHOTO).hexdigest()])


def test_a_truncated_photo_passes_the_header_checks_but_never_reaches_the_model() -> None:
    """The bytes a cache miss would send are decoded first: a body cut short is refused there."""
    cut = PHOTO[: len(PHOTO) // 2]
    header = inspect_image(cut)  # the header alone looks fine
    whole = prepare_image(PHOTO)
    assert (header.width, header.height) == (whole.width, whole.height)
    loader = CountingLoader(cut)
    w = _worker(loader)
    job = _Job(msg=None, lane=Lane.REALTIME, consumed_at=0.0)  # type: ignore[arg-type]

    async def miss() -> None:
        await w._fetch_images(EVENT, job)
        await w._prepared(job)

    with pytest.raises(ImageRejectedError, match="corrupt JPEG"):
        asyncio.run(miss())


class FakeMessage:
    """The parts of a confluent-kafka Message the worker reads."""

    def __init__(self, offset: int, value: bytes) -> None:
        self._offset, self._value = offset, value

    def topic(self) -> str:
        return "opal.listing-images.realtime"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return f"k{self._offset}".encode()

    def value(self) -> bytes:
        return self._value

    def headers(self) -> None:
        return None

    def error(self) -> None:
        return None


class BatchLoader(CountingLoader):
    """Local reads for file:// URIs (the batch pass's fetch_local), None for https://; ``bad.jpg`` is refused."""

    def fetch_local(self, uri: str) -> FetchedImage | None:
        if uri.startswith("https://"):
            return None  # the network: fetch()
        self.fetches += 1
        if uri.endswith("bad.jpg"):
            raise ImageRejectedError("corrupt JPEG image: bad")
        # each photo its own bytes (its own cache key): the photo with its name appended after the JPEG end
        data = self.photo + uri.encode()
        return FetchedImage(data, inspect_image(data))


class BatchCache:
    """MGET-like: a hit for ``hit.jpg``'s digest only; counts round trips."""

    def __init__(self, hit_digest: str) -> None:
        self.hit_digest = hit_digest
        self.mgets: list[int] = []
        self.gets = 0

    async def get_many(self, keys: list[tuple[str, str, str]]) -> list[CachedListing | None]:
        self.mgets.append(len(keys))
        return [
            CachedListing("A red shoe", [("Color", "Red", 0.9)], model_name="m", model_version="v") if k[2] == self.hit_digest else None
            for k in keys
        ]

    async def get(self, version: str, schema_key: str, digest: str) -> CachedListing | None:
        self.gets += 1
        return None


class RecordingProducer:
    """Records what is produced; ``poll`` acknowledges it all (calls the delivery callbacks, as librdkafka does)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self._callbacks: list[Any] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, on_delivery: Any = None) -> None:
        self.sent.append((topic, key, value))
        self._callbacks.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(None, None)
        return len(callbacks)


class StoringConsumer:
    def __init__(self) -> None:
        self.stored: list[tuple[str, int, int]] = []

    def store_offsets(self, offsets: list[Any]) -> None:
        self.stored += [(tp.topic, tp.partition, tp.offset) for tp in offsets]


def test_a_poll_batch_is_looked_up_with_one_mget_and_only_misses_and_failures_get_a_task_of_their_own() -> None:
    from schemas.events import AspectEvent, DeadLetter

    s = OpalSettings()
    codec: EventCodec[ListingImageEvent] = EventCodec(ListingImageEvent)
    loader, producer, consumer = BatchLoader(), RecordingProducer(), StoringConsumer()
    hit = PHOTO + b"file:///img/hit.jpg"
    cache = BatchCache(hashlib.sha256(hit).hexdigest())
    w = EnrichWorker(
        s,
        {Lane.REALTIME: consumer},
        producer,
        None,
        loader,
        cache,
        default_categories(),
        codec,
        EventCodec(AspectEvent),
        EventCodec(DeadLetter),  # type: ignore[dict-item, arg-type]
    )
    topic = s.topics.images_realtime
    w.assigned.add((topic, 0))

    def event(i: int, uri: str) -> bytes:
        return codec.encode(ListingImageEvent(listing_id=f"l{i}", category="shoes", images=[ImageRef(uri=uri)]))

    values = [
        event(0, "file:///img/hit.jpg"),
        event(1, "file:///img/miss.jpg"),
        b"\x00not avro",
        event(3, "file:///img/bad.jpg"),
        event(4, "https://cdn.example.com/hit.jpg"),  # fetched over http (the loader's fetch gives the hit photo's bytes)
        event(5, "file:///img/hit.jpg"),
    ]
    jobs = [w._start(FakeMessage(i, v)) for i, v in enumerate(values)]  # type: ignore[arg-type]
    assert w._held == {Lane.REALTIME: 6, Lane.BACKFILL: 0}
    spawned: list[_Job] = []
    w._spawn = spawned.append  # type: ignore[method-assign]
    loader.fetch = lambda uri: _fetched(hit)  # type: ignore[method-assign, assignment]
    asyncio.run(w._run_batch(jobs))

    # local records in one MGET, produced before the http one is fetched; then the http one in its own MGET
    assert cache.mgets == [3, 1] and cache.gets == 0
    assert [(tp, k) for tp, k, _ in producer.sent] == [(s.topics.aspects, b"l0"), (s.topics.aspects, b"l5"), (s.topics.aspects, b"l4")]
    hit_event = EventCodec(AspectEvent).decode(producer.sent[0][2])
    assert hit_event.cache_hit and hit_event.title == "A red shoe" and hit_event.image_sha256 == cache.hit_digest
    assert [(j.msg.offset(), type(j.error).__name__) for j in spawned] == [(2, "DecodeError"), (3, "ImageRejectedError"), (1, "NoneType")]
    assert spawned[2].fetched is not None and spawned[2].event is not None and spawned[2].looked_up  # the miss keeps what was done
    assert w.metrics.cache_hits._value.get() == 3 and w.metrics.cache_misses._value.get() == 1

    # acknowledged: released, and the offset stored only up to the first record still out (offset 1, the miss)
    w._poll(0)
    assert w._held == {Lane.REALTIME: 3, Lane.BACKFILL: 0} and consumer.stored == [(topic, 0, 1)]

    # the record's own task takes the batch pass's failure as its first attempt's: a dead letter with the reason
    asyncio.run(w._process(spawned[0]))
    asyncio.run(w._process(spawned[1]))
    dead = [EventCodec(DeadLetter).decode(v) for tp, _, v in producer.sent if tp == s.topics.dead_letters]
    assert [(d.origin_offset, d.error_kind, d.attempts) for d in dead] == [(2, "malformed_event", 1), (3, "invalid_image", 1)]
    assert loader.fetches == 4  # each file image read once: the refused one was not read again by its own task
    w._poll(0)
    assert w._held == {Lane.REALTIME: 1, Lane.BACKFILL: 0} and consumer.stored == [(topic, 0, 1)]  # 1 still holds the prefix


def _fetched(data: bytes) -> Any:
    async def fetch() -> FetchedImage:
        return FetchedImage(data, inspect_image(data))

    return fetch()
