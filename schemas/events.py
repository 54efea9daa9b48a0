"""Pydantic models mirroring the Avro event schemas in ``schemas/avro/<name>/``.

Each model names its Avro record in ``AVRO_NAME`` and its schema folder in
``AVRO_DIR``; ``tests/schemas/test_events.py`` checks that field names and optionality stay
identical to the newest ``.avsc``. Models are frozen: events are facts.

Timestamps are timezone-aware UTC ``datetime`` (Avro ``timestamp-millis``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


def utcnow() -> datetime:
    """Current time, UTC, truncated to milliseconds (what Avro keeps)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=(now.microsecond // 1000) * 1000)


def new_event_id() -> str:
    return str(uuid.uuid4())


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    AVRO_NAME: ClassVar[str]
    AVRO_DIR: ClassVar[str]


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Lane(StrEnum):
    REALTIME = "REALTIME"
    BACKFILL = "BACKFILL"


class Verdict(StrEnum):
    """The paper's five judge levels, best first."""

    CORRECT = "CORRECT"
    MOSTLY_CORRECT = "MOSTLY_CORRECT"
    PARTIALLY_CORRECT = "PARTIALLY_CORRECT"
    MOSTLY_INCORRECT = "MOSTLY_INCORRECT"
    INCORRECT = "INCORRECT"


MAX_ID_CHARS = 512
"""Longest listing, event id or category accepted: ids become Kafka keys and Redis keys."""
MAX_URI_CHARS = 8192
"""Longest image URI accepted (a common HTTP server limit for a request line)."""


class ImageRef(_Part):
    uri: str = Field(min_length=1, max_length=MAX_URI_CHARS)
    sha256: str | None = None


class ModelInfo(_Part):
    name: str
    version: str


class ListingImageEvent(_Event):
    AVRO_NAME: ClassVar[str] = "ai.opal.events.ListingImageEvent"
    AVRO_DIR: ClassVar[str] = "listing_image_event"

    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=MAX_ID_CHARS)
    listing_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    category: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    images: list[ImageRef] = Field(min_length=1)
    seller_title: str | None = None
    seller_aspects: dict[str, str] = Field(default_factory=dict)
    lane: Lane = Lane.REALTIME
    created_at: AwareDatetime = Field(default_factory=utcnow)
    published_at: AwareDatetime = Field(default_factory=utcnow)


class AspectValue(_Part):
    name: str
    value: str
    confidence: float = Field(ge=0.0, le=1.0)


class SchemaCheck(_Part):
    valid: bool
    unknown_keys: list[str] = Field(default_factory=list)
    invalid_values: list[str] = Field(default_factory=list)
    missing_required: list[str] = Field(default_factory=list)


class Timings(_Part):
    queued_ms: float = 0.0
    image_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


class AspectEvent(_Event):
    AVRO_NAME: ClassVar[str] = "ai.opal.events.AspectEvent"
    AVRO_DIR: ClassVar[str] = "aspect_event"

    listing_id: str = Field(min_length=1)
    source_event_id: str
    category: str
    title: str
    aspects: list[AspectValue]
    model: ModelInfo
    schema_check: SchemaCheck
    image_sha256: str | None = None
    cache_hit: bool = False
    timings: Timings = Field(default_factory=Timings)
    images: list[ImageRef] = Field(default_factory=list)  # v2: what the model saw, for the judge
    seller_title: str | None = None  # v2: judge reference
    seller_aspects: dict[str, str] = Field(default_factory=dict)  # v2: judge reference
    category_schema: str | None = None  # v3: "<category>@v<version>" or "generic@v<version>"
    generic_schema: bool = False  # v3: the generic visual schema stood in for a category without one
    produced_at: AwareDatetime = Field(default_factory=utcnow)


class Header(_Part):
    key: str
    value: bytes | None = None


class DeadLetter(_Event):
    AVRO_NAME: ClassVar[str] = "ai.opal.events.DeadLetter"
    AVRO_DIR: ClassVar[str] = "dead_letter"

    origin_topic: str
    origin_partition: int
    origin_offset: int
    key: bytes | None = None
    value: bytes | None = None
    value_size: int | None = None
    value_sha256: str | None = None
    truncated: bool = False
    headers: list[Header] = Field(default_factory=list)
    listing_id: str | None = None
    error_kind: str
    error_message: str
    attempts: int = 1
    worker: str
    failed_at: AwareDatetime = Field(default_factory=utcnow)


class AspectLabel(_Part):
    name: str
    value: str
    correctly_identified: bool


class JudgeOutcome(_Event):
    AVRO_NAME: ClassVar[str] = "ai.opal.events.JudgeOutcome"
    AVRO_DIR: ClassVar[str] = "judge_outcome"

    listing_id: str
    source_event_id: str
    category: str
    verdict: Verdict
    score: float = Field(ge=0.0, le=1.0)
    aspect_labels: list[AspectLabel]
    title_matched: bool
    generated: str
    reference_kind: str
    reference: str | None = None
    judge_model: str
    model: ModelInfo
    judged_at: AwareDatetime = Field(default_factory=utcnow)


class PreferencePair(_Event):
    AVRO_NAME: ClassVar[str] = "ai.opal.events.PreferencePair"
    AVRO_DIR: ClassVar[str] = "preference_pair"

    pair_id: str
    listing_id: str
    category: str
    prompt: str
    image: ImageRef
    chosen: str
    rejected: str
    verdict: Verdict
    model: ModelInfo
    created_at: AwareDatetime = Field(default_factory=utcnow)


EVENT_TYPES: tuple[type[_Event], ...] = (ListingImageEvent, AspectEvent, DeadLetter, JudgeOutcome, PreferencePair)

__all__ = [
    "EVENT_TYPES",
    "AspectEvent",
    "AspectLabel",
    "AspectValue",
    "DeadLetter",
    "Header",
    "ImageRef",
    "JudgeOutcome",
    "Lane",
    "ListingImageEvent",
    "ModelInfo",
    "PreferencePair",
    "SchemaCheck",
    "Timings",
    "Verdict",
    "utcnow",
]
