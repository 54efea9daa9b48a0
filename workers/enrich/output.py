"""The enrich worker's outputs: AspectEvents and DeadLetters handed to the producer, and their delivery reports.

Contract
- :meth:`Outputs.aspect` and :meth:`Outputs.dead_letter` hand one output to the producer; the record is
  released (:meth:`workers.enrich.lanes.LaneConsumers.release`, which may store its offset) only from a
  successful delivery report, acted on in :meth:`Outputs.poll` outside librdkafka's callback.
- The output path cannot wedge a partition: a dead letter always fits (its raw value is cut to
  ``worker.dead_letter_max_value_bytes`` with its size and SHA-256 kept); an AspectEvent over the
  producer's ``message.max.bytes`` raises :class:`~schemas.errors.OutputTooLargeError` from
  :meth:`aspect` (the caller dead-letters the record); one the broker refuses as too large is
  dead-lettered here when it alone is over :data:`BROKER_SAFE_BYTES`, else produced again on its own
  (its batch was refused, not it), up to 3 tries.
- Any other failure (a refused dead letter, a failed delivery) is fatal: :attr:`fatal` is set, the
  offset is not stored, and the worker stops so the next owner replays the record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from schemas.errors import OpalError, OutputTooLargeError
from schemas.events import AspectEvent, DeadLetter
from schemas.serde import EventCodec
from workers.enrich.record import Record
from workers.intake import dead_letter_for
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
BROKER_SAFE_BYTES = 900_000
"""An output above this is itself too large when the broker refuses its batch (Kafka's default limit is ~1 MB)."""


class FatalWorkerError(RuntimeError):
    """The worker cannot continue without risking loss (e.g. an output was not stored)."""


@dataclass
class _Report:
    """One delivery report, recorded in librdkafka's callback and acted on after poll() returns."""

    record: Record
    topic: str
    key: bytes | None
    value: bytes
    dead_reason: str | None
    tries: int
    err: KafkaError | None


class Outputs:
    """See the module contract. ``on_acked(record)`` runs for each acknowledged output; ``after_round()`` once
    per round of reports (store the offsets they finished)."""

    def __init__(
        self,
        producer: Producer,
        aspects_topic: str,
        dead_letters_topic: str,
        aspect_codec: EventCodec[AspectEvent],
        dl_codec: EventCodec[DeadLetter],
        metrics: WorkerMetrics,
        on_acked: Callable[[Record], None],
        after_round: Callable[[], None],
        dead_letter_max_value_bytes: int,
    ) -> None:
        self.producer = producer
        self.aspects_topic = aspects_topic
        self.dead_letters_topic = dead_letters_topic
        self.aspect_codec = aspect_codec
        self.dl_codec = dl_codec
        self.metrics = metrics
        self.on_acked = on_acked
        self.after_round = after_round
        self.dead_letter_max_value_bytes = dead_letter_max_value_bytes
        self.fatal: BaseException | None = None
        self.acknowledged = 0
        self._reports: list[_Report] = []

    def aspect(self, record: Record, event: AspectEvent) -> None:
        """Produce the record's AspectEvent (raises :class:`OutputTooLargeError` when the producer refuses its size)."""
        self._produce(record, self.aspects_topic, event.listing_id.encode(), self.aspect_codec.encode(event), None)

    def dead_letter(self, record: Record, error: OpalError) -> None:
        """Produce the record's DeadLetter; any failure to hand it to the producer is fatal (replay)."""
        dl = dead_letter_for(
            record.msg,
            error,
            attempts=max(1, record.attempts),
            listing_id=record.listing_id,
            max_value_bytes=self.dead_letter_max_value_bytes,
        )
        try:
            self._produce(record, self.dead_letters_topic, dl.key, self.dl_codec.encode(dl), str(error.reason))
        except KafkaException as e:
            self._fail(f"dead letter for {record.where()} not accepted by the producer: {e}; offset not stored")

    def _fail(self, message: str) -> None:
        if self.fatal is None:
            self.fatal = FatalWorkerError(message)

    def _produce(self, record: Record, topic: str, key: bytes | None, value: bytes, dead_reason: str | None, tries: int = 1) -> None:
        reports = self._reports

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            # runs inside producer.poll()/flush(): only record the report, never produce from here
            reports.append(_Report(record, topic, key, value, dead_reason, tries, err))

        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: serve callbacks, then try again
                self.poll(0.05)
            except KafkaException as e:
                code = e.args[0].code() if e.args and isinstance(e.args[0], KafkaError) else None
                if dead_reason is None and code in TOO_LARGE:
                    raise OutputTooLargeError(f"AspectEvent of {len(value)} bytes is over the producer's message.max.bytes") from None
                if dead_reason is None:
                    self._fail(f"produce to {topic} failed for {record.where()}: {e}; offset not stored")
                    return
                raise

    def poll(self, timeout: float = 0) -> None:
        """Serve delivery callbacks, then act on their reports (outside librdkafka's callback)."""
        self.producer.poll(timeout)
        if not self._reports:
            return
        produced = 0
        while self._reports:
            reports = self._reports.copy()
            self._reports.clear()  # in place: the delivery callbacks append to this very list
            for r in reports:
                if r.err is None:
                    if r.dead_reason is None:
                        produced += 1
                    else:
                        self.metrics.dead_lettered.labels(r.dead_reason).inc()
                    self.acknowledged += 1
                    self.on_acked(r.record)
                else:
                    self._refused(r)
        if produced:
            self.metrics.produced.inc(produced)
        self.after_round()

    def _refused(self, r: _Report) -> None:
        size = len(r.value) + len(r.key or b"")
        if r.err is not None and r.err.code() in TOO_LARGE and r.dead_reason is None and size > BROKER_SAFE_BYTES:
            self.dead_letter(r.record, OutputTooLargeError(f"AspectEvent of {size} bytes refused by the broker: {r.err.str()}"))
        elif r.err is not None and r.err.code() in TOO_LARGE and r.tries < 3:
            try:
                self._produce(r.record, r.topic, r.key, r.value, r.dead_reason, r.tries + 1)  # its batch was refused, not it
            except Exception as e:
                self._fail(f"produce to {r.topic} failed again for {r.record.where()}: {e}; offset not stored")
        else:
            self._fail(f"produce to {r.topic} failed for {r.record.where()}: {r.err}; offset not stored, will replay")

    def pending(self) -> int:
        """Outputs handed to the producer and not yet reported, plus reports not yet acted on."""
        return len(self.producer) + len(self._reports)

    def drain(self, timeout_s: float) -> None:
        """Flush and act on reports until nothing is left (a report may produce again) or ``timeout_s`` passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.producer.flush(max(0.0, deadline - time.monotonic()))
            self.poll(0)
            if self.pending() == 0 or time.monotonic() >= deadline:
                return
