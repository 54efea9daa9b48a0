"""The retry policy's pure parts: capped jittered backoff, circuit breakers, bounded dead letters."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import ErrorKind, OpalError, clean_message
from schemas.events import DeadLetter
from schemas.retry import Backoff
from schemas.serde import EventCodec
from workers.circuit import CircuitBreaker
from workers.intake import dead_letter_for


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@given(st.floats(0.01, 10), st.floats(0.1, 60), st.integers(1, 60), st.floats(0, 1))
def test_backoff_is_capped_and_jittered_around_the_doubling(base: float, cap: float, attempt: int, r: float) -> None:
    b = Backoff(base, cap, jitter=0.5)
    d = b.delay(attempt, rand=lambda: r)
    raw = min(cap, base * 2 ** (attempt - 1))
    assert 0 <= d <= cap
    assert raw * 0.5 - 1e-9 <= d <= raw * 1.5 + 1e-9


def test_backoff_zero_base_means_no_wait() -> None:
    assert Backoff(0.0).delay(5) == 0.0


def test_breaker_opens_after_consecutive_failures_and_a_success_resets() -> None:
    b = CircuitBreaker("model", failure_threshold=3, probe=Backoff(1.0, 8.0, jitter=0), clock=Clock())
    assert not b.failure() and not b.failure()
    b.success()
    assert not b.failure() and not b.failure()
    assert b.failure("connection refused") and b.is_open and b.trips == 1
    assert not b.failure()  # already open: no second trip
    assert b.trips == 1 and b.last_error == "connection refused"


def test_open_breaker_probes_with_growing_delays_until_it_answers() -> None:
    clock = Clock()
    b = CircuitBreaker("model", failure_threshold=1, probe=Backoff(1.0, 4.0, jitter=0), clock=clock)
    b.failure()
    assert b.is_open and not b.probe_due()
    delays = []
    for _ in range(5):
        start = clock.t
        while not b.probe_due():
            clock.t += 0.25
        delays.append(clock.t - start)
        b.probe_failed()
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]  # doubling, capped
    assert b.open_for_s() > 0
    b.probe_succeeded()
    assert not b.is_open and not b.probe_due() and b.consecutive_failures == 0


def test_a_record_is_to_blame_only_when_the_dependency_answered_since_its_first_failure() -> None:
    b = CircuitBreaker("model", failure_threshold=100, clock=Clock())
    mark = b.mark()
    b.failure()
    assert not b.specific_to_record(mark)  # nothing answered: an outage, not the record
    b.success()  # another record (or a probe) got an answer
    assert b.specific_to_record(mark)


class _Record:
    def __init__(self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]) -> None:
        self._k, self._v, self._h = key, value, headers

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 7

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v

    def headers(self) -> list[tuple[str, bytes | None]]:
        return self._h


def test_dead_letter_of_a_huge_record_always_fits_and_says_what_was_cut() -> None:
    value = b"\x00" * 1_000_110
    rec = _Record(b"k" * 5000, value, [("h", b"v" * 5000)] * 100)
    err = OpalError("cannot identify image file <_io.BytesIO object at 0x7f3a2b1c>\n" + "x" * 10_000)
    err.reason = ErrorKind.INTERNAL
    dl = dead_letter_for(rec, err, max_value_bytes=1000)
    assert dl.truncated and dl.value == value[:1000] and dl.value_size == len(value)
    assert dl.value_sha256 == hashlib.sha256(value).hexdigest()
    assert len(dl.key or b"") <= 1024 and len(dl.headers) <= 32 and all(len(h.value or b"") <= 1024 for h in dl.headers)
    assert "object at 0x" not in dl.error_message and "<object>" in dl.error_message and len(dl.error_message) <= 4000
    assert len(EventCodec(DeadLetter).encode(dl)) < 100_000
    wide = _Record(b"k" * 5000, value, [("\u00fc" * 5000, b"v" * 5000)] * 100)  # 2-byte characters in header keys
    biggest = dead_letter_for(wide, err, listing_id="\u00fc" * 5000, max_value_bytes=512 * 1024)
    assert len(EventCodec(DeadLetter).encode(biggest)) < 700_000  # under librdkafka's default 1,000,000 with room to spare


def test_dead_letter_of_a_small_record_is_whole() -> None:
    rec = _Record(b"k", b"raw", [("h", None)])
    dl = dead_letter_for(rec, ValueError("boom"))
    assert not dl.truncated and dl.value == b"raw" and dl.value_size == 3 and dl.error_kind == "ValueError"
    assert dl.error_message == "ValueError: boom"


def test_clean_message_cuts_and_strips() -> None:
    assert clean_message("a\x00b <foo.Bar object at 0xDEAD>") == "a?b <object>"
    assert len(clean_message("y" * 10_000, limit=100)) <= 100


def test_agents_wait_out_a_dependency_outage_and_never_swallow_bugs() -> None:
    import asyncio
    from collections import Counter

    import pytest
    from redis.exceptions import ConnectionError as RedisConnectionError

    from schemas.settings import OpalSettings, WorkerSettings
    from workers.faust_app import gate_for

    s = OpalSettings().model_copy(
        update={"worker": WorkerSettings(breaker_failures=2, breaker_probe_s=0.01, breaker_probe_max_s=0.02, retry_backoff_s=0.001)}
    )
    calls = {"n": 0}

    async def flaky() -> str:
        calls["n"] += 1
        if calls["n"] <= 5:
            raise RedisConnectionError("connection refused")
        return "ok"

    counts = Counter[str]()
    gate = gate_for(s, counts)
    assert asyncio.run(gate.call("redis", flaky, lambda e: isinstance(e, RedisConnectionError))) == "ok"
    breaker = gate.breaker("redis")
    assert breaker.trips == 1 and not breaker.is_open and counts["waits:redis"] == 5

    async def bug() -> str:
        raise KeyError("a bug, not an outage")

    with pytest.raises(KeyError):
        asyncio.run(gate_for(s, Counter()).call("judge", bug))
