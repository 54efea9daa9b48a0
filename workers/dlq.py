"""Dead-letter replay and overview: dead letters back onto the lane each came from, by reason.

A DeadLetter (``schemas/events.py``) keeps the record a worker gave up on: its origin topic,
partition and offset, the raw key, value and headers (cut to fit, ``truncated`` says so), the
reason (``error_kind``) and when it failed. Once the cause is fixed (an image root mounted, a
reader deployed with a new ``.avsc``, a category schema added) :func:`replay` puts the original
records back where they came from, and :func:`overview` says what the topic holds.

Which topics a record may go back to (:func:`replay_lanes`): the two image lanes (the enrich
worker's dead letters) and the preference topic (the preference builder's, deduplicated there by
pair id). Dead letters of the aspects topic (indexer, judge) are never replayed: that topic is
compacted and read by both, so a re-published AspectEvent would become the listing's current
record over a newer one and reach the consumer that had already taken it; the original record
is still in the topic, so rewind that consumer's group instead (the indexer ignores records not
newer than what it indexed). Any other origin topic is refused the same way.

The selection is pure (:class:`Criteria`, :func:`check`, :class:`Selection`, :class:`Overview`,
:func:`parse_since`); the Kafka I/O is :func:`read_dead_letters`, :func:`replay` and
:func:`overview`.

Contract
- Bounded: the dead-letter topic is read from the beginning to the end each partition has at the
  start: the high-water mark of the fetch response that brought its first record (tansu's
  ListOffsets counts batches, not records; a fetch response's high-water mark is right on tansu
  and Kafka alike), and nothing is handed on, so nothing replayed, before every partition's end
  is fixed. Dead letters written meanwhile, such as replayed records failing again, wait for the
  next run: a replay never chases its own output.
- Nothing is committed and nothing is deleted: the reader assigns partitions without a consumer
  group offset, and dead letters stay in their topic (retention ages them out). A rerun reads
  the same dead letters and replays the matching ones again.
- A replayed record is the original key, value and headers on ``DeadLetter.origin_topic``, plus
  the header ``opal-replayed-from: <dead-letter topic>/<partition>/<offset>`` naming the first
  dead letter of its chain: a record that fails again is dead-lettered with that header (workers
  keep a record's headers), so it keeps one identity however often it is replayed, and one run
  replays a chain once. The value is the original event, so its event id is unchanged and
  downstream recognises a second delivery (the aspects topic is compacted by listing id, the
  preference builder skips pair ids it has).
- Refused, counted as skipped with the reason: an origin topic that is not a replay lane, a
  truncated value, no value, a value that does not match its recorded SHA-256 (and, with the
  replay header, a second dead letter of a chain already replayed in this run).
- Sending is paced by :class:`workers.paced_producer.PacedProducer`: time spent reading dead letters
  that are not sent earns no burst afterwards.
- :func:`replay` returns only after every record it sent was acknowledged by the broker. On a
  delivery error (or a record the producer refuses, such as one over ``message.max.bytes``) it
  stops sending, waits for what is in flight and raises :class:`ReplayError`;
  the caller may rerun the whole replay (records already acknowledged are sent again: safe, see
  above). ``dry_run`` sends nothing and counts what would be sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from confluent_kafka import OFFSET_BEGINNING, Producer, TopicPartition

from schemas.errors import OpalError
from schemas.events import DeadLetter
from schemas.serde import EventCodec
from schemas.settings import KafkaSettings, TopicSettings
from workers.kafka_clients import make_consumer, make_producer
from workers.paced_producer import PacedProducer

REPLAYED_FROM = "opal-replayed-from"
"""Header on a replayed record: ``<dead-letter topic>/<partition>/<offset>`` of the first dead letter of its chain."""

NOT_A_LANE = "not a replay lane"
NO_VALUE = "no value"
TRUNCATED = "truncated"
CORRUPT = "value does not match its SHA-256"
DUPLICATE = "same record already replayed in this run"


class ReplayError(RuntimeError):
    """A replayed record was not acknowledged; rerun the replay (see the module contract)."""


# -- selection (pure) ----------------------------------------------------------------------------------
def replay_lanes(topics: TopicSettings) -> dict[str, str]:
    """The topics a dead letter may be replayed into (see the module docstring), with what each is."""
    return {
        topics.images_realtime: "realtime image lane (enrich worker)",
        topics.images_backfill: "backfill image lane (enrich worker)",
        topics.preferences: "preference pairs (preference builder, deduplicated by pair id)",
    }


@dataclass(frozen=True)
class Criteria:
    """Which dead letters a command looks at. An empty set matches everything."""

    reasons: frozenset[str] = frozenset()  # DeadLetter.error_kind
    topics: frozenset[str] = frozenset()  # DeadLetter.origin_topic
    since: datetime | None = None  # DeadLetter.failed_at at or after

    def matches(self, dl: DeadLetter) -> bool:
        return (
            (not self.reasons or dl.error_kind in self.reasons)
            and (not self.topics or dl.origin_topic in self.topics)
            and (self.since is None or dl.failed_at >= self.since)
        )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: a duration back from ``now`` (``90s``, ``30m``, ``6h``, ``7d``, ``2w``) or an ISO 8601
    date or time (no zone: UTC). Raises ValueError naming both forms."""
    m = _DURATION.match(text)
    if m:
        return (now or datetime.now(UTC)) - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration (30m, 6h, 7d) or an ISO date/time (2025-01-31T12:00)") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def check(dl: DeadLetter, lanes: Mapping[str, str]) -> str | None:
    """Why ``dl`` cannot be replayed (a skip reason), or None when it can."""
    if dl.origin_topic not in lanes:
        return f"{NOT_A_LANE}: {dl.origin_topic or '(none)'}"
    if dl.value is None:
        return NO_VALUE
    if dl.truncated or (dl.value_size is not None and dl.value_size != len(dl.value)):
        return TRUNCATED
    if dl.value_sha256 is not None and hashlib.sha256(dl.value).hexdigest() != dl.value_sha256:
        return CORRUPT
    return None


