"""One paced producer with ack counting, for the jobs that put records on a topic at a bounded rate.

Dead-letter replay (``workers/dlq.py``), the catalogue backfill (``workers/backfill.py``) and
re-enrichment (``workers/reenrich.py``) each send a stream of records at most ``rate_per_s`` a
second and must know, at the end, whether the broker acknowledged every one. :class:`PacedProducer`
wraps a confluent-kafka ``Producer`` for that.

Contract
- **Pacing.** With ``rate_per_s > 0`` consecutive :meth:`PacedProducer.send` calls hand their records
  to the producer at least ``1 / rate_per_s`` seconds apart (the wait happens in ``send``, before
  ``produce``). Time spent not sending (reading input, throttling, waiting for acks) earns no burst:
  the next record goes at once and the one after it a full interval later. ``rate_per_s <= 0``: unpaced.
  The clock and the sleep are injectable (``clock``, ``sleep``) so the pacing is testable without
  waiting.
- **A full local queue** (``BufferError`` from ``produce``) is not an error: ``send`` serves delivery
  reports with ``poll(full_queue_poll_s)`` and tries again until the producer takes the record.
- **A record the producer refuses** (a ``KafkaException`` raised by ``produce`` itself, such as
  ``MSG_SIZE_TOO_LARGE``) is a failed record: counted in :attr:`PacedProducer.sent` and in
  :attr:`PacedProducer.errors` (``"<label> not accepted by the producer: ..."``), and ``send`` returns
  False. It is never acknowledged, so :meth:`PacedProducer.flush` counts it as not acknowledged.
- **Counting.** :attr:`sent` counts every ``send`` call that returned (accepted or refused);
  :attr:`acked` counts successful delivery reports; :attr:`errors` holds one line per failed delivery
  report (``"<label>: <error>"``) and per refused record. ``sent - acked`` is what was not (yet)
  acknowledged; :attr:`in_flight` is what still awaits its delivery report. Counts change only inside
  ``send``, :meth:`poll` and :meth:`flush` (see thread-safety).
- **Per-ack hook.** ``send(..., on_ack=f)`` calls ``f(message)`` once the broker acknowledged that
  record (with the message: partition and offset), never for a failed one.
- **Finishing.** :meth:`flush` waits up to ``timeout_s`` for every delivery report and returns how many
  records were not acknowledged (failed, refused or still in flight). The caller decides what that
  means; :meth:`problem` says why in a line for its error message.
- **What a caller may retry.** A record that failed (or was refused, or is still in flight at the end
  of ``flush``) may have been written or not: a caller that retries must treat retries as possible
  duplicates (all three jobs send records with idempotent ids and retry by rerunning the job).
- **Thread-safety.** None: one thread uses an instance. confluent-kafka runs delivery callbacks inside
  ``poll`` and ``flush`` of the calling thread, so the counts and the ``on_ack`` hooks change only
  during :meth:`send` (which polls), :meth:`poll` and :meth:`flush`, in that thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

from confluent_kafka import KafkaError, KafkaException, Message, Producer

Headers = list[tuple[str, bytes | None]]
AckHook = Callable[[Message], None]


class PacedProducer:
    """Sends records at most ``rate_per_s`` a second and counts their delivery reports (module contract)."""

    def __init__(
        self,
        producer: Producer,
        rate_per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        full_queue_poll_s: float = 0.5,
    ) -> None:
        self.producer = producer
        self.rate_per_s = rate_per_s
        self.sent = 0
        self.acked = 0
        self.errors: list[str] = []
        self._clock = clock
        self._sleep = sleep
        self._full_queue_poll_s = full_queue_poll_s
        self._next = float("-inf")  # when the next record may go

    @property
    def in_flight(self) -> int:
        """Records handed to the producer whose delivery report has not come yet."""
        return self.sent - self.acked - len(self.errors)

    def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        label: str = "",
        on_ack: AckHook | None = None,
    ) -> bool:
        """Hand one record to the producer once its pacing slot came; False when the producer refused it.

        ``label`` names the record in :attr:`errors` (default: the topic); ``on_ack`` is called with the
        message once the broker acknowledged it. Serves pending delivery reports (``poll(0)``)."""
        label = label or topic
        self._pace()
        report = partial(self._delivered, label, on_ack)
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)
                break
            except BufferError:  # the local queue is full: serve delivery reports, then try again
                self.producer.poll(self._full_queue_poll_s)
            except KafkaException as e:  # refused before sending (e.g. larger than message.max.bytes)
                self.sent += 1
                self.errors.append(f"{label} not accepted by the producer: {e}")
                return False
        self.sent += 1
        self.producer.poll(0)
        return True

    def poll(self, timeout_s: float) -> int:
        """Serve delivery reports for up to ``timeout_s``; returns how many were served."""
        return self.producer.poll(timeout_s)

    def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for every delivery report; returns how many sent records are not acknowledged."""
        self.producer.flush(timeout_s)
        return self.sent - self.acked

    def problem(self, first: int = 3) -> str:
        """Why records are not acknowledged, in one line: the first errors, else how many are still in flight."""
        return "; ".join(self.errors[:first]) or f"{self.in_flight} still in flight"

    def _pace(self) -> None:
        if self.rate_per_s <= 0:
            return
        now = self._clock()
        if self._next > now:
            self._sleep(self._next - now)
        self._next = max(self._next, now) + 1 / self.rate_per_s  # from the slot, or from now after a pause: no burst

    def _delivered(self, label: str, on_ack: AckHook | None, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(f"{label}: {err}")
            return
        self.acked += 1
        if on_ack is not None:
            on_ack(msg)
