"""Catalogue backfill: an inventory export becomes ListingImageEvents on the backfill lane.

The job reads the inventory row by row (``workers/inventory.py``), validates each row, and
produces its event to the backfill image topic, keyed by listing id. It never floods the
cluster: a rate limit, an in-flight window, and lag-aware throttling that pauses while the
enrichment group's backlog on the backfill topic is above ``max_lag`` and resumes below
``resume_lag``.

Contract
- **Checkpoint.** ``<state>.checkpoint.json`` holds ``rows_done``: every row up to it was
  acknowledged by the broker or written to the rejects file. It is replaced atomically
  (temp file + rename + fsync). A row is sent only while it is within ``window`` rows of the
  *saved* checkpoint, so after kill -9 a rerun re-sends at most ``window`` rows. Nothing is
  skipped: every row past the checkpoint is read again.
- **Idempotent ids.** A row's event id is derived from its content
  (:func:`workers.inventory.backfill_event_id`): a re-sent row, or a whole re-run of the same
  inventory, carries the same event ids; a changed listing carries a new one.
- **Rejects.** ``<state>.rejects.jsonl`` gets one JSON line per bad row (row, line,
  listing_id when readable, reason). On resume, entries past the checkpoint are dropped
  before those rows are read again, so each bad row is reported once.
- **Inventory identity.** The checkpoint records the inventory's fingerprint. A file that
  changed while its backfill was unfinished is not resumed (the caller must restart, which
  sends every row again, unchanged rows with the same ids); a changed file whose previous
  backfill finished is a new backfill. A finished, unchanged one is not sent again.
- **One run per checkpoint**: a run holds an exclusive lock on ``<state>.lock``; a second run
  of the same inventory (a Job retried while the old pod still runs) stops with an error.
- :func:`run_backfill` returns after every sent event was acknowledged (or raises
  :class:`BackfillError` at the first failed or refused event: rerun to resume). KeyboardInterrupt
  stops sending, waits for what is in flight, saves the checkpoint and re-raises. Sending is paced
  by :class:`workers.paced_producer.PacedProducer` (no burst after a throttle or a window wait).
- **Lag** is the sum over the backfill topic's partitions of end offset minus the group's
  committed offset (the low watermark where it has none), plus this job's unacknowledged
  events. The end offset is the larger of the broker's and the highest this job saw
  acknowledged (tansu's ListOffsets counts batches, not records).
"""

from __future__ import annotations

import fcntl
import hashlib
import heapq
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from schemas.events import ListingImageEvent
from schemas.serde import CodecSet
from schemas.settings import OpalSettings
from workers.inventory import Format, RowRejected, count_rows, open_inventory, to_event
from workers.kafka_clients import make_consumer, make_producer
from workers.paced_producer import PacedProducer


class BackfillError(RuntimeError):
    """The backfill cannot go on (undelivered events, a changed inventory); rerun resumes from the checkpoint."""


@dataclass(frozen=True)
class BackfillOptions:
    """How fast and how far ahead a backfill may run."""

    rate_per_s: float = 1000.0
    """Most events sent per second (0: unlimited)."""
    max_lag: int = 50_000
    """Pause while the enrichment group's backlog on the backfill topic is above this many records."""
    resume_lag: int | None = None
    """Resume once the backlog is at or below this (default: half of ``max_lag``)."""
    window: int = 1000
    """Most rows sent beyond the saved checkpoint: what a crash can make a rerun send again."""
    lag_check_s: float = 0.5
    """Longest time between two lag measurements while sending (also measured every ``max_lag // 10`` rows)."""
    dry_run: bool = False
    """Read and validate every row, send nothing, write no checkpoint."""

    @property
    def resume_at(self) -> int:
        return self.max_lag // 2 if self.resume_lag is None else self.resume_lag


