"""What OPAL's faust-streaming agents share: the app settings proven on tansu and Kafka, acknowledged sends.

- :func:`make_faust_app`: raw keys and values (OPAL's Avro codecs do the framing), no web
  server, no tables (state lives in Redis: faust table recovery loses updates on tansu),
  topics never auto-declared (``opal topology apply`` owns them), at-least-once.
- :func:`send_acked`: produce and wait for Kafka's acknowledgement, so an agent finishes an
  event (and faust may commit its offset) only after its outputs are stored;
  :func:`send_dead_letter` does the same for an event the agent gives up on.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import faust

from schemas.errors import OpalError
from schemas.events import DeadLetter
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from workers.intake import dead_letter_for


def make_faust_app(settings: OpalSettings, group_id: str) -> faust.App:
    return faust.App(
        group_id,
        broker=f"kafka://{settings.kafka.bootstrap}",
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        store="memory://",
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
    )


def raw_topic(app: faust.App, name: str) -> faust.TopicT:
    return app.topic(name, key_serializer="raw", value_serializer="raw")


async def send_acked(topic: faust.TopicT, key: bytes | None, value: bytes) -> None:
    fut = await topic.send(key=key, value=value)
    await fut


async def send_dead_letter(
    topic: faust.TopicT, codec: EventCodec[DeadLetter], source_topic: str, ev: Any, error: OpalError, counts: Counter[str]
) -> None:
    """The DeadLetter for faust event ``ev`` (raw key, value, headers and the reason), acknowledged; counted."""
    await send_acked(topic, ev.key, codec.encode(dead_letter_for(FaustRecord(source_topic, ev), error)))
    counts["dead_lettered"] += 1


class FaustRecord:
    """A faust event seen through the parts :func:`workers.intake.dead_letter_for` reads."""

    def __init__(self, topic: str, ev: Any) -> None:
        self._topic, self._ev = topic, ev

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return int(self._ev.message.partition)

    def offset(self) -> int:
        return int(self._ev.message.offset)

    def key(self) -> bytes | None:
        return self._ev.key  # type: ignore[no-any-return]

    def value(self) -> bytes | None:
        return self._ev.value  # type: ignore[no-any-return]

    def headers(self) -> list[tuple[str, bytes | None]]:
        h = self._ev.headers or {}
        return list(h.items()) if isinstance(h, dict) else list(h)
