"""Offset bookkeeping of the enrichment worker: which offsets may be stored (pure; no Kafka, no asyncio).

Contract: an offset is handed back for storing only when every offset before it on the same
partition (from the first one this worker added) has finished, so the group never resumes
past a record whose output was not acknowledged. Finishing out of order is fine; a revoked
partition is dropped and nothing of it is stored afterwards. Tested with hypothesis over
every completion order (``tests/workers/test_offsets.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PartitionOffsets:
    """Offsets of one partition: which are in flight, which are done."""

    pending: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)
    next_to_commit: int | None = None  # lowest offset not yet done and stored

    def add(self, offset: int) -> None:
        if self.next_to_commit is None or offset < self.next_to_commit:
            self.next_to_commit = offset
        self.pending.add(offset)

    def finish(self, offset: int) -> int | None:
        """Mark done; returns the new offset to store (next to consume) when the prefix advanced."""
        self.pending.discard(offset)
        self.done.add(offset)
        advanced = None
        while self.next_to_commit is not None and self.next_to_commit in self.done:
            self.done.discard(self.next_to_commit)
            self.next_to_commit += 1
            advanced = self.next_to_commit
        return advanced


class OffsetTracker:
    """Contiguous-prefix offset storing across partitions."""

    def __init__(self) -> None:
        self.partitions: dict[tuple[str, int], PartitionOffsets] = {}

    def add(self, topic: str, partition: int, offset: int) -> None:
        p = self.partitions.get((topic, partition))
        if p is None:  # not setdefault: that builds a PartitionOffsets per call (once per record on the hot path)
            p = self.partitions[(topic, partition)] = PartitionOffsets()
        p.add(offset)

    def finish(self, topic: str, partition: int, offset: int) -> int | None:
        p = self.partitions.get((topic, partition))
        return None if p is None else p.finish(offset)

    def drop(self, topic: str, partition: int) -> None:
        self.partitions.pop((topic, partition), None)

    def resume_at(self, topic: str, partition: int) -> int | None:
        """The offset the group would resume from after a crash now (None when nothing is tracked)."""
        p = self.partitions.get((topic, partition))
        return None if p is None else p.next_to_commit
