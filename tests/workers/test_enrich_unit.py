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
