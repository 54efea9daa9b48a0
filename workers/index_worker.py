"""Search indexer: the aspect topic -> :class:`workers.search_index.SearchIndex` (Redis).

Contract
- Reads ``topics.aspects`` in consumer group :data:`topology.declared.INDEXER_GROUP`.
- At-least-once with idempotent effects: a batch's offsets are stored only after every
  record of it is applied to Redis and every dead letter of it is acknowledged by
  Kafka; the consumer's auto-commit then persists them. A crash replays at most the
  uncommitted tail and, because :meth:`SearchIndex.apply` ignores positions it has
  already seen, a replay changes nothing.
- A record that is not an AspectEvent (corrupt bytes, unknown schema, key missing or
  != listing id, tombstone without key) becomes a DeadLetter with its reason and raw
  bytes; a tombstone with a key removes the listing from the index. The key rule keeps
  every record of a listing in one partition, which the index's version check needs.
- Redis errors and retriable decode errors (schema registry down) are dependency
  failures, never dead letters (:mod:`schemas.retry`): the operation is retried with
  capped, jittered backoff; after ``max_attempts`` consecutive failures the Redis
  breaker opens (:class:`workers.dependency_gate.DependencyGate`), every assigned partition is paused (the consumer keeps polling, so the
  group keeps the member), and the operation is retried at the breaker's probe backoff
  until Redis answers; then partitions resume. The indexer never gives up on an outage.
- ``stop`` is checked between batches, and while waiting for Redis: the current batch
  finishes (or, during an outage, :class:`IndexerError` is raised with the batch's
  offsets not stored: the next run replays it), offsets are committed synchronously, the
  consumer leaves the group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas.errors import ErrorKind, OpalError
from schemas.events import AspectEvent, DeadLetter
from schemas.retry import Backoff
from schemas.serde import CodecSet, EventCodec
from schemas.settings import OpalSettings
from topology.declared import INDEXER_GROUP
from workers.circuit import redis_outage
from workers.dependency_gate import DependencyGate, GateStopped
from workers.intake import dead_letter_for
from workers.metrics import IndexerMetrics
from workers.search_index import SearchIndex

log = logging.getLogger(__name__)
T = TypeVar("T")


REDIS = "redis"
"""The dependency name of the index's Redis at the gate."""


def _outage(e: Exception) -> bool:
    """A failure to wait out: Redis unreachable or busy, or a retriable OpalError (the schema registry down)."""
    return isinstance(e, (redis.RedisError, OSError)) or (isinstance(e, OpalError) and e.retriable)


class IndexerError(RuntimeError):
    """The indexer stopped inside a batch (stopped during an outage, Kafka refused dead letters
    or offsets); offsets of that batch were not stored, so the next run replays it."""


class RecordRejectedByRedisError(OpalError):
    """Redis answered, and refused this record's update (a script error on its data): not an outage."""

    reason = ErrorKind.INTERNAL


class InvalidAspectRecordError(OpalError):
    """The record's key does not name the listing its AspectEvent is about (or a tombstone has no key)."""

    reason = ErrorKind.INVALID_EVENT


@dataclass
class IndexerStats:
    indexed: int = 0
    deleted: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    batches: int = 0


