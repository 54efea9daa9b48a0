"""First stage of every consumer: raw Kafka record -> validated event, or a DeadLetter.

:func:`decode_listing_event` raises only :class:`~schemas.errors.OpalError`
subclasses for bad input (malformed bytes, unknown schema, contract breach, unknown
category); :func:`dead_letter_for` turns such an error (or any other failure a
worker gives up on) into the DeadLetter record that carries the raw key, value and
headers (cut to a bound that always fits the topic, with the value's size and
SHA-256). Pure functions: no I/O, safe to call again on a replay.
"""

from __future__ import annotations

import hashlib
import socket
from typing import Protocol

from schemas.category import CategoryRegistry
from schemas.errors import OpalError, clean_message
from schemas.events import DeadLetter, Header, ListingImageEvent
from schemas.serde import EventCodec


class RawRecord(Protocol):
    """The parts of a confluent-kafka ``Message`` the intake reads."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes | None]] | None: ...


WORKER_ID = f"{socket.gethostname()}"


def decode_listing_event(
    record: RawRecord, codec: EventCodec[ListingImageEvent], categories: CategoryRegistry, fallback: bool = True
) -> ListingImageEvent:
    """Decode and check one image event; without ``fallback`` its category must have a schema of its own."""
    event = codec.decode(record.value())
    if not fallback:  # with the fallback every category resolves: nothing to check here
        categories.get(event.category)  # raises UnknownCategoryError
    return event


DEAD_LETTER_MAX_VALUE_BYTES = 256 * 1024
"""Default cut for the raw value kept in a DeadLetter (``OPAL_WORKER_DEAD_LETTER_MAX_VALUE_BYTES``)."""
MAX_KEY_BYTES = 1024
MAX_HEADERS = 32
MAX_HEADER_BYTES = 1024
MAX_LISTING_ID_CHARS = 512


def dead_letter_for(
    record: RawRecord,
    error: BaseException,
    attempts: int = 1,
    listing_id: str | None = None,
    worker: str = WORKER_ID,
    max_value_bytes: int = DEAD_LETTER_MAX_VALUE_BYTES,
) -> DeadLetter:
    """The DeadLetter for ``record``; ``error_kind`` is the OpalError reason, else the exception type.

    The record always fits the dead-letter topic: the value is cut to ``max_value_bytes``, the
    key to 1 KiB, at most 32 headers (key and value 1 KiB of bytes each) are kept and the listing
    id is cut to 512 bytes of UTF-8, the message to 4,000 characters (at most 16 KB): with the
    value at its largest setting (512 KiB) a dead letter stays under 700 KB. ``truncated`` says
    so, and ``value_size`` / ``value_sha256`` describe the whole value as consumed, so a cut
    record can still be matched to its original. The message never
    carries Python object reprs or control characters (:func:`schemas.errors.clean_message`).
    """
    kind = str(error.reason) if isinstance(error, OpalError) else type(error).__name__
    key = record.key()
    value = record.value()
    if listing_id is None and key is not None:
        try:
            listing_id = key.decode("utf-8")
        except UnicodeDecodeError:
            listing_id = None
    headers = record.headers() or []
    cut = (
        (value is not None and len(value) > max_value_bytes)
        or (key is not None and len(key) > MAX_KEY_BYTES)
        or len(headers) > MAX_HEADERS
        or any((v is not None and len(v) > MAX_HEADER_BYTES) or len(k.encode()) > MAX_HEADER_BYTES for k, v in headers)
        or (listing_id is not None and len(listing_id.encode()) > MAX_LISTING_ID_CHARS)
    )
    message = str(error) if isinstance(error, OpalError) else f"{type(error).__name__}: {error}"
    return DeadLetter(
        origin_topic=record.topic() or "",
        origin_partition=record.partition() or 0,
        origin_offset=record.offset() or 0,
        key=None if key is None else key[:MAX_KEY_BYTES],
        value=None if value is None else value[:max_value_bytes],
        value_size=None if value is None else len(value),
        value_sha256=None if value is None else hashlib.sha256(value).hexdigest(),
        truncated=bool(cut),
        headers=[
            Header(key=_cut_utf8(k, MAX_HEADER_BYTES), value=None if v is None else v[:MAX_HEADER_BYTES]) for k, v in headers[:MAX_HEADERS]
        ],
        listing_id=None if listing_id is None else _cut_utf8(listing_id, MAX_LISTING_ID_CHARS),
        error_kind=kind,
        error_message=clean_message(message),
        attempts=attempts,
        worker=worker,
    )


def _cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8 (never inside a character)."""
    return text.encode()[:max_bytes].decode("utf-8", errors="ignore")
