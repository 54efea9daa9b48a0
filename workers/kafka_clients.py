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
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Consumer, Producer

from schemas.settings import KafkaSettings


def make_producer(kafka: KafkaSettings, **extra: Any) -> Producer:
    conf = kafka.librdkafka_config(
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "compression.type": "none",
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
            **extra,
        }
    )
    return Consumer(conf)
