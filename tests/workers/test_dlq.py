"""Dead-letter replay (workers/dlq.py): the pure selection, replay's error path (real broker, a failing producer), and
replay on the real broker with dead letters written by the real enrich worker (its model is never called: every record
fails before that). Pacing itself is tested in test_paced_producer.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from schemas.errors import OpalError
from schemas.events import DeadLetter, Header, ImageRef, Lane, ListingImageEvent
from schemas.serde import EventCodec
from schemas.settings import OpalSettings, TopicSettings
from tests.support import REPO, opal_bin, publish, settings_env, wait_for
from topology.admin import apply_topology
from topology.declared import build_topology
from workers.dlq import (
    CORRUPT,
    DUPLICATE,
    NO_VALUE,
    NOT_A_LANE,
    REPLAYED_FROM,
    TRUNCATED,
    Criteria,
    Overview,
    Replay,
    ReplayError,
    ReplayReport,
    Selection,
    check,
    parse_since,
    read_dead_letters,
    replay,
    replay_lanes,
)
from workers.enrich import run_worker
from workers.kafka_clients import make_admin, make_producer, messages_to_end

DL = EventCodec(DeadLetter)
EV = EventCodec(ListingImageEvent)
T = TopicSettings()
LANES = replay_lanes(T)
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def _dl(origin: str = T.images_realtime, kind: str = "invalid_image", value: bytes | None = b"original", **kw: Any) -> DeadLetter:
    fields: dict[str, Any] = {
        "origin_topic": origin,
        "origin_partition": 0,
        "origin_offset": 7,
        "key": b"k",
        "value": value,
        "value_size": None if value is None else len(value),
        "value_sha256": None if value is None else hashlib.sha256(value).hexdigest(),
        "error_kind": kind,
        "error_message": f"{kind} happened",
        "worker": "w",
        "failed_at": NOW,
    }
    return DeadLetter(**(fields | kw))


# -- selection (pure) -----------------------------------------------------------------------------------
def test_lanes_are_the_image_lanes_and_the_preference_topic_never_the_aspects_topic() -> None:
    assert set(LANES) == {T.images_realtime, T.images_backfill, T.preferences}
    assert T.aspects not in LANES and T.dead_letters not in LANES and T.judge_outcomes not in LANES


def test_criteria_match_reason_topic_and_since() -> None:
    dl = _dl()
    assert Criteria().matches(dl)
    assert Criteria(reasons=frozenset({"invalid_image", "x"})).matches(dl)
    assert not Criteria(reasons=frozenset({"malformed_event"})).matches(dl)
    assert Criteria(topics=frozenset({T.images_realtime})).matches(dl)
    assert not Criteria(topics=frozenset({T.images_backfill})).matches(dl)
    assert Criteria(since=NOW).matches(dl) and not Criteria(since=NOW + timedelta(milliseconds=1)).matches(dl)
    assert not Criteria(frozenset({"invalid_image"}), frozenset({T.images_realtime}), NOW + timedelta(1)).matches(dl)


def test_since_takes_a_duration_or_an_iso_time() -> None:
    assert parse_since("30m", NOW) == NOW - timedelta(minutes=30)
    assert parse_since("6h", NOW) == NOW - timedelta(hours=6)
    assert parse_since(" 7d ", NOW) == NOW - timedelta(days=7)
    assert parse_since("1.5s", NOW) == NOW - timedelta(seconds=1.5)
    assert parse_since("2025-05-31T08:00", NOW) == datetime(2025, 5, 31, 8, 0, tzinfo=UTC)  # no zone: UTC
    assert parse_since("2025-05-31", NOW) == datetime(2025, 5, 31, tzinfo=UTC)
    assert parse_since("2025-05-31T08:00+02:00", NOW) == datetime(2025, 5, 31, 6, 0, tzinfo=UTC)
    for bad in ("yesterday", "5 minutes", "-3h", ""):
        with pytest.raises(ValueError, match="duration"):
            parse_since(bad, NOW)


def test_check_refuses_foreign_topics_missing_cut_and_corrupt_values() -> None:
    assert check(_dl(), LANES) is None
    assert check(_dl(T.preferences), LANES) is None
    assert check(_dl(T.aspects), LANES) == f"{NOT_A_LANE}: {T.aspects}"
    assert check(_dl("elsewhere"), LANES) == f"{NOT_A_LANE}: elsewhere"
    assert check(_dl(""), LANES) == f"{NOT_A_LANE}: (none)"
    assert check(_dl(value=None), LANES) == NO_VALUE
    assert check(_dl(truncated=True), LANES) == TRUNCATED
    assert check(_dl(value_size=10_000), LANES) == TRUNCATED  # cut without the flag (an old writer)
    assert check(_dl(value_sha256="0" * 64), LANES) == CORRUPT
    assert check(_dl(value_size=None, value_sha256=None), LANES) is None  # DeadLetter v1: nothing to verify


def test_selection_sends_matching_records_once_per_chain_with_their_headers() -> None:
    report = ReplayReport(T.dead_letters)
    sel = Selection(Criteria(reasons=frozenset({"invalid_image", "image_fetch_failed"})), LANES, report)
    original_headers = [Header(key="trace", value=b"t-1"), Header(key="empty", value=None)]
    a = sel.consider(_dl(key=b"a", value=b"A", headers=original_headers), "dlq/0/3")
    assert a == Replay(T.images_realtime, b"a", b"A", [("trace", b"t-1"), ("empty", None), (REPLAYED_FROM, b"dlq/0/3")], "dlq/0/3")
    # a's record failed again after the replay: its new dead letter carries the header; same chain, not sent twice
    again = _dl(key=b"a", value=b"A", headers=[*original_headers, Header(key=REPLAYED_FROM, value=b"dlq/0/3")])
    assert sel.consider(again, "dlq/0/9") is None
    # a chain whose first dead letter is not in this run: sent, naming its first dead letter (not the newer one)
    b = sel.consider(_dl(T.images_backfill, "image_fetch_failed", b"B", headers=[Header(key=REPLAYED_FROM, value=b"dlq/2/1")]), "dlq/2/8")
    assert b is not None and b.topic == T.images_backfill and b.headers == [(REPLAYED_FROM, b"dlq/2/1")]
    assert sel.consider(_dl(kind="malformed_event"), "dlq/1/0") is None  # not asked for: not even matched
    assert sel.consider(_dl(truncated=True), "dlq/1/1") is None
    assert sel.consider(_dl(T.aspects), "dlq/1/2") is None
    assert sel.consider(None, "dlq/1/3") is None  # not a DeadLetter
    r = report.reasons
    assert set(r) == {"invalid_image", "image_fetch_failed"}
    assert (r["invalid_image"].matched, r["invalid_image"].replayed) == (4, 1)
    assert dict(r["invalid_image"].skipped) == {DUPLICATE: 1, TRUNCATED: 1, f"{NOT_A_LANE}: {T.aspects}": 1}
    assert (r["image_fetch_failed"].matched, r["image_fetch_failed"].replayed, r["image_fetch_failed"].skipped.total()) == (1, 1, 0)
    assert (report.read, report.unreadable, report.matched, report.replayed, report.skipped) == (7, 1, 5, 2, 3)
    assert dict(report.to_topics) == {T.images_realtime: 1, T.images_backfill: 1}
    assert report.line().startswith("dlq replay: 2 of 5 matching dead letters replayed, 3 skipped; 7 read from opal.dead-letters")


def test_overview_groups_by_origin_and_reason() -> None:
    ov = Overview(T.dead_letters, LANES)
    ov.add(_dl(failed_at=NOW, error_message="first"))
    ov.add(_dl(failed_at=NOW + timedelta(hours=1), error_message="newest", truncated=True))
    ov.add(_dl(failed_at=NOW - timedelta(hours=1), error_message="oldest", headers=[Header(key=REPLAYED_FROM, value=b"d/0/0")]))
    ov.add(_dl(T.aspects, "malformed_event"))
    ov.add(_dl(T.aspects, "malformed_event"))
    ov.add(None)
    rows = ov.rows()
    assert [(g.origin_topic, g.reason, g.count, g.replayable, g.after_replay) for g in rows] == [
        (T.aspects, "malformed_event", 2, 0, 0),
        (T.images_realtime, "invalid_image", 3, 2, 1),
    ]
    g = rows[1]
    assert (g.oldest, g.newest, g.last_message) == (NOW - timedelta(hours=1), NOW + timedelta(hours=1), "newest")
    assert ov.line().startswith(
        "dlq: 5 dead letters (2 reasons, 2 origin topics), 2 replayable; 6 read from opal.dead-letters (1 unreadable)"
    )
    only = Overview(T.dead_letters, LANES, Criteria(reasons=frozenset({"malformed_event"})))
    for dl in (_dl(), _dl(T.aspects, "malformed_event")):
        only.add(dl)
    assert [(g.reason, g.count) for g in only.rows()] == [("malformed_event", 1)] and only.read == 2


def test_replay_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="name the reasons"):
        replay(OpalSettings().kafka, T, DL, Criteria())  # refused before any connection


class _Producer:
    """What replay's PacedProducer uses of a confluent-kafka Producer, with deliveries reported on poll/flush:
    ``fail`` makes every delivery report an error, ``refuse`` makes produce raise (as for a value over
    message.max.bytes)."""

    def __init__(self, fail: bool = False, refuse: bool = False) -> None:
        self.fail, self.refuse = fail, refuse
        self.sent: list[tuple[str, bytes | None, bytes, Any]] = []
        self._pending: list[Any] = []

    def produce(self, topic: str, value: bytes, key: bytes | None, headers: Any, on_delivery: Any) -> None:
        if self.refuse:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.sent.append((topic, key, value, headers))
        self._pending.append(on_delivery)

    def poll(self, _timeout: float) -> int:
        pending, self._pending = self._pending, []
        for cb in pending:
            cb(KafkaError(KafkaError._MSG_TIMED_OUT) if self.fail else None, None)
        return len(pending)

    def flush(self, _timeout: float) -> int:
        self.poll(0)
        return 0


# -- on the real broker -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rec:
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes | None]
    partition: int
    offset: int


def _records(s: OpalSettings, topic: str) -> list[_Rec]:
    """Every record ``topic`` holds now, with headers and position."""
    out = [_Rec(m.key(), m.value(), dict(m.headers() or []), m.partition(), m.offset()) for m in messages_to_end(s.kafka, topic, 30)]
    return sorted(out, key=lambda r: (r.partition, r.offset))


def _dead_letters(s: OpalSettings) -> list[tuple[_Rec, DeadLetter]]:
    out = []
    for r in _records(s, s.topics.dead_letters):
        with contextlib.suppress(OpalError):  # the junk record
            out.append((r, DL.decode(r.value)))
    return out


@contextlib.contextmanager
def _enrich_worker(s: OpalSettings) -> Iterator[None]:
    """The real enrich worker in a thread for the block, stopped (finish, commit, leave) after it."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            loop.run_until_complete(run_worker(s, stop))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, name="enrich-worker")
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        if not thread.is_alive():
            loop.close()
    assert not thread.is_alive() and not errors, errors


