"""What OPAL's faust-streaming agents share: the app settings proven on tansu and Kafka, acknowledged sends.

- :func:`make_faust_app`: raw keys and values (OPAL's Avro codecs do the framing), no web
  server, no tables (state lives in Redis: faust table recovery loses updates on tansu),
  topics never auto-declared (``opal topology apply`` owns them), at-least-once.
- :func:`send_acked`: produce and wait for Kafka's acknowledgement, so an agent finishes an
  event (and faust may commit its offset) only after its outputs are stored;
  :func:`send_dead_letter` does the same for an event the agent gives up on.
- :func:`decode_event`: an agent decodes an event without blocking the event loop (an unseen schema
  registry id is fetched with the asyncio client, :meth:`schemas.serde.EventCodec.warm`), and waits a
  registry outage out through its gate like any dependency: an outage never dead-letters an event.
- :func:`gate_for`: an agent's call to a dependency (Redis, a judge endpoint) goes through
  :meth:`workers.dependency_gate.DependencyGate.call` and is retried until it succeeds, with
  the one retry policy of :mod:`schemas.retry`: record backoff first, then, once the
  dependency's breaker opens, probe backoff. The agent does not take its next event
  meanwhile, so faust stops fetching: an outage pauses the agent, it never turns into dead
  letters.
"""

from __future__ import annotations

import logging
import ssl
from collections import Counter
from typing import Any, TypeVar

import faust

from schemas.errors import OpalError
from schemas.events import DeadLetter, _Event
from schemas.retry import Backoff
from schemas.serde import EventCodec
from schemas.settings import KafkaSettings, OpalSettings
from workers.dependency_gate import DependencyGate
from workers.intake import dead_letter_for

log = logging.getLogger(__name__)
E = TypeVar("E", bound=_Event)

SCHEMA_REGISTRY = "schema-registry"
"""The dependency name of the schema registry at an agent's gate."""


def faust_credentials(kafka: KafkaSettings) -> faust.types.auth.CredentialsT | None:
    """The aiokafka credentials for ``kafka``'s security settings (None for PLAINTEXT).

    SSL and SASL_SSL verify the broker against ``ssl_ca_location`` (the system CAs without it) and present
    the client certificate when one is configured; SASL takes PLAIN and SCRAM. Raises :class:`ValueError` for
    what the faust agents cannot do (OAUTHBEARER, certificates or keys given as PEM strings): the enrich worker
    and the indexer (librdkafka) support those. ``OPAL_KAFKA_OVERRIDES`` (librdkafka properties) are ignored
    with a warning naming them.
    """
    if kafka.overrides:  # tuning for librdkafka; named (never their values) so a missing security property shows
        log.warning("OPAL_KAFKA_OVERRIDES are librdkafka properties; the faust agents ignore them: %s", ", ".join(sorted(kafka.overrides)))
    if kafka.security_protocol == "PLAINTEXT":
        return None
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        if kafka.ssl_certificate_pem or kafka.ssl_key_pem:
            raise ValueError("the faust agents take the client certificate and key as files (OPAL_KAFKA_SSL_*_LOCATION)")
        context = ssl.create_default_context(cafile=kafka.ssl_ca_location)
        if kafka.ssl_certificate_location:
            password = kafka.ssl_key_password.get_secret_value() if kafka.ssl_key_password else None
            context.load_cert_chain(kafka.ssl_certificate_location, kafka.ssl_key_location, password)
        if kafka.security_protocol == "SSL":
            return faust.SSLCredentials(context)
    if kafka.sasl_mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        raise ValueError(f"the faust agents support SASL PLAIN and SCRAM, not {kafka.sasl_mechanism}")
    password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    return faust.SASLCredentials(username=kafka.sasl_username, password=password, mechanism=kafka.sasl_mechanism, ssl_context=context)


def make_faust_app(settings: OpalSettings, group_id: str) -> faust.App:
    """The app for one agent; raises ValueError for Kafka security settings the agents cannot apply."""
    return faust.App(
        group_id,
        broker=f"kafka://{settings.kafka.bootstrap}",
        broker_credentials=faust_credentials(settings.kafka),
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


async def decode_event(gate: DependencyGate, codec: EventCodec[E], value: bytes | None) -> E:
    """``codec.decode(value)`` from an agent: the writer schema is fetched first without blocking the loop
    (:meth:`EventCodec.warm`; a no-op without a registry), and a retriable failure (the registry unreachable or
    answering 5xx) is retried through ``gate`` until the registry answers. Raises the decode's other
    :class:`OpalError` (bad bytes, unknown schema, contract breach): the agent dead-letters those."""

    async def once() -> E:
        await codec.warm([value])
        return codec.decode(value)

    return await gate.call(SCHEMA_REGISTRY, once, is_outage=lambda e: isinstance(e, OpalError) and e.retriable)


def gate_for(settings: OpalSettings, counts: Counter[str]) -> DependencyGate:
    """The dependency gate of an agent: the worker settings' breaker threshold, probe and record backoff; each wait
    is counted in ``counts`` as ``waits:<dependency>``. An agent handles one event at a time, so it has no other
    records to tell an outage from a record-specific failure: :meth:`DependencyGate.call` retries the operation (the
    operation is the probe) until it succeeds. Pass an ``is_outage`` that accepts only failures that are never about
    the event (connection errors, not error replies about its data)."""
    w = settings.worker
    return DependencyGate(
        w.breaker_failures,
        Backoff(w.breaker_probe_s, w.breaker_probe_max_s),
        Backoff(w.retry_backoff_s, w.retry_backoff_max_s),
        on_wait=lambda name: counts.update([f"waits:{name}"]),
    )


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
