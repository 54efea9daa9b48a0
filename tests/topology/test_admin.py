from __future__ import annotations

import subprocess

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.settings import OpalSettings
from tests.support import REPO, opal_bin
from topology.admin import TopologyMismatchError, apply_topology
from topology.declared import build_topology
from workers.kafka_clients import make_admin


def _admin(s: OpalSettings) -> AdminClient:
    return make_admin(s.kafka)


def test_apply_creates_then_is_idempotent(settings: OpalSettings) -> None:
    topo = build_topology(settings)
    first = apply_topology(_admin(settings), topo)
    assert [r.status for r in first] == ["created"] * len(topo.topics)
    second = apply_topology(_admin(settings), topo)
    assert [r.status for r in second] == ["ok"] * len(topo.topics)
    md = _admin(settings).list_topics(timeout=5).topics
    for spec in topo.topics:
        assert len(md[spec.name].partitions) == spec.partitions


def test_partition_mismatch_fails_and_creates_nothing(settings: OpalSettings) -> None:
    admin = _admin(settings)
    wrong = settings.topics.aspects
    admin.create_topics([NewTopic(wrong, 1, 1, config={"cleanup.policy": "compact", "min.compaction.lag.ms": "3600000"})])[wrong].result(10)
    with pytest.raises(TopologyMismatchError) as ei:
        apply_topology(admin, build_topology(settings))
    assert f"{wrong}: has 1 partitions, declared 3" in str(ei.value)
    existing = set(admin.list_topics(timeout=5).topics)
    assert settings.topics.images_realtime not in existing  # verify-before-change


def test_config_mismatch_is_reported(settings: OpalSettings) -> None:
    admin = _admin(settings)
    name = settings.topics.aspects
    admin.create_topics([NewTopic(name, 3, 1, config={"cleanup.policy": "delete"})])[name].result(10)
    with pytest.raises(TopologyMismatchError, match=r"cleanup\.policy='delete', declared 'compact'"):
        apply_topology(admin, build_topology(settings))


def test_cli_apply_exits_1_on_mismatch(settings: OpalSettings, cli_env: dict[str, str]) -> None:
    admin = _admin(settings)
    admin.create_topics([NewTopic(settings.topics.dead_letters, 7, 1)])[settings.topics.dead_letters].result(10)
    env = dict(
        cli_env,
        OPAL_KAFKA_BOOTSTRAP=settings.kafka.bootstrap or "",
        OPAL_TOPICS_DEAD_LETTERS=settings.topics.dead_letters,
        OPAL_TOPICS_PARTITIONS="3",
    )
    r = subprocess.run([opal_bin(), "topology", "apply"], env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1
    assert "has 7 partitions, declared 3" in r.stdout


def test_show_prints_flow(cli_env: dict[str, str]) -> None:
    r = subprocess.run([opal_bin(), "topology", "show"], env=cli_env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0
    assert "--[opal-enrich.realtime:" in r.stdout and "--[opal-enrich.backfill:" in r.stdout and "opal.listing-aspects" in r.stdout