@dataclass
class Checkpoint:
    """What a rerun needs to resume, and the live state a person (or a test) can watch."""

    inventory: str
    fingerprint: dict[str, Any]
    total_rows: int | None = None
    rows_done: int = 0
    published: int = 0  # rows up to rows_done that were published
    rejected: int = 0  # rows up to rows_done that were rejected (the entries in the rejects file)
    finished: bool = False
    runs: int = 0
    sent_through: int = 0
    lag: int = 0
    max_lag_seen: int = 0
    throttled: bool = False
    throttled_s: float = 0.0
    throttle_episodes: int = 0
    updated_at: str = ""

    @classmethod
    def load(cls, path: Path) -> Checkpoint | None:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise BackfillError(f"checkpoint {path} is not JSON ({e}): delete it or pass --restart") from None
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, path: Path) -> None:
        self.updated_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump(asdict(self), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@dataclass
class BackfillReport:
    inventory: str
    total_rows: int | None
    resumed_after: int  # rows done by earlier runs
    rows_read: int = 0  # by this run
    published: int = 0  # acknowledged in this run
    rejected: int = 0  # in this run
    published_total: int = 0  # all runs, each listing row once (at the end: valid rows)
    rejected_total: int = 0  # all runs, each row once
    throttled_s: float = 0.0
    throttle_episodes: int = 0
    max_lag_seen: int = 0
    elapsed_s: float = 0.0
    dry_run: bool = False
    already_finished: bool = False
    rejects_path: str = ""
    first_rejects: list[dict[str, Any]] = field(default_factory=list)


class AckWindow:
    """Which rows are done (acknowledged or rejected) as a contiguous prefix; pure, for the checkpoint.

    Rows are started in increasing order; each is finished exactly once, in any order.
    """

    def __init__(self, done_through: int = 0) -> None:
        self._pending: list[int] = []
        self._finished: set[int] = set()
        self._last = done_through

    def start(self, row: int) -> None:
        heapq.heappush(self._pending, row)
        self._last = max(self._last, row)

    def finish(self, row: int) -> None:
        self._finished.add(row)

    def skip(self, row: int) -> None:
        """A row done without sending (a reject)."""
        self.start(row)
        self.finish(row)

    @property
    def in_flight(self) -> int:
        return len(self._pending) - len(self._finished)

    @property
    def done_through(self) -> int:
        while self._pending and self._pending[0] in self._finished:
            self._finished.discard(heapq.heappop(self._pending))
        return self._pending[0] - 1 if self._pending else self._last


class GroupLag:
    """The enrichment group's backlog on one topic, read without joining the group."""

    def __init__(self, consumer: Consumer, topic: str) -> None:
        self._c = consumer
        self.topic = topic
        try:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        except KafkaException as e:
            raise BackfillError(f"cannot reach Kafka: {e}") from None
        if meta is None or meta.error is not None or not meta.partitions:
            raise BackfillError(f"topic {topic} does not exist: run `opal topology apply` first")
        self.partitions = sorted(meta.partitions)

    def measure(self, own_ends: dict[int, int]) -> int:
        """The backlog now; raises :class:`BackfillError` when the broker does not answer within 10 s."""
        try:
            return self._measure(own_ends)
        except KafkaException as e:
            raise BackfillError(f"cannot read the enrichment group's offsets on {self.topic}: {e}; rerun to resume") from None

    def _measure(self, own_ends: dict[int, int]) -> int:
        committed = self._c.committed([TopicPartition(self.topic, p) for p in self.partitions], timeout=10)
        total = 0
        for tp in committed:
            low, high = self._c.get_watermark_offsets(TopicPartition(self.topic, tp.partition), timeout=10)
            end = max(high, own_ends.get(tp.partition, 0))
            position = tp.offset if tp.offset >= 0 else low
            total += max(0, end - position)
        return total


def fingerprint(path: Path) -> dict[str, Any]:
    """Size, modification time and a hash of the first MiB: enough to notice a replaced inventory."""
    st = path.stat()
    with path.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": head}


def _trim_rejects(path: Path, through: int) -> None:
    """Keep only the rejects of rows up to ``through`` (a crashed run may have written later ones)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("row", 0) <= through]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


Progress = Callable[[Checkpoint, BackfillReport], None]


def run_backfill(
    s: OpalSettings,
    inventory: Path,
    fmt: Format,
    state: Path,
    options: BackfillOptions,
    *,
    label: str | None = None,
    image_base: Path | None = None,
    fp: dict[str, Any] | None = None,
    restart: bool = False,
    progress: Progress | None = None,
) -> BackfillReport:
    """Backfill ``inventory`` onto ``s.topics.images_backfill``; ``state`` is the path prefix of the checkpoint
    and rejects files. ``image_base`` resolves relative image paths (None: they are rejected)."""
    label = label or str(inventory)
    fp = fp if fp is not None else fingerprint(inventory)
    ck_path = Path(f"{state}.checkpoint.json")
    rejects_path = Path(f"{state}.{'dry-run.' if options.dry_run else ''}rejects.jsonl")
    state.parent.mkdir(parents=True, exist_ok=True)
    lock = None if options.dry_run else _lock(Path(f"{state}.lock"), label)
    try:
        return _run(s, inventory, fmt, state, options, label, image_base, fp, restart, progress, ck_path, rejects_path)
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def _lock(path: Path, label: str) -> Any:
    """An exclusive lock on ``path`` for as long as the returned file stays open: one run per checkpoint."""
    f = path.open("a")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise BackfillError(f"another backfill of {label} is running (lock {path}); wait for it or stop it first") from None
    return f


def _run(
    s: OpalSettings,
    inventory: Path,
    fmt: Format,
    state: Path,
    options: BackfillOptions,
    label: str,
    image_base: Path | None,
    fp: dict[str, Any],
    restart: bool,
    progress: Progress | None,
    ck_path: Path,
    rejects_path: Path,
) -> BackfillReport:
    total = count_rows(inventory, fmt)

    ck = None if (restart or options.dry_run) else Checkpoint.load(ck_path)
    if ck is not None and ck.finished and ck.fingerprint != fp:
        ck = None  # a new export at the same location: a new backfill
    if ck is not None and ck.fingerprint != fp:
        raise BackfillError(f"{label} changed since its checkpoint ({ck_path}, {ck.rows_done} rows done): pass --restart to send it again")
    if ck is not None and ck.finished:
        rep = BackfillReport(label, ck.total_rows, ck.rows_done, already_finished=True, rejects_path=str(rejects_path))
        rep.published_total, rep.rejected_total = ck.published, ck.rejected
        return rep
    if ck is None:
        ck = Checkpoint(inventory=label, fingerprint=fp)
        rejects_path.unlink(missing_ok=True)
    else:
        _trim_rejects(rejects_path, ck.rows_done)
    ck.total_rows, ck.runs = total, ck.runs + 1
    ck.throttled, ck.sent_through = False, ck.rows_done
    rep = BackfillReport(label, total, ck.rows_done, dry_run=options.dry_run, rejects_path=str(rejects_path))
    rep.published_total, rep.rejected_total = ck.published, ck.rejected  # live; exact once finished
    window = AckWindow(ck.rows_done)
    saved_through = ck.rows_done
    t0 = time.monotonic()

    codec = CodecSet.of(s.kafka)[ListingImageEvent]
    topic = s.topics.images_backfill
    producer = None if options.dry_run else PacedProducer(make_producer(s.kafka), options.rate_per_s)
    probe_consumer = None if options.dry_run else make_consumer(s.kafka, f"{s.worker.group_id}.backfill", **{"enable.auto.commit": False})
    lag = GroupLag(probe_consumer, topic) if probe_consumer is not None else None
    own_ends: dict[int, int] = {}
    rejected_rows: deque[int] = deque()  # rejected in this run, past the saved checkpoint

    def save() -> None:
        """Checkpoint the finished prefix: rejects reach the disk first, and the counts change in one step (a
        SIGTERM raised in between must not count rows twice)."""
        nonlocal saved_through
        done = window.done_through
        newly_rejected = sum(r <= done for r in rejected_rows)  # rejected_rows is in row order
        published = ck.published + (done - ck.rows_done) - newly_rejected
        if not options.dry_run:
            rejects.flush()
            os.fsync(rejects.fileno())
        ck.published, ck.rows_done, ck.rejected = published, done, ck.rejected + newly_rejected
        for _ in range(newly_rejected):
            rejected_rows.popleft()
        if not options.dry_run:
            ck.save(ck_path)
        saved_through = ck.rows_done

    def acked(row: int, msg: Message) -> None:
        """The broker acknowledged ``row``'s event (a failed one never gets here: its row stays unfinished)."""
        p = msg.partition()
        own_ends[p] = max(own_ends.get(p, 0), (msg.offset() or 0) + 1)
        rep.published += 1
        window.finish(row)

    def serve_acks(timeout_s: float) -> None:
        """Serve delivery reports for up to ``timeout_s``; stop at a failed one: its row stays in flight for good (the
        checkpoint never passes it), so never wait on it."""
        assert producer is not None
        producer.poll(timeout_s)
        if producer.errors:
            raise BackfillError(f"{len(producer.errors)} events were not acknowledged ({producer.problem()}): rerun to resume")

    rejects = rejects_path.open("a")
    last_check = last_save = last_report = 0.0
    since_check = 0
    check_every = max(1, options.max_lag // 10)

    def report(force: bool = False) -> None:
        nonlocal last_report
        now = time.monotonic()
        if progress is not None and (force or now - last_report >= 0.25):
            last_report = now
            rep.elapsed_s = now - t0
            progress(ck, rep)

    def measure_lag() -> int:
        assert lag is not None
        value = lag.measure(own_ends) + window.in_flight
        ck.lag = value
        ck.max_lag_seen = rep.max_lag_seen = max(rep.max_lag_seen, value)
        return value

    def throttle() -> None:
        """Wait while the backlog is above the bound; keep acknowledging and checkpointing meanwhile."""
        if measure_lag() <= options.max_lag:
            return
        ck.throttled = True
        ck.throttle_episodes = rep.throttle_episodes = rep.throttle_episodes + 1
        start = time.monotonic()
        try:
            while True:
                serve_acks(0.25)
                save()
                report(force=True)
                if measure_lag() <= options.resume_at:
                    break
        finally:
            waited = time.monotonic() - start
            rep.throttled_s += waited
            ck.throttled_s += waited
            ck.throttled = False

    try:
        for row in open_inventory(inventory, fmt, skip=ck.rows_done):
            rep.rows_read += 1
            try:
                event = to_event(row, image_base)
            except RowRejected as e:
                entry: dict[str, Any] = {"row": row.row, "line": row.line, "reason": str(e)}
                if row.data is not None and isinstance(row.data.get("listing_id"), str | int):
                    entry["listing_id"] = str(row.data["listing_id"])[:200]
                rejects.write(json.dumps(entry) + "\n")
                rejects.flush()
                if len(rep.first_rejects) < 5:
                    rep.first_rejects.append(entry)
                rep.rejected += 1
                rep.rejected_total += 1
                rejected_rows.append(row.row)
                window.skip(row.row)
                report()
                continue
            if producer is None:  # dry run
                window.skip(row.row)
                report()
                continue
            if since_check >= check_every or time.monotonic() - last_check >= options.lag_check_s:
                throttle()
                last_check, since_check = time.monotonic(), 0
            while row.row > saved_through + options.window:  # the crash bound: wait for acks, then checkpoint
                serve_acks(0.05)
                save()
            window.start(row.row)  # before send: its ack can be served inside send; paced there, no burst after a pause
            producer.send(topic, codec.encode(event), key=event.listing_id.encode(), label=f"row {row.row}", on_ack=partial(acked, row.row))
            since_check += 1
            ck.sent_through = row.row
            serve_acks(0)  # a refused row (e.g. too large) or a failed delivery stops the run here
            if (now := time.monotonic()) - last_save >= 1.0:
                save()
                last_save = now
            report()
        if producer is not None and (not_acked := producer.flush(60)):
            raise BackfillError(f"{not_acked} events were not acknowledged ({producer.problem()}): rerun to resume")
        ck.finished = not options.dry_run
        save()
        rep.published_total, rep.rejected_total = ck.published, ck.rejected
        report(force=True)
    except KeyboardInterrupt:
        if producer is not None:
            producer.flush(30)
        save()
        raise
    finally:
        rejects.close()
        if probe_consumer is not None:
            probe_consumer.close()
        rep.elapsed_s = time.monotonic() - t0
    return rep
