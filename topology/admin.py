"""Make a cluster match a :class:`~topology.declared.Topology`.

Contract of :func:`apply_topology`
- Idempotent: running it again on a matching cluster changes nothing and reports
  every topic as ``ok``.
- Verify before change: all existing topics are checked first; if any differs from
  its declaration (partition count, a declared config value) it raises
  :class:`TopologyMismatchError` listing every difference and creates nothing.
- Then it creates the missing topics; a topic created concurrently by someone else
  (``TOPIC_ALREADY_EXISTS``) is verified like any existing one.
- Safe to retry after any failure: it only ever creates, never alters or deletes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from topology.declared import TopicSpec, Topology

Status = Literal["created", "ok", "mismatch"]


@dataclass(frozen=True)
class TopicResult:
    name: str
    status: Status
    detail: str = ""


class TopologyMismatchError(RuntimeError):
    """Existing topics differ from their declaration. ``results`` has every topic's state."""

    def __init__(self, results: list[TopicResult]) -> None:
        self.results = results
        bad = [r for r in results if r.status == "mismatch"]
        lines = "\n".join(f"  - {r.name}: {r.detail}" for r in bad)
        super().__init__(
            f"{len(bad)} topic(s) differ from the declared topology; nothing was changed:\n{lines}\n"
            "Fix the settings (OPAL_TOPICS_*) or migrate the topics by hand; OPAL never alters or deletes topics."
        )


def _verify(admin: AdminClient, spec: TopicSpec, partitions: int, timeout_s: float) -> TopicResult:
    problems: list[str] = []
    if partitions != spec.partitions:
        problems.append(f"has {partitions} partitions, declared {spec.partitions}")
    if spec.configs:
        res = ConfigResource(ResourceType.TOPIC, spec.name)
        actual = admin.describe_configs([res], request_timeout=timeout_s)[res].result(timeout=timeout_s)
        for key, want in sorted(spec.configs.items()):
            entry = actual.get(key)
            have = None if entry is None else entry.value
            if have != want:
                problems.append(f"config {key}={have!r}, declared {want!r}")
    if problems:
        return TopicResult(spec.name, "mismatch", "; ".join(problems))
    return TopicResult(spec.name, "ok", f"{partitions} partitions")


def apply_topology(admin: AdminClient, topology: Topology, timeout_s: float = 15.0) -> list[TopicResult]:
    """Create what is missing, verify what exists (see module contract)."""
    existing = {name: len(md.partitions) for name, md in admin.list_topics(timeout=timeout_s).topics.items()}
    results = {s.name: _verify(admin, s, existing[s.name], timeout_s) for s in topology.topics if s.name in existing}
    if any(r.status == "mismatch" for r in results.values()):
        raise TopologyMismatchError([results.get(s.name, TopicResult(s.name, "ok", "missing; not created")) for s in topology.topics])

    missing = [s for s in topology.topics if s.name not in existing]
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, topology.replication_factor, config=dict(s.configs)) for s in missing],
            request_timeout=timeout_s,
        )
        raced: list[TopicSpec] = []
        for s in missing:
            try:
                futures[s.name].result(timeout=timeout_s)
                results[s.name] = TopicResult(s.name, "created", f"{s.partitions} partitions, rf {topology.replication_factor}")
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
                raced.append(s)
        if raced:
            parts = {n: len(md.partitions) for n, md in admin.list_topics(timeout=timeout_s).topics.items()}
            for s in raced:
                results[s.name] = _verify(admin, s, parts[s.name], timeout_s)
            if any(r.status == "mismatch" for r in results.values()):
                raise TopologyMismatchError([results[s.name] for s in topology.topics])
    return [results[s.name] for s in topology.topics]
