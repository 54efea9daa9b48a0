"""What topics and consumer groups OPAL needs, derived from settings only.

Pure data: building a :class:`Topology` talks to nothing. ``topology.admin`` applies
it to a cluster; ``opal topology show`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.events import AspectEvent, DeadLetter, JudgeOutcome, Lane, ListingImageEvent, PreferencePair, _Event
from schemas.settings import OpalSettings

DAY_MS = 24 * 3600 * 1000
INDEXER_GROUP = "opal-search-indexer"
JUDGE_GROUP = "opal-judge"


def enrich_group_id(group_id: str, lane: Lane) -> str:
    """The consumer group of one lane of the enrichment worker: ``<OPAL_WORKER_GROUP_ID>.<lane>``."""
    return f"{group_id}.{lane.value.lower()}"


PREFERENCE_GROUP = "opal-preference-builder"


@dataclass(frozen=True)
class TopicSpec:
    """One topic. ``configs`` are verified on existing topics key by key."""

    name: str
    partitions: int
    configs: dict[str, str]
    key: str
    value: type[_Event]
    description: str


@dataclass(frozen=True)
class ConsumerGroup:
    """A consumer group, what it reads and what it writes (topics or external sinks)."""

    group_id: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    process: str
    description: str


@dataclass(frozen=True)
class Topology:
    topics: tuple[TopicSpec, ...]
    groups: tuple[ConsumerGroup, ...]
    replication_factor: int = 1
    notes: tuple[str, ...] = field(default=())

    def topic(self, name: str) -> TopicSpec:
        return next(t for t in self.topics if t.name == name)


def build_topology(settings: OpalSettings) -> Topology:
    """The topology for these settings (names and partition counts come from them)."""
    t = settings.topics
    p = t.partitions
    topics = (
        TopicSpec(
            t.images_realtime,
            p,
            {"retention.ms": str(7 * DAY_MS)},
            "listing_id",
            ListingImageEvent,
            "New and changed listings; served ahead of backfill.",
        ),
        TopicSpec(
            t.images_backfill,
            p,
            {"retention.ms": str(14 * DAY_MS)},
            "listing_id",
            ListingImageEvent,
            "Existing inventory to (re)enrich; served when realtime is idle or up to worker.backfill_share.",
        ),
        # Compaction keeps the latest AspectEvent per listing id: the "current record" contract.
        # NOTE tansu accepts cleanup.policy=compact but does not enforce it; Apache Kafka does.
        TopicSpec(
            t.aspects,
            p,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": str(3600 * 1000)},
            "listing_id",
            AspectEvent,
            "Current generated title and aspects per listing (compacted).",
        ),
        TopicSpec(
            t.dead_letters,
            3,
            {"retention.ms": str(30 * DAY_MS)},
            "original key",
            DeadLetter,
            "Every record a worker gave up on, with reason and raw bytes.",
        ),
        TopicSpec(
            t.judge_outcomes, p, {"retention.ms": str(30 * DAY_MS)}, "listing_id", JudgeOutcome, "Judge verdicts on generated listings."
        ),
        TopicSpec(
            t.preferences,
            3,
            {"cleanup.policy": "compact"},
            "pair_id",
            PreferencePair,
            "DPO preference pairs from low-scoring judge outcomes (compacted by pair id: idempotent).",
        ),
    )
    groups = (
        ConsumerGroup(
            enrich_group_id(settings.worker.group_id, Lane.REALTIME),
            (t.images_realtime,),
            (t.aspects, t.dead_letters),
            "enrich worker (confluent-kafka) -> vLLM",
            "New listings in, schema-valid AspectEvents out; image cache in Redis. Served first.",
        ),
        ConsumerGroup(
            enrich_group_id(settings.worker.group_id, Lane.BACKFILL),
            (t.images_backfill,),
            (t.aspects, t.dead_letters),
            "enrich worker (confluent-kafka) -> vLLM",
            "Catalogue backfill, same workers: a group of its own so pausing one lane never touches the other.",
        ),
        ConsumerGroup(
            JUDGE_GROUP,
            (t.aspects,),
            (t.judge_outcomes, t.preferences, t.dead_letters),
            "judge agent (faust-streaming) -> MLLM judge (OPAL_JUDGE_ENDPOINT) or reference rules",
            "Scores generated listings against the seller's MACE-refined listing; low verdicts become preference pairs.",
        ),
        ConsumerGroup(
            PREFERENCE_GROUP,
            (t.preferences,),
            ("DPO dataset shards (JSONL files)",),
            "preference-set builder (faust-streaming)",
            "Writes the next DPO preference set.",
        ),
        ConsumerGroup(
            INDEXER_GROUP,
            (t.aspects,),
            (t.dead_letters, "search index (Redis sets per aspect, category and title word)"),
            "search indexer (confluent-kafka) -> Redis",
            "Keeps the latest aspects per listing searchable; idempotent by Kafka position.",
        ),
    )
    return Topology(topics, groups, settings.kafka.replication_factor)
