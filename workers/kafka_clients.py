"""confluent-kafka client factories with OPAL's delivery settings.

- Producers are idempotent (``enable.idempotence``, ``acks=all``): a retried send
  never duplicates or reorders within a partition. A delivery callback is the only
  proof a record is stored; callers store offsets only after it fires without error.
- Consumers never auto-commit and never auto-store offsets: a worker calls
  ``store_offsets`` for a message only after everything it produced for it is
  acknowledged, and the background commit then persists stored offsets
  (at-least-once; a crash replays at most the uncommitted tail).
- ``partition.assignment.strategy=range,roundrobin`` (eager): cooperative-sticky
  stalls on tansu. Production Kafka may switch to cooperative via
  ``OPAL_KAFKA_OVERRIDES``.
- librdkafka's own log lines (``%3|...|FAIL|...| Connect to ... failed``) go to Python
  logging, logger ``opal.librdkafka`` (:func:`librdkafka_logger`), never straight to
  stderr: every client made here (and :func:`make_admin`) sets the ``logger`` property.
  They are delivered when the client is served (``poll``, ``flush``, ``consume``; a
  client nobody polls any more prints nothing) on the thread that serves it. Levels:
  confluent-kafka's mapping of syslog levels, except that ``LOG_ERR`` lines (a broker
  connection failing, which librdkafka retries by itself; errors that matter reach the
  code through delivery reports, ``error_cb`` and exceptions) are logged at WARNING.
  Without a logging configuration nothing is printed (the logger has a NullHandler).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from schemas.settings import KafkaSettings

LIBRDKAFKA_LOGGER = "opal.librdkafka"


class _ErrorsAsWarnings(logging.Filter):
    """librdkafka's LOG_ERR lines are transient connection trouble it retries itself: WARNING, not ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR:
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


def librdkafka_logger() -> logging.Logger:
    """The logger librdkafka's log lines go to (module docstring); pass it as a client's ``logger`` property."""
    log = logging.getLogger(LIBRDKAFKA_LOGGER)
    if not any(isinstance(f, _ErrorsAsWarnings) for f in log.filters):
        log.addFilter(_ErrorsAsWarnings())
        log.addHandler(logging.NullHandler())  # no logging configured: silent, not Python's last-resort stderr
    return log


def make_admin(kafka: KafkaSettings, **extra: Any) -> AdminClient:
    """An admin client for ``kafka`` (e.g. for :func:`topology.admin.apply_topology`), logging through Python."""
    return AdminClient(kafka.librdkafka_config(**{"logger": librdkafka_logger(), **extra}))


def make_producer(kafka: KafkaSettings, **extra: Any) -> Producer:
    conf = kafka.librdkafka_config(
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "compression.type": "none",
            "logger": librdkafka_logger(),
            **extra,
        }
    )
    return Producer(conf)


def make_consumer(kafka: KafkaSettings, group_id: str, **extra: Any) -> Consumer:
    conf = kafka.librdkafka_config(
        **{
            "group.id": group_id,
            "enable.auto.commit": True,
            "enable.auto.offset.store": False,
            "auto.commit.interval.ms": 1000,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": kafka.session_timeout_ms,
            "partition.assignment.strategy": "range,roundrobin",
            "fetch.wait.max.ms": 50,
            # bound librdkafka's prefetch queue: with paused partitions this caps worker memory under any backlog
            "queued.max.messages.kbytes": 8192,
            "queued.min.messages": 1000,
            "logger": librdkafka_logger(),
            **extra,
        }
    )
    return Consumer(conf)


def messages_to_end(kafka: KafkaSettings, topic: str, timeout_s: float = 60) -> Iterator[Message]:
    """Every record ``topic`` holds now, from each partition's start to its end when called (no consumer group,
    nothing committed); raises TimeoutError when the ends are not reached within ``timeout_s``.

    A partition's end is the larger of the listed high-water mark and the one of the last fetch response: tansu's
    ListOffsets counts batches, not records (8 records in one batch: end offset 1), so the listed end alone stops
    early there; a fetch response carries the right mark on tansu and Kafka alike.
    """
    c = make_consumer(kafka, f"opal-read-{uuid.uuid4().hex[:8]}", **{"enable.auto.commit": False})
    try:
        todo: dict[int, int] = {}
        for p in c.list_topics(topic, timeout=10).topics[topic].partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                todo[p] = high
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{topic}: the end of partitions {sorted(todo)} was not reached in {timeout_s:g} s")
            m = c.poll(0.3)
            if m is None or m.error():
                continue
            yield m
            _, fetched = c.get_watermark_offsets(TopicPartition(topic, m.partition()), cached=True)
            if m.offset() + 1 >= max(todo.get(m.partition(), 0), fetched or 0):
                todo.pop(m.partition(), None)
    finally:
        c.close()
