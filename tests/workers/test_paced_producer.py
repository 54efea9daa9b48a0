"""The paced producer (workers/paced_producer.py) on a fake producer and a fake clock: pacing, no burst after a pause,
a full queue, a refused record, delivery errors, the ack hook and the not-acknowledged count. No real time passes:
the sleeps the producer asks for are recorded and advance the fake clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from workers.paced_producer import PacedProducer


class Clock:
    """A monotonic clock that moves only when slept on (or told to)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class Msg:
    """What a delivery report carries that the hook reads."""

    topic: str
    key: bytes | None
    value: bytes
    offset: int


@dataclass
class FakeProducer:
    """The part of a confluent-kafka Producer that PacedProducer uses, on the fake clock.

    A record's delivery report is ready ``latency`` seconds after its produce and, as in confluent-kafka, is reported
    only inside poll/flush; poll(timeout) and flush(timeout) wait (move the clock) up to ``timeout`` for reports that
    are not ready yet. produce raises BufferError while ``capacity`` records await their reports, KafkaException for a
    value in ``refuse``; a value in ``fail`` gets a failed delivery report."""

    clock: Clock
    latency: float = 0.0
    capacity: int = 100_000
    refuse: set[bytes] = field(default_factory=set)
    fail: set[bytes] = field(default_factory=set)
    produced: list[tuple[float, str, bytes | None, bytes, Any]] = field(default_factory=list)  # (when, topic, key, value, headers)
    polls: list[float] = field(default_factory=list)
    queue: list[tuple[float, Msg, Callable[[KafkaError | None, Any], None]]] = field(default_factory=list)

    def produce(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None, on_delivery: Any = None) -> None:
        if len(self.queue) >= self.capacity:
            raise BufferError("Local: Queue full")
        if value in self.refuse:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.produced.append((self.clock(), topic, key, value, headers))
        self.queue.append((self.clock() + self.latency, Msg(topic, key, value, len(self.produced) - 1), on_delivery))

    def poll(self, timeout: float = 0) -> int:
        self.polls.append(timeout)
        return self._serve(timeout, until_empty=False)

    def flush(self, timeout: float = 0) -> int:
        self._serve(timeout, until_empty=True)
        return len(self.queue)

    def _serve(self, timeout: float, until_empty: bool) -> int:
        if self.queue:
            waits_for = max if until_empty else min
            ready = waits_for(at for at, _, _ in self.queue)
            self.clock.now = max(self.clock.now, min(ready, self.clock.now + timeout))
        due = [(msg, cb) for at, msg, cb in self.queue if at <= self.clock.now]
        self.queue = [q for q in self.queue if q[0] > self.clock.now]
        for msg, cb in due:
            cb(KafkaError(KafkaError._MSG_TIMED_OUT) if msg.value in self.fail else None, msg)
        return len(due)


def _paced(rate: float, **producer: Any) -> tuple[PacedProducer, FakeProducer, Clock]:
    clock = Clock()
    fake = FakeProducer(clock, **producer)
    return PacedProducer(fake, rate, clock=clock, sleep=clock.sleep), fake, clock  # type: ignore[arg-type]


def _sent_at(fake: FakeProducer) -> list[float]:
    return [round(when - 1000.0, 9) for when, *_ in fake.produced]


def test_records_go_out_one_interval_apart() -> None:
    paced, fake, clock = _paced(rate=10)
    for i in range(5):
        assert paced.send("t", f"v{i}".encode(), key=b"k", headers=[("h", b"x")])
    assert _sent_at(fake) == [0.0, 0.1, 0.2, 0.3, 0.4]  # the first at once, each next one a full interval later
    assert clock.sleeps == pytest.approx([0.1] * 4)
    assert fake.produced[0][1:] == ("t", b"k", b"v0", [("h", b"x")])
    assert paced.flush(1) == 0 and (paced.sent, paced.acked, paced.errors) == (5, 5, [])


def test_work_between_sends_counts_towards_the_interval() -> None:
    paced, fake, clock = _paced(rate=10)
    paced.send("t", b"a")
    clock.now += 0.04  # the caller spent 40 ms reading its next record
    paced.send("t", b"b")
    assert clock.sleeps == pytest.approx([0.06]) and _sent_at(fake) == pytest.approx([0.0, 0.1])