def position(topic: str, partition: int, offset: int) -> str:
    """Where a dead letter is: ``<topic>/<partition>/<offset>``."""
    return f"{topic}/{partition}/{offset}"


def chain_root(dl: DeadLetter, where: str) -> str:
    """The first dead letter of ``dl``'s chain: its replay header when it failed again after a replay, else itself."""
    for h in dl.headers:
        if h.key == REPLAYED_FROM and h.value:
            return h.value.decode("utf-8", errors="replace")
    return where


@dataclass(frozen=True)
class Replay:
    """One record to send: the original key, value and headers on its origin topic, plus the replay header."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes | None]]
    source: str  # the dead letter it comes from


def replay_of(dl: DeadLetter, where: str) -> Replay:
    assert dl.value is not None
    headers = [(h.key, h.value) for h in dl.headers if h.key != REPLAYED_FROM]
    headers.append((REPLAYED_FROM, chain_root(dl, where).encode()))
    return Replay(dl.origin_topic, dl.key, dl.value, headers, where)


@dataclass
class ReasonCounts:
    matched: int = 0
    replayed: int = 0  # sent and acknowledged (a dry run: would be sent)
    skipped: Counter[str] = field(default_factory=Counter)  # skip reason -> count


@dataclass
class ReplayReport:
    dead_letter_topic: str
    dry_run: bool = False
    read: int = 0  # records read from the dead-letter topic
    unreadable: int = 0  # records there that are not DeadLetters
    reasons: dict[str, ReasonCounts] = field(default_factory=dict)  # error_kind -> counts
    to_topics: Counter[str] = field(default_factory=Counter)  # replayed per origin topic

    @property
    def matched(self) -> int:
        return sum(r.matched for r in self.reasons.values())

    @property
    def replayed(self) -> int:
        return sum(r.replayed for r in self.reasons.values())

    @property
    def skipped(self) -> int:
        return sum(r.skipped.total() for r in self.reasons.values())

    def line(self) -> str:
        """The summary line commands print last."""
        verb = "would be replayed (dry run)" if self.dry_run else "replayed"
        to = ", ".join(f"{t} {n}" for t, n in sorted(self.to_topics.items())) or "nothing sent"
        return (
            f"dlq replay: {self.replayed} of {self.matched} matching dead letters {verb}, {self.skipped} skipped; "
            f"{self.read} read from {self.dead_letter_topic} ({self.unreadable} unreadable); {to}"
        )


class Selection:
    """Decides, dead letter by dead letter, what a replay sends, and counts it in :attr:`report`."""

    def __init__(self, criteria: Criteria, lanes: Mapping[str, str], report: ReplayReport) -> None:
        self.criteria = criteria
        self.lanes = lanes
        self.report = report
        self._roots: set[str] = set()

    def consider(self, dl: DeadLetter | None, where: str) -> Replay | None:
        """The record to send for the dead letter at ``where`` (None when it does not match or is skipped)."""
        self.report.read += 1
        if dl is None:
            self.report.unreadable += 1
            return None
        if not self.criteria.matches(dl):
            return None
        counts = self.report.reasons.setdefault(dl.error_kind, ReasonCounts())
        counts.matched += 1
        why = check(dl, self.lanes)
        root = chain_root(dl, where)
        if why is None and root in self._roots:
            why = DUPLICATE
        if why is not None:
            counts.skipped[why] += 1
            return None
        self._roots.add(root)
        counts.replayed += 1
        self.report.to_topics[dl.origin_topic] += 1
        return replay_of(dl, where)


@dataclass
class Group:
    """Dead letters of one origin topic and reason."""

    origin_topic: str
    reason: str
    count: int = 0
    replayable: int = 0  # what a replay of this group would send (lane, whole value)
    after_replay: int = 0  # failed again after a replay (carry the replay header)
    oldest: datetime | None = None
    newest: datetime | None = None
    last_message: str = ""  # the newest one's error message


@dataclass
class Overview:
    """Dead letters by (origin topic, reason); feed with :meth:`add`."""

    dead_letter_topic: str
    lanes: Mapping[str, str]
    criteria: Criteria = field(default_factory=Criteria)
    read: int = 0
    unreadable: int = 0
    groups: dict[tuple[str, str], Group] = field(default_factory=dict)

    def add(self, dl: DeadLetter | None) -> None:
        self.read += 1
        if dl is None:
            self.unreadable += 1
            return
        if not self.criteria.matches(dl):
            return
        g = self.groups.setdefault((dl.origin_topic, dl.error_kind), Group(dl.origin_topic, dl.error_kind))
        g.count += 1
        g.replayable += check(dl, self.lanes) is None
        g.after_replay += any(h.key == REPLAYED_FROM for h in dl.headers)
        g.oldest = dl.failed_at if g.oldest is None else min(g.oldest, dl.failed_at)
        if g.newest is None or dl.failed_at >= g.newest:
            g.newest, g.last_message = dl.failed_at, dl.error_message

    def rows(self) -> list[Group]:
        """Groups by origin topic, then most dead letters first."""
        return sorted(self.groups.values(), key=lambda g: (g.origin_topic, -g.count, g.reason))

    @property
    def matched(self) -> int:
        return sum(g.count for g in self.groups.values())

    def line(self) -> str:
        replayable = sum(g.replayable for g in self.groups.values())
        reasons = len({g.reason for g in self.groups.values()})
        topics = len({g.origin_topic for g in self.groups.values()})
        return (
            f"dlq: {_n(self.matched, 'dead letter')} ({_n(reasons, 'reason')}, {_n(topics, 'origin topic')}), {replayable} replayable; "
            f"{self.read} read from {self.dead_letter_topic} ({self.unreadable} unreadable)"
        )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# -- Kafka I/O -----------------------------------------------------------------------------------------
def read_dead_letters(
    kafka: KafkaSettings, topic: str, codec: EventCodec[DeadLetter], idle_timeout_s: float = 60
) -> Iterator[tuple[str, DeadLetter | None]]:
    """(position, DeadLetter or None when the record is not one) of every record of ``topic`` up to its end.

    A partition's end is the high-water mark of the fetch response that brought its first record (never less than
    the listed end offset). Nothing is yielded before every partition's end is fixed: a partition whose first record
    came is paused (its record held) until the others' have, so a caller acting on what it reads (a replay whose
    records fail again) cannot move an end. Records written after that are not read. Raises TimeoutError when no
    record arrives for ``idle_timeout_s`` before the ends are reached, LookupError when the topic does not exist."""
    c = make_consumer(kafka, f"opal-dlq-{uuid.uuid4().hex[:8]}", **{"enable.auto.commit": False})
    try:
        meta = c.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            why = meta.error if meta is not None else "no metadata"
            raise LookupError(f"topic {topic} is not there ({why}); `opal topology apply` creates it")
        listed: dict[int, int] = {}
        for p in meta.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                listed[p] = high
        ends: dict[int, int] = {}  # fixed by the fetch response that brought the partition's first record
        held: list[tuple[str, DeadLetter | None]] = []  # read before every end was fixed
        paused: list[TopicPartition] = []
        todo = set(listed)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(todo)])
        last = time.monotonic()
        while todo:
            m = c.poll(0.3)
            if m is None or m.error() is not None:
                if time.monotonic() - last > idle_timeout_s:
                    raise TimeoutError(f"{topic}: nothing arrived for {idle_timeout_s:g} s before the end of partitions {sorted(todo)}")
                continue
            last = time.monotonic()
            p, offset = m.partition(), m.offset()
            if p not in todo:
                continue
            if p not in ends:
                _, fetched = c.get_watermark_offsets(TopicPartition(topic, p), cached=True)
                ends[p] = max(listed[p], fetched or 0)
                if len(ends) < len(listed):
                    paused.append(TopicPartition(topic, p))
                    c.pause(paused[-1:])
            if offset >= ends[p]:  # written after this read began
                todo.discard(p)
                continue
            try:
                dl: DeadLetter | None = codec.decode(m.value())
            except OpalError:
                dl = None
            held.append((position(topic, p, offset), dl))
            if offset + 1 >= ends[p]:
                todo.discard(p)
            if len(ends) == len(listed):
                if paused:
                    c.resume(paused)
                    paused.clear()
                yield from held
                held.clear()
        yield from held  # empty: a partition without a fixed end is still to do
    finally:
        c.close()


def overview(kafka: KafkaSettings, topics: TopicSettings, codec: EventCodec[DeadLetter], criteria: Criteria | None = None) -> Overview:
    """The dead letters ``topics.dead_letters`` holds now, by origin topic and reason (see :class:`Overview`)."""
    ov = Overview(topics.dead_letters, replay_lanes(topics), criteria or Criteria())
    for _, dl in read_dead_letters(kafka, topics.dead_letters, codec):
        ov.add(dl)
    return ov


def replay(
    kafka: KafkaSettings,
    topics: TopicSettings,
    codec: EventCodec[DeadLetter],
    criteria: Criteria,
    rate_per_s: float = 0.0,
    dry_run: bool = False,
    producer: Producer | None = None,
    progress: Callable[[int], None] | None = None,
    flush_timeout_s: float = 60.0,
) -> ReplayReport:
    """Replay the dead letters of ``topics.dead_letters`` that ``criteria`` match into their origin topics.

    ``criteria.reasons`` must name at least one reason. At most ``rate_per_s`` records a second (0: no limit).
    Returns the counts once every sent record is acknowledged; raises :class:`ReplayError` otherwise (see the
    module contract). ``progress`` gets the number sent so far every 100 records."""
    if not criteria.reasons:
        raise ValueError("name the reasons to replay (DeadLetter.error_kind); `opal dlq list` shows them")
    lanes = replay_lanes(topics)
    report = ReplayReport(topics.dead_letters, dry_run=dry_run)
    selection = Selection(criteria, lanes, report)
    if dry_run:
        for where, dl in read_dead_letters(kafka, topics.dead_letters, codec):
            selection.consider(dl, where)
        return report
    sender = PacedProducer(producer or make_producer(kafka), rate_per_s)
    try:
        with contextlib.closing(read_dead_letters(kafka, topics.dead_letters, codec)) as records:
            for where, dl in records:
                r = selection.consider(dl, where)
                if r is not None:
                    sender.send(r.topic, r.value, key=r.key, headers=r.headers, label=f"{r.source} -> {r.topic}")
                    if progress is not None and sender.sent % 100 == 0:
                        progress(sender.sent)
                if sender.errors:
                    break  # stop at the first delivery error: fewer records to send again on the rerun
    except BaseException:
        sender.flush(flush_timeout_s)  # what was handed over lands (or fails) before the error goes up
        raise
    not_acked = sender.flush(flush_timeout_s)
    if not_acked:
        raise ReplayError(f"{not_acked} of {sender.sent} replayed records not acknowledged ({sender.problem()}): rerun the replay")
    return report
