"""The enrich worker's consumers: one per lane, with assignment, pause/resume, lag and offset storing.

This is the consumer wrapper, kept apart from the app loop (:mod:`workers.enrich.worker`): the loop
asks it for messages and tells it which partitions to pause; the output side tells it which records
are finished. It never decides anything about a record.

Contract
- :meth:`LaneConsumers.hold` makes a :class:`~workers.enrich.record.Record` of a consumed message and tracks
  its offset; :meth:`release` is called once the record's output was acknowledged by the broker.
- An offset is *stored* (``store_offsets``; librdkafka's background commit persists it, and
  :meth:`close` commits synchronously) only as the end of a contiguous finished prefix of its
  partition (:class:`workers.offsets.OffsetTracker`), and only for partitions still assigned.
  Offsets finished in one round of delivery reports are stored with one call per lane
  (:meth:`store`). So the group never resumes past a record without an acknowledged output.
- A revoked (or lost) partition is committed first, then dropped: records of it still in flight are
  produced when they finish, but their offsets are never stored (the next owner replays them).
- Paused partitions are still polled (liveness and rebalance callbacks) and deliver nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from schemas.events import Lane
from workers.enrich.record import Record
from workers.metrics import WorkerMetrics
from workers.offsets import OffsetTracker

log = logging.getLogger(__name__)

TopicPartitionKey = tuple[str, int]
LAG_CHECK_S = 0.2
"""How often lag and the age of the oldest record are recomputed (they are advisory)."""


class LaneConsumers:
    """The realtime and backfill consumers of one worker (see the module contract)."""

    def __init__(self, consumers: dict[Lane, Consumer], topics: dict[Lane, str], metrics: WorkerMetrics, session_timeout_s: float) -> None:
        self.consumers = consumers
        self.topics = topics
        self.lane_of = {topic: lane for lane, topic in topics.items()}
        self.metrics = metrics
        self.tracker = OffsetTracker()
        self.records: dict[tuple[str, int, int], Record] = {}  # held: consumed, output not yet acknowledged
        self.held = dict.fromkeys(Lane, 0)  # records held per lane
        self.assigned: set[TopicPartitionKey] = set()
        self.paused: set[TopicPartitionKey] = set()
        self.joined: set[Lane] = set()  # lanes whose consumer holds a completed group join (left on revoke or loss)
        self.last_rebalance = 0.0
        self.settle_s = session_timeout_s + 1.0
        self.lag: dict[TopicPartitionKey, int] = {}
        self._last_lag_check = 0.0
        self._to_store: dict[TopicPartitionKey, int] = {}
        # metric children bound once (a labels() look-up per record costs more than the increment)
        self._m_consumed = {lane: metrics.consumed.labels(lane.value) for lane in Lane}
        self._m_in_flight = {lane: metrics.in_flight.labels(lane.value) for lane in Lane}

    # -- assignment ------------------------------------------------------------------------
    def subscribe(self) -> None:
        for lane, consumer in self.consumers.items():
            consumer.subscribe([self.topics[lane]], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke)

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self.joined |= {lane for lane, c in self.consumers.items() if c is consumer}  # also on an empty assignment
        self.last_rebalance = time.monotonic()
        self.assigned |= {(tp.topic, tp.partition) for tp in parts}
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in parts))

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        # the lane joins again (on_assign marks it): until then flow control and shutdown treat it as not joined, so
        # a stop during the re-join waits for it (tansu: leaving with a JoinGroup pending wedges the group)
        self.joined -= {lane for lane, c in self.consumers.items() if c is consumer}
        self.last_rebalance = time.monotonic()
        self.commit(consumer)
        for tp in parts:
            key = (tp.topic, tp.partition)
            self.lag.pop(key, None)
            for gauge in (self.metrics.lag, self.metrics.commit_lag):  # another member reports it now
                with contextlib.suppress(KeyError):
                    gauge.remove(tp.topic, str(tp.partition))
            self.assigned.discard(key)
            self.paused.discard(key)
            self.tracker.drop(*key)  # in-flight results of a revoked partition are produced but not stored
        log.info("revoked %s", [(tp.topic, tp.partition) for tp in parts])

    def settled(self) -> bool:
        """Every lane has joined and a session timeout has passed since the last rebalance (a member that died
        holding partitions is noticed only then)."""
        return self.joined == set(self.consumers) and time.monotonic() - self.last_rebalance >= self.settle_s

    def lane_paused(self, lane: Lane) -> bool:
        """True when the lane has no partition it could fetch from (none assigned yet, or all paused)."""
        mine = {tp for tp in self.assigned if self.lane_of.get(tp[0]) is lane}
        return not mine or mine <= self.paused

    # -- consuming -------------------------------------------------------------------------
    def consume(self, lane: Lane, n: int, timeout: float) -> list[Record]:
        """Up to ``n`` messages of ``lane`` as held records (errors other than end-of-partition are logged)."""
        msgs = self.consumers[lane].consume(n, timeout)
        if not msgs:
            return []
        now = time.monotonic()
        out: list[Record] = []
        for m in msgs:
            err = m.error()
            if err is None:
                out.append(self.hold(m, lane, now))
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error (%s lane): %s", lane.value, err)
        if out:
            self._m_consumed[lane].inc(len(out))
            self._m_in_flight[lane].inc(len(out))
        return out

    def hold(self, msg: Message, lane: Lane, now: float) -> Record:
        """Track one message's offset and count it in its lane's window (metrics: the caller)."""
        key = (msg.topic(), msg.partition(), msg.offset())
        self.tracker.add(*key)
        record = Record(msg, lane, now)
        replaced = self.records.get(key)
        if replaced is not None:  # consumed again after a rebalance while its first copy is still out
            self.held[replaced.lane] -= 1
        self.records[key] = record
        self.held[lane] += 1
        return record

    def release(self, record: Record) -> None:
        """The record's output is acknowledged: it leaves the window; its offset is stored with the others of this
        round (:meth:`store`) once every offset before it on its partition is finished too."""
        key = record.key
        if self.records.get(key) is record:
            del self.records[key]
            self.held[record.lane] -= 1
        self._m_in_flight[record.lane].dec()
        nxt = self.tracker.finish(*key)
        if nxt is not None:
            self._to_store[(key[0], key[1])] = nxt

    def store(self) -> None:
        """Store the newest finished prefix of each partition still assigned: one call per lane's consumer."""
        if not self._to_store:
            return
        todo, self._to_store = self._to_store, {}
        for lane, consumer in self.consumers.items():
            tps = [TopicPartition(t, p, o) for (t, p), o in todo.items() if (t, p) in self.assigned and self.lane_of.get(t) is lane]
            if tps:
                try:
                    consumer.store_offsets(offsets=tps)
                except Exception as e:
                    log.warning("could not store offsets %s: %s", [(tp.topic, tp.partition, tp.offset) for tp in tps], e)

    # -- pausing and lag -----------------------------------------------------------------------
    def pause_only(self, want: set[TopicPartitionKey]) -> None:
        """Pause exactly ``want`` (of the assigned partitions) and resume the rest that were paused."""
        for lane, consumer in self.consumers.items():
            pause = [TopicPartition(t, p) for t, p in want - self.paused if self.lane_of.get(t) is lane]
            resume = [TopicPartition(t, p) for t, p in (self.paused - want) & self.assigned if self.lane_of.get(t) is lane]
            if pause:
                consumer.pause(pause)
            if resume:
                consumer.resume(resume)
        self.paused = want & self.assigned
        self.metrics.paused.set(len(self.paused))

    def update_lag(self) -> None:
        """Lag per partition (high-water mark of fetched messages minus position) and commit lag, at most every
        :data:`LAG_CHECK_S`; advisory, so any failure to read them is skipped."""
        now = time.monotonic()
        if now - self._last_lag_check < LAG_CHECK_S or not self.assigned:
            return
        self._last_lag_check = now
        for lane, consumer in self.consumers.items():
            tps = [TopicPartition(t, p) for t, p in self.assigned if self.lane_of.get(t) is lane]
            if not tps:
                continue
            try:
                positions = consumer.position(tps)
            except Exception:  # position() can fail mid-rebalance
                continue
            for tp in positions:
                self._record_lag(consumer, tp)
        oldest = min((r.consumed_at for r in self.records.values()), default=None)
        self.metrics.oldest_in_flight.set(0.0 if oldest is None else now - oldest)

    def _record_lag(self, consumer: Consumer, tp: TopicPartition) -> None:
        try:
            low, high = consumer.get_watermark_offsets(tp, cached=True)
        except Exception:
            return
        if high is None or high < 0:
            return  # no fetch response yet: lag unknown
        if tp.offset >= 0:
            lag = max(0, high - tp.offset)
        elif low is not None and low >= 0:
            lag = max(0, high - low)  # nothing consumed yet: count the whole partition (conservative)
        else:
            return
        self.lag[(tp.topic, tp.partition)] = lag
        self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
        tracked = self.tracker.resume_at(tp.topic, tp.partition)
        resume_at = tracked if tracked is not None else tp.offset
        if resume_at is not None and resume_at >= 0:
            self.metrics.commit_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - resume_at))

    # -- shutdown --------------------------------------------------------------------------
    def commit(self, consumer: Consumer) -> None:
        """Synchronously commit what has been stored (nothing stored is not an error)."""
        try:
            consumer.commit(asynchronous=False)
        except Exception as e:
            log.debug("commit: %s", e)

    async def finish_joining(self, timeout_s: float) -> None:
        """Poll each lane until its group join completed (or ``timeout_s``). tansu 0.6 bug: a member that leaves
        while its JoinGroup is pending leaves the group stuck for every later member (Apache Kafka handles it).
        Records fetched meanwhile are not held: the next owner consumes them again."""
        deadline = time.monotonic() + timeout_s
        for lane, consumer in self.consumers.items():
            while lane not in self.joined and time.monotonic() < deadline:
                consumer.poll(0.1)
                await asyncio.sleep(0)

    def close(self) -> None:
        """Commit what is stored and leave the groups (idempotent per consumer close)."""
        for consumer in self.consumers.values():
            self.commit(consumer)
            consumer.close()