def test_a_pause_earns_no_burst() -> None:
    paced, fake, clock = _paced(rate=10)
    paced.send("t", b"before")
    clock.now += 5.0  # throttled, or reading records that are not sent: 50 slots passed unused
    for i in range(3):
        paced.send("t", f"after{i}".encode())
    # a catch-up schedule (start + i / rate) would send these three at once; steady pacing spaces them
    assert _sent_at(fake) == pytest.approx([0.0, 5.0, 5.1, 5.2])
    assert clock.sleeps == pytest.approx([0.1, 0.1])


@pytest.mark.parametrize("rate", [0, -1])
def test_a_rate_of_zero_or_less_is_unpaced(rate: float) -> None:
    paced, fake, clock = _paced(rate=rate)
    for i in range(100):
        paced.send("t", str(i).encode())
    assert clock.sleeps == [] and len(fake.produced) == 100 and paced.flush(1) == 0


def test_a_full_queue_serves_delivery_reports_and_retries() -> None:
    paced, fake, clock = _paced(rate=0, latency=0.3, capacity=2)
    assert paced.send("t", b"a") and paced.send("t", b"b")  # the queue is full now: no report is ready for 0.3 s
    assert paced.acked == 0 and paced.in_flight == 2
    assert paced.send("t", b"c")  # BufferError: serve reports (waiting up to 0.5 s), then produce again
    assert [(round(when - 1000.0, 9), v) for when, _, _, v, _ in fake.produced] == [(0.0, b"a"), (0.0, b"b"), (0.3, b"c")]
    assert 0.5 in fake.polls and clock.sleeps == []  # waited in poll, not slept: unpaced
    assert paced.acked == 2  # a and b were acknowledged while c waited for room
    assert paced.flush(1) == 0 and (paced.sent, paced.acked, paced.errors) == (3, 3, [])


def test_a_record_the_producer_refuses_is_a_failed_record_not_a_crash() -> None:
    paced, fake, _ = _paced(rate=0, refuse={b"huge"})
    assert paced.send("t", b"ok")
    assert not paced.send("t", b"huge", label="row 7")
    assert paced.send("t", b"ok again")  # the producer still takes records
    assert [v for *_, v, _ in fake.produced] == [b"ok", b"ok again"]
    assert len(paced.errors) == 1 and paced.errors[0].startswith("row 7 not accepted by the producer: ")
    assert "MSG_SIZE_TOO_LARGE" in paced.errors[0]
    assert paced.flush(1) == 1  # counted as sent, never acknowledged
    assert (paced.sent, paced.acked, paced.in_flight) == (3, 2, 0) and paced.problem() == paced.errors[0]


def test_delivery_errors_are_counted_with_their_label_and_get_no_ack_hook() -> None:
    paced, _, _ = _paced(rate=0, fail={b"bad"}, latency=1.0)
    acked: list[tuple[str, bytes]] = []

    def hook(label: str) -> Callable[[Any], None]:
        return lambda msg: acked.append((label, msg.value))

    for value, label in ((b"a", "A"), (b"bad", "B"), (b"c", "C")):
        paced.send("t", value, label=label, on_ack=hook(label))
    assert acked == [] and paced.errors == []  # nothing is counted before its report is served
    assert paced.flush(5) == 1
    assert acked == [("A", b"a"), ("C", b"c")]  # each hook gets its own record's message
    assert paced.errors == [f"B: {KafkaError(KafkaError._MSG_TIMED_OUT)}"] and (paced.sent, paced.acked) == (3, 2)
    assert paced.problem() == paced.errors[0]


def test_the_label_defaults_to_the_topic() -> None:
    paced, _, _ = _paced(rate=0, fail={b"x"})
    paced.send("opal.topic", b"x")
    paced.flush(1)
    assert paced.errors == [f"opal.topic: {KafkaError(KafkaError._MSG_TIMED_OUT)}"]


def test_flush_counts_what_is_still_in_flight_when_it_times_out() -> None:
    paced, _, _ = _paced(rate=0, latency=10.0)
    paced.send("t", b"a")
    paced.send("t", b"b")
    assert paced.flush(1) == 2 and paced.in_flight == 2 and paced.errors == []
    assert paced.problem() == "2 still in flight"
    assert paced.flush(20) == 0 and paced.in_flight == 0 and paced.acked == 2
