"""Typed errors raised by the contract layer.

Every error carries a machine-readable ``reason`` (a :class:`ErrorKind`) and a human
message. Workers turn any :class:`OpalError` into a DeadLetter record whose
``error_kind`` is ``reason`` and whose ``error_message`` is ``str(error)``; nothing
here is allowed to escape as a bare ``Exception`` for bad *input*. Bugs still raise
ordinary exceptions.
"""

from __future__ import annotations

import difflib
from enum import StrEnum


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
    INTERNAL = "internal_error"


class OpalError(Exception):
    """Base class. ``retriable`` tells a caller whether trying again may succeed."""

    reason: ErrorKind = ErrorKind.INVALID_EVENT
    retriable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class SchemaRegistryError(OpalError):
    """The schema registry could not be reached or refused a request (retriable)."""

    reason = ErrorKind.SCHEMA_REGISTRY
    retriable = True