def _table(stdout: str) -> dict[tuple[str, str], list[str]]:
    """The rows of `opal dlq list`'s table: (origin topic, reason) -> the other cells (wrapped lines skipped)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 8 and cells[0] and cells[1]:
            rows[(cells[0].removesuffix(" (not a lane)"), cells[1])] = cells[2:]
    return rows


def test_a_read_ends_where_the_topic_ended_when_it_began(settings: OpalSettings) -> None:
    s, t = settings, settings.topics
    apply_topology(make_admin(s.kafka), build_topology(s))
    keys = [f"k{i}".encode() for i in range(9)]  # spread over the topic's partitions
    publish(s, t.dead_letters, [(k, DL.encode(_dl(key=k, error_message="before"))) for k in keys])
    producer = make_producer(s.kafka)
    read = []
    for item in read_dead_letters(s.kafka, t.dead_letters, DL, idle_timeout_s=10):
        read.append(item)
        assert len(read) <= 9, "the read chases records written after it began"
        for k in keys:  # written while the read goes on (replayed records failing again): never read
            producer.produce(t.dead_letters, key=k, value=DL.encode(_dl(key=k, error_message="after")))
        assert producer.flush(10) == 0
    assert len(read) == 9 and len({where for where, _ in read}) == 9
    assert all(dl is not None and dl.error_message == "before" for _, dl in read)
    assert len({where.rsplit("/", 2)[1] for where, _ in read}) > 1  # more than one partition took part
    assert len(list(read_dead_letters(s.kafka, t.dead_letters, DL))) == 9 + 9 * 9
    with pytest.raises(LookupError, match="opal topology apply"):
        next(read_dead_letters(s.kafka, f"{t.dead_letters}-missing", DL))


def test_replay_stops_at_the_first_record_not_acknowledged_and_says_rerun(settings: OpalSettings) -> None:
    s, t = settings, settings.topics
    apply_topology(make_admin(s.kafka), build_topology(s))
    keys = [b"a", b"b", b"c"]
    publish(s, t.dead_letters, [(k, DL.encode(_dl(t.images_realtime, key=k, value=b"value-" + k))) for k in keys])
    invalid = Criteria(reasons=frozenset({"invalid_image"}))

    record = rf"{re.escape(t.dead_letters)}/\d+/\d+ -> {re.escape(t.images_realtime)}"
    failing = _Producer(fail=True)  # every delivery report is an error
    with pytest.raises(ReplayError, match=rf"^1 of 1 replayed records not acknowledged \({record}: .*\): rerun the replay$"):
        replay(s.kafka, t, DL, invalid, producer=failing)  # type: ignore[arg-type]
    assert len(failing.sent) == 1, "sending stops at the first delivery error"
    refusing = _Producer(refuse=True)  # produce() itself raises: a failed record, not a crash
    with pytest.raises(ReplayError, match=rf"^1 of 1 replayed records not acknowledged \({record} not accepted by the producer: "):
        replay(s.kafka, t, DL, invalid, producer=refusing)  # type: ignore[arg-type]

    ok = _Producer()
    report = replay(s.kafka, t, DL, invalid, producer=ok)  # type: ignore[arg-type]
    assert report.replayed == 3 and sorted((topic, key, value) for topic, key, value, _ in ok.sent) == [
        (t.images_realtime, k, b"value-" + k) for k in keys
    ]
    assert all(dict(headers)[REPLAYED_FROM].startswith(f"{t.dead_letters}/".encode()) for *_, headers in ok.sent)


def test_replay_sends_exactly_the_matching_dead_letters_back_to_their_lanes(
    settings: OpalSettings, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    outside = (REPO / "data" / "sample" / "images" / "00020b5a.jpg").as_uri()  # exists, but not under the root
    s = settings.model_copy(
        update={
            # a configured model name: the worker starts without asking an endpoint; no record here gets that far
            "vllm": settings.vllm.model_copy(update={"endpoints": ["http://127.0.0.1:9/v1"], "model": "opal-tiny@test"}),
            "worker": settings.worker.model_copy(update={"group_id": f"enrich-{uuid.uuid4().hex[:6]}", "allowed_file_root": root}),
        }
    )
    apply_topology(make_admin(s.kafka), build_topology(s))
    t = s.topics
    env = settings_env(s, cli_env)

    def opal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([opal_bin(), "dlq", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)

    def event(listing_id: str, lane: Lane) -> bytes:
        return EV.encode(ListingImageEvent(listing_id=listing_id, category="shoes", images=[ImageRef(uri=outside)], lane=lane))

    rt, bf = event("rt-outside", Lane.REALTIME), event("bf-outside", Lane.BACKFILL)
    with _enrich_worker(s):
        publish(s, t.images_realtime, [(b"rt-outside", rt), (b"rt-junk", b"this is not an avro record")])
        publish(s, t.images_backfill, [(b"bf-outside", bf)])
        # -> invalid_image twice (outside the root), malformed_event once
        wait_for(lambda: len(_dead_letters(s)) == 3, 60, "the worker's three dead letters", 0.3)
        first = {dl.listing_id: f"{t.dead_letters}/{r.partition}/{r.offset}".encode() for r, dl in _dead_letters(s)}
        # dead letters no replay may send, written the way other workers would
        sha = hashlib.sha256(rt).hexdigest()
        cut = _dl(t.images_realtime, key=b"cut", value=rt[:20], value_size=len(rt), value_sha256=sha, truncated=True)
        foreign = [
            (b"cut", DL.encode(cut)),
            (b"aspect", DL.encode(_dl(t.aspects, key=b"aspect", value=b"an aspect event"))),  # as the indexer writes them
            (b"gone", DL.encode(_dl(t.images_backfill, key=b"gone", value=None))),
            (b"junk", b"not a dead letter"),
        ]
        publish(s, t.dead_letters, foreign)

        listed = opal("list")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        rows = _table(listed.stdout)
        assert {k: v[:3] for k, v in rows.items()} == {  # count, replayable, after replay
            (t.aspects, "invalid_image"): ["1", "0", "0"],
            (t.images_backfill, "invalid_image"): ["2", "1", "0"],
            (t.images_realtime, "invalid_image"): ["2", "1", "0"],
            (t.images_realtime, "malformed_event"): ["1", "1", "0"],
        }, listed.stdout
        assert rows[(t.aspects, "invalid_image")][3] == "2025-06-01 12:00:00"  # oldest failed_at
        assert "outside the allowed root" in listed.stdout and "(not a lane)" in listed.stdout
        summary = f"dlq: 6 dead letters (2 reasons, 3 origin topics), 3 replayable; 7 read from {t.dead_letters} (1 unreadable)"
        assert listed.stdout.strip().splitlines()[-1] == summary, listed.stdout

        dry = opal("replay", "--reason", "invalid_image", "--dry-run")
        assert dry.returncode == 0, dry.stdout + dry.stderr
        summary = f"dlq replay: 2 of 5 matching dead letters would be replayed (dry run), 3 skipped; 7 read from {t.dead_letters}"
        assert dry.stdout.strip().splitlines()[-1].startswith(summary), dry.stdout
        assert "truncated (1)" in dry.stdout and f"not a replay lane: {t.aspects} (1)" in dry.stdout and "no value (1)" in dry.stdout
        assert len(_records(s, t.images_realtime)) == 2 and len(_records(s, t.images_backfill)) == 1  # nothing sent
        refused = opal("replay", "--reason", "invalid_image", "--topic", t.aspects)
        assert refused.returncode == 2 and "not a replay lane" in refused.stdout, refused.stdout
        assert opal("replay").returncode == 2  # no --reason: refused

        report = replay(s.kafka, t, DL, Criteria(reasons=frozenset({"invalid_image"})), rate_per_s=0)
        assert (report.matched, report.replayed, report.skipped, report.unreadable) == (5, 2, 3, 1)
        assert dict(report.to_topics) == {t.images_realtime: 1, t.images_backfill: 1}
        realtime, backfill = _records(s, t.images_realtime), _records(s, t.images_backfill)
        assert sorted((r.key, r.value) for r in realtime) == sorted(
            [(b"rt-outside", rt), (b"rt-junk", b"this is not an avro record"), (b"rt-outside", rt)]
        )  # the original bytes; the malformed one was not asked for
        assert [(r.key, r.value) for r in backfill] == [(b"bf-outside", bf), (b"bf-outside", bf)]
        assert sorted((r.key, r.headers) for r in realtime + backfill if r.headers) == [
            (b"bf-outside", {REPLAYED_FROM: first["bf-outside"]}),
            (b"rt-outside", {REPLAYED_FROM: first["rt-outside"]}),
        ]

        # the worker takes the replayed records, header and all; they fail again, and their dead letters name the first
        wait_for(lambda: sum(bool(dl.headers) for _, dl in _dead_letters(s)) == 2, 60, "the replayed records' dead letters", 0.3)
    again = [dl for _, dl in _dead_letters(s) if dl.headers]
    assert sorted((dl.listing_id, dl.error_kind) for dl in again) == [("bf-outside", "invalid_image"), ("rt-outside", "invalid_image")]
    for dl in again:
        assert [(h.key, h.value) for h in dl.headers] == [(REPLAYED_FROM, first[dl.listing_id])]
    listed = opal("list", "--reason", "invalid_image", "--topic", t.images_realtime)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert _table(listed.stdout)[(t.images_realtime, "invalid_image")][:3] == ["3", "2", "1"], listed.stdout

    # a second replay sends each record once more: a first dead letter and its re-failure are one chain
    second = replay(s.kafka, t, DL, Criteria(reasons=frozenset({"invalid_image"})), rate_per_s=0)
    assert (second.matched, second.replayed, second.reasons["invalid_image"].skipped[DUPLICATE]) == (7, 2, 2)
    assert len(_records(s, t.images_realtime)) == 4 and len(_records(s, t.images_backfill)) == 3
