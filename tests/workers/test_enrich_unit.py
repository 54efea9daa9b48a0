"""Pieces of the enrichment worker's per-record pipeline, with fakes for its clients (pure logic)."""

from __future__ import annotations

import asyncio
from typing import Any

from inference.images import PreparedImage, prepare_image
from schemas.category import default_categories
from schemas.events import ImageRef, Lane, ListingImageEvent
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from tests.support import REPO
from workers.enrich import EnrichWorker, _Job

PHOTO = (REPO / "data" / "sample" / "images" / "00020b5a.jpg").read_bytes()


class CountingLoader:
    def __init__(self) -> None:
        self.calls = 0

    async def load(self, uri: str) -> PreparedImage:
        self.calls += 1
        return prepare_image(PHOTO)


def test_a_record_fetches_and_decodes_its_images_once_however_often_it_is_retried() -> None:
    loader = CountingLoader()
    codec: EventCodec[Any] = EventCodec(ListingImageEvent)
    w = EnrichWorker(OpalSettings(), {}, None, None, loader, None, default_categories(), codec, codec, codec)  # type: ignore[arg-type]
    event = ListingImageEvent(listing_id="l1", category="shoes", images=[ImageRef(uri="file:///x.jpg")])
    job = _Job(msg=None, lane=Lane.REALTIME, consumed_at=0.0)  # type: ignore[arg-type]

    async def twice() -> tuple[list[PreparedImage], list[PreparedImage]]:
        return await w._load_images(event, job), await w._load_images(event, job)

    first, again = asyncio.run(twice())
    assert loader.calls == 1 and first is again
    assert first[0].data == PHOTO and len(first[0].source_sha256) == 64
