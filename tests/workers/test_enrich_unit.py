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
    """Local reads for file:// URIs (the batch pass's fetch_local); ``bad.jpg`` is refused."""

    def fetch_local(self, uri: str) -> FetchedImage | None:
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
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, on_delivery: Any = None) -> None:
        self.sent.append((topic, key, value))


def test_a_poll_batch_is_looked_up_with_one_mget_and_only_misses_and_failures_get_a_task_of_their_own() -> None:
    from schemas.events import AspectEvent, DeadLetter

    s = OpalSettings()
    codec: EventCodec[ListingImageEvent] = EventCodec(ListingImageEvent)
    loader, producer = BatchLoader(), RecordingProducer()
    hit = PHOTO + b"file:///img/hit.jpg"
    cache = BatchCache(hashlib.sha256(hit).hexdigest())
    w = EnrichWorker(s, {}, producer, None, loader, cache, default_categories(), codec, EventCodec(AspectEvent), EventCodec(DeadLetter))  # type: ignore[arg-type]

    def event(i: int, name: str) -> bytes:
        return codec.encode(ListingImageEvent(listing_id=f"l{i}", category="shoes", images=[ImageRef(uri=f"file:///img/{name}")]))

    values = [event(0, "hit.jpg"), event(1, "miss.jpg"), b"\x00not avro", event(3, "bad.jpg"), event(4, "hit.jpg")]
    jobs = [w._start(FakeMessage(i, v)) for i, v in enumerate(values)]  # type: ignore[arg-type]
    spawned: list[_Job] = []
    w._spawn = spawned.append  # type: ignore[method-assign]
    asyncio.run(w._run_batch(jobs))

    assert cache.mgets == [3] and cache.gets == 0  # the three records that got as far as the look-up, in one MGET
    assert [(t, k) for t, k, _ in producer.sent] == [(s.topics.aspects, b"l0"), (s.topics.aspects, b"l4")]
    hit_event = EventCodec(AspectEvent).decode(producer.sent[0][2])
    assert hit_event.cache_hit and hit_event.title == "A red shoe" and hit_event.image_sha256 == cache.hit_digest
    assert [(j.msg.offset(), type(j.error).__name__) for j in spawned] == [(2, "DecodeError"), (3, "ImageRejectedError"), (1, "NoneType")]
    assert spawned[2].fetched is not None and spawned[2].event is not None  # the miss keeps what the batch did

    # the record's own task takes the batch pass's failure as its first attempt's: a dead letter with the reason
    asyncio.run(w._process(spawned[0]))
    asyncio.run(w._process(spawned[1]))
    dead = [EventCodec(DeadLetter).decode(v) for t, _, v in producer.sent if t == s.topics.dead_letters]
    assert [(d.origin_offset, d.error_kind, d.attempts) for d in dead] == [(2, "malformed_event", 1), (3, "invalid_image", 1)]
    assert loader.fetches == 4  # the refused image was not read again
