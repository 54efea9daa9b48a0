"""Typed errors raised by the contract layer.

Every error carries a machine-readable ``reason`` (a :class:`ErrorKind`) and a human
message. Workers turn any :class:`OpalError` into a DeadLetter record whose
``error_kind`` is ``reason`` and whose ``error_message`` is ``str(error)``; nothing
here is allowed to escape as a bare ``Exception`` for bad *input*. Bugs still raise
ordinary exceptions.
"""

from __future__ import annotations

import difflib
import re
from enum import StrEnum

_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_message(text: str, limit: int = 4000) -> str:
    """An error message fit for a record or a log line: Python object reprs
    (``<_io.BytesIO object at 0x...>``) and control characters removed, cut to ``limit``
    characters (saying how long it was)."""
    text = _CONTROL.sub("?", _OBJECT_REPR.sub("<object>", text))
    return text if len(text) <= limit else f"{text[: limit - 40]}... (cut, {len(text)} chars)"


class ErrorKind(StrEnum):
    """Stable reason codes written to DeadLetter.error_kind (strings, so adding one
    never breaks an old reader)."""

    MALFORMED_EVENT = "malformed_event"
    UNKNOWN_SCHEMA = "unknown_schema"
    INVALID_EVENT = "invalid_event"
    UNKNOWN_CATEGORY = "unknown_category"
    INVALID_LISTING = "invalid_listing"
    SCHEMA_REGISTRY = "schema_registry"
    INVALID_IMAGE = "invalid_image"
    INVALID_OUTPUT = "invalid_output"
    INFERENCE_FAILED = "inference_failed"
    INFERENCE_REJECTED = "inference_rejected"
    IMAGE_FETCH = "image_fetch_failed"
    OUTPUT_TOO_LARGE = "output_too_large"
    INTERNAL = "internal_error"


class OpalError(Exception):
    """Base class. ``retriable`` tells a caller whether trying again may succeed.

    ``dependency`` names the shared service whose failure this is (``"model"``,
    ``"image-host:https://cdn.example.com"``, ``"redis"``), or None when the error is a
    property of the input. A worker treats consecutive dependency failures as an outage
    (circuit breaker, see :mod:`schemas.retry`), never as bad records.
    """

    reason: ErrorKind = ErrorKind.INVALID_EVENT
    retriable: bool = False
    dependency: str | None = None

    def __init__(self, message: str, dependency: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if dependency is not None:
            self.dependency = dependency


class DecodeError(OpalError):
    """Bytes are not a valid framed Avro record (bad magic, truncated, corrupt body)."""

    reason = ErrorKind.MALFORMED_EVENT


class UnknownSchemaError(OpalError):
    """The writer schema named by the frame (fingerprint or registry id) is unknown."""

    reason = ErrorKind.UNKNOWN_SCHEMA


class InvalidEventError(OpalError):
    """The record decoded but breaks the event contract (e.g. an empty listing id)."""

    reason = ErrorKind.INVALID_EVENT


class UnknownCategoryError(OpalError):
    """The category named by an event or listing has no category aspect schema."""

    reason = ErrorKind.UNKNOWN_CATEGORY

    def __init__(self, category: str, known: list[str] | None = None) -> None:
        hint = ""
        if known:
            close = difflib.get_close_matches(category, known, n=3)
            shown = sorted(known)[:10]
            hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(shown)}{', ...' if len(known) > 10 else ''})"
        super().__init__(f"unknown category {category!r}{hint}")
        self.category = category


class InvalidListingError(OpalError):
    """A generated or submitted listing is not valid against its category schema."""

    reason = ErrorKind.INVALID_LISTING

    def __init__(self, message: str, raw: str | None = None) -> None:
        super().__init__(message)
        self.raw = raw


class OutputTooLargeError(OpalError):
    """The output for a record (e.g. an AspectEvent carrying a huge seller listing) does not fit the topic."""

    reason = ErrorKind.OUTPUT_TOO_LARGE


class SchemaRegistryError(OpalError):
    """The schema registry could not be reached or refused a request (retriable)."""

    reason = ErrorKind.SCHEMA_REGISTRY
    retriable = True
