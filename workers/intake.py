"""First stage of every consumer: raw Kafka record -> validated event, or a DeadLetter.

:func:`decode_listing_event` raises only :class:`~schemas.errors.OpalError`
subclasses for bad input (malformed bytes, unknown schema, contract breach, unknown
category); :func:`dead_letter_for` turns such an error (or any other failure a
worker gives up on) into the DeadLetter record that carries the raw key, value and
headers unchanged. Pure functions: no I/O, safe to call again on a replay.
"""

from __future__ import annotations

import socket
from typing import Protocol

from schemas.category import CategoryRegistry
from schemas.errors import OpalError
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


def decode_listing_event(record: RawRecord, codec: EventCodec[ListingImageEvent], categories: CategoryRegistry) -> ListingImageEvent:
    """Decode and check one image event; the category must have a schema."""
    event = codec.decode(record.value())
    categories.get(event.category)  # raises UnknownCategoryError
    return event


def dead_letter_for(
    record: RawRecord,
    error: BaseException,
    attempts: int = 1,
    listing_id: str | None = None,
    worker: str = WORKER_ID,
) -> DeadLetter:
    """The DeadLetter for ``record``; ``error_kind`` is the OpalError reason, else the exception type."""
    kind = str(error.reason) if isinstance(error, OpalError) else type(error).__name__
    if listing_id is None and record.key() is not None:
        try:
            listing_id = (record.key() or b"").decode("utf-8")
        except UnicodeDecodeError:
            listing_id = None
    return DeadLetter(
        origin_topic=record.topic() or "",
        origin_partition=record.partition() or 0,
        origin_offset=record.offset() or 0,
        key=record.key(),
        value=record.value(),
        headers=[Header(key=k, value=v) for k, v in (record.headers() or [])],
        listing_id=listing_id,
        error_kind=kind,
        error_message=str(error)[:4000],
        attempts=attempts,
        worker=worker,
    )