class SearchIndexer:
    """One consumer, one Redis index; synchronous (every effect of a batch lands before its offsets are stored)."""

    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        index: SearchIndex,
        codec: EventCodec[AspectEvent],
        dl_codec: EventCodec[DeadLetter],
        topic: str,
        dead_letter_topic: str,
        batch_size: int = 500,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        join_wait_s: float = 16.0,
        metrics: IndexerMetrics | None = None,
        probe: Backoff | None = None,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.index = index
        self.codec = codec
        self.dl_codec = dl_codec
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.join_wait_s = join_wait_s
        self.metrics = metrics or IndexerMetrics()
        self.gate = DependencyGate(
            max_attempts,
            probe or Backoff(1.0, 30.0),
            Backoff(backoff_s, 30.0),
            on_open=self._opened,
            on_close=self._closed,
            on_wait=lambda _name: self.metrics.waits.inc(),
        )
        self.breaker = self.gate.breaker(REDIS)
        self._stop = threading.Event()
        self.stats = IndexerStats()
        self._assigned = False
        self._delivery_errors: list[str] = []

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> IndexerStats:
        """Index until ``stop`` is set (or, once assigned, nothing arrived for ``idle_exit_s``)."""

        def on_assign(c: Consumer, parts: list[TopicPartition]) -> None:
            self._assigned = True
            if self.breaker.is_open and parts:  # Redis is down: new partitions wait like the others
                c.pause(parts)
            log.info("indexer assigned %s", [p.partition for p in parts])

        self._stop = stop
        self.consumer.subscribe([self.topic], on_assign=on_assign)
        last = time.monotonic()
        try:
            while not stop.is_set():
                msgs = self.consumer.consume(self.batch_size, timeout=0.5)
                records = []
                for m in msgs:
                    err = m.error()
                    if err is None:
                        records.append(m)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", err)
                if records:
                    self._process(records)
                    last = time.monotonic()
                elif not self._assigned:
                    last = time.monotonic()  # idle time counts only once the group has assigned us partitions
                elif idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                    break
        finally:
            self._close()
        return self.stats

    def _process(self, records: list[Message]) -> None:
        t0 = time.monotonic()
        for m in records:
            self._one(m)
        if self.producer.flush(30):
            raise IndexerError("dead letters still unacknowledged after 30 s; offsets not stored, the batch will be replayed")
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            raise IndexerError(f"dead letters not acknowledged ({errors[0]}); offsets not stored, the batch will be replayed")
        last: dict[tuple[str, int], int] = {}
        for m in records:
            tp = (m.topic() or "", m.partition() or 0)
            last[tp] = max(last.get(tp, -1), m.offset() or 0)
        try:
            self.consumer.store_offsets(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in last.items()])
        except KafkaException as e:  # e.g. the assignment was lost: the next owner replays the batch (idempotent)
            raise IndexerError(f"could not store offsets: {e}") from e
        self.stats.batches += 1
        self.metrics.batch_seconds.observe(time.monotonic() - t0)
        for (t, p), o in last.items():
            try:
                _low, high = self.consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            except Exception:  # advisory: never fail a batch over lag
                continue
            if high is not None and high >= 0:
                self.metrics.lag.labels(str(p)).set(max(0, high - (o + 1)))

    def _one(self, m: Message) -> None:
        key = m.key()
        try:
            listing_id = key.decode("utf-8") if key else None
        except UnicodeDecodeError:
            listing_id = None
        part, off = m.partition() or 0, m.offset() or 0
        if m.value() is None:
            if listing_id is None:
                self._dead_letter(m, InvalidAspectRecordError("tombstone without a (UTF-8) key: no listing to delete"))
                return
            self._apply(m, listing_id, part, off, None)
            return
        try:
            event = self._retry(lambda: self.codec.decode(m.value()))
            if event.listing_id != listing_id:  # versions compare within one partition: the key must pin the listing to it
                raise InvalidAspectRecordError(f"record key {listing_id!r} != event listing_id {event.listing_id!r}")
        except OpalError as e:
            self._dead_letter(m, e)
            return
        self._apply(m, event.listing_id, part, off, event)

    def _apply(self, m: Message, listing_id: str, part: int, off: int, event: AspectEvent | None) -> None:
        try:
            self._count(self._retry(lambda: self.index.apply(listing_id, part, off, event)))
        except RecordRejectedByRedisError as e:
            self._dead_letter(m, e)

    def _count(self, outcome: int) -> None:
        name = {1: "indexed", 2: "deleted"}.get(outcome, "skipped")
        setattr(self.stats, name, getattr(self.stats, name) + 1)
        self.metrics.applied.labels(name).inc()

    def _retry(self, op: Callable[[], T]) -> T:
        """Run ``op`` until it succeeds, through the dependency gate: retries with backoff, then (breaker open) with
        partitions paused at the probe backoff. A Redis reply about the record's data is not retried: it raises
        :class:`RecordRejectedByRedisError`. Raises :class:`IndexerError` only when ``stop`` is set meanwhile."""

        def classified() -> T:
            try:
                return op()
            except (redis.RedisError, OSError) as e:
                if not redis_outage(e):
                    raise RecordRejectedByRedisError(f"Redis refused the update: {e}") from None
                raise

        try:
            return self.gate.call_blocking(REDIS, classified, _outage, self._wait, self._stop)
        except GateStopped:
            raise IndexerError("stopped while waiting for Redis; this batch's offsets were not stored (replayed next run)") from None

    def _wait(self, seconds: float) -> None:
        """Sleep while serving the consumer (its partitions are paused during an outage)."""
        deadline = time.monotonic() + seconds
        while True:
            if self._stop.is_set():
                raise IndexerError("stopped while waiting for Redis; this batch's offsets were not stored (replayed next run)")
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.breaker.is_open:
                msg = self.consumer.poll(min(0.2, left))  # liveness and rebalance callbacks; paused partitions deliver nothing
                if msg is not None and msg.error() is None:
                    self.consumer.seek(TopicPartition(msg.topic() or "", msg.partition() or 0, msg.offset() or 0))
            else:
                time.sleep(min(0.2, left))

    def _opened(self, _name: str, _error: str) -> None:
        self.metrics.breaker_open.set(1)
        self._pause()

    def _closed(self, _name: str, _open_for_s: float) -> None:
        self.metrics.breaker_open.set(0)
        self._resume()

    def _pause(self) -> None:
        try:
            self.consumer.pause(self.consumer.assignment())
        except KafkaException as e:
            log.warning("could not pause partitions: %s", e)

    def _resume(self) -> None:
        try:
            self.consumer.resume(self.consumer.assignment())
        except KafkaException as e:
            log.warning("could not resume partitions: %s", e)

    def _dead_letter(self, m: Message, error: OpalError) -> None:
        dl = dead_letter_for(m, error)

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                self._delivery_errors.append(str(err))

        self.producer.produce(self.dead_letter_topic, key=m.key(), value=self.dl_codec.encode(dl), on_delivery=on_delivery)
        self.stats.dead_lettered += 1
        self.metrics.dead_lettered.labels(str(error.reason)).inc()
        log.warning("dead letter for %s[%s]@%s: %s: %s", m.topic(), m.partition(), m.offset(), error.reason, error)

    def _close(self) -> None:
        # tansu 0.6: leaving while a JoinGroup is pending wedges the group for later members, so finish joining
        # first (records fetched meanwhile are not stored: the next owner reads them again)
        deadline = time.monotonic() + self.join_wait_s
        while not self._assigned and time.monotonic() < deadline:
            self.consumer.poll(0.1)
        try:
            self.consumer.commit(asynchronous=False)
        except Exception as e:  # nothing stored yet is not an error
            log.debug("commit: %s", e)
        self.consumer.close()
        self.index.close()


def build_indexer(
    settings: OpalSettings,
    batch_size: int = 500,
    group_id: str = INDEXER_GROUP,
    max_attempts: int = 5,
    metrics: IndexerMetrics | None = None,
) -> SearchIndexer:
    """A SearchIndexer with real clients from settings (Kafka, Redis)."""
    from schemas.schema_source import configured_categories
    from workers.kafka_clients import make_consumer, make_producer

    codecs = CodecSet.of(settings.kafka)
    categories = configured_categories(settings.schemas.paths)
    return SearchIndexer(
        consumer=make_consumer(settings.kafka, group_id),
        producer=make_producer(settings.kafka),
        index=SearchIndex.from_url(settings.redis.url_value(), settings.redis.key_prefix, categories),
        codec=codecs[AspectEvent],
        dl_codec=codecs[DeadLetter],
        topic=settings.topics.aspects,
        dead_letter_topic=settings.topics.dead_letters,
        batch_size=batch_size,
        max_attempts=max_attempts,
        join_wait_s=settings.kafka.session_timeout_ms / 1000 + 10,
        metrics=metrics,
    )
