"""What the enrich pipeline knows about one consumed record, and the answer it found for it.

A :class:`Record` is created when its message is consumed (:meth:`workers.enrich.lanes.LaneConsumers.hold`) and
filled in by the stages: each field is the product of one stage, and a stage runs only for records that
lack its product (:mod:`workers.enrich.stages`), so a retry redoes only what is missing. Nothing here
steers control flow beyond "this is known now".
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Message

from inference.images import PreparedImage
from schemas.category import CategorySchema
from schemas.events import Lane, ListingImageEvent
from workers.image_loader import FetchedImage


@dataclass(frozen=True)
class Answer:
    """A listing for a record's images: from the result cache (``cache_hit``) or a model request. Plain data: the
    AspectEvent validates it once, when the emit stage builds the event (a pydantic model per aspect here would
    validate the same values twice on the hot path)."""

    title: str
    aspects: list[tuple[str, str, float]]  # (name, value, confidence)
    model: dict[str, str]  # ModelInfo's fields
    check: dict[str, Any]  # SchemaCheck's fields
    cache_hit: bool
    queued_ms: float = 0.0
    inference_ms: float = 0.0


@dataclass(eq=False)
class Record:
    """One consumed message on its way to exactly one output."""

    msg: Message
    lane: Lane
    consumed_at: float
    task: asyncio.Task[None] | None = None  # the task the record is in now (its batch's, or its own)
    attempts: int = 0  # tries that counted against the record (outages do not)
    marks: dict[str, int] = field(default_factory=dict)  # per dependency: its answer count at the record's first failure
    waiting_since: float | None = None  # when it first waited for an image host (a bounded wait)
    # products of the stages
    event: ListingImageEvent | None = None  # decode
    fetched: list[FetchedImage] | None = None  # read / fetch: bytes, header-checked and hashed (no pixel decoded)
    image_ms: float = 0.0  # time spent reading and decoding its images
    schema: CategorySchema | None = None  # look-up: the category schema in use when it was looked up
    digest: str = ""  # look-up: the images' digest (the cache key's last part)
    images: list[PreparedImage] | None = None  # generate: fully decoded (only on a cache miss), kept for retries
    answer: Answer | None = None  # look-up (a hit) or generate

    @property
    def listing_id(self) -> str | None:
        return None if self.event is None else self.event.listing_id

    @property
    def key(self) -> tuple[str, int, int]:
        m = self.msg
        return m.topic(), m.partition(), m.offset()

    def where(self) -> str:
        t, p, o = self.key
        return f"{t}[{p}]@{o}"

    def timings(self, now: float) -> dict[str, float]:
        """Timings' fields (a cache hit has no model times)."""
        a = self.answer
        total_ms = (now - self.consumed_at) * 1000
        if a is None or a.cache_hit:
            return {"image_ms": self.image_ms, "total_ms": total_ms}
        return {"queued_ms": a.queued_ms, "image_ms": self.image_ms, "inference_ms": a.inference_ms, "total_ms": total_ms}
