"""The search indexer against a real tansu broker and a real valkey-server."""

from __future__ import annotations

import subprocess
import threading
import uuid
from typing import Any

import pytest
from pydantic import SecretStr

from opal.embedded import free_port
from schemas.category import default_categories
from schemas.events import AspectEvent, AspectValue, DeadLetter, ModelInfo, SchemaCheck
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from tests.support import REPO, opal_bin, publish, read_topic, settings_env
from topology.admin import apply_topology
from topology.declared import build_topology
from workers.index_worker import IndexerError, IndexerStats, build_indexer
from workers.kafka_clients import make_admin
from workers.metrics import IndexerMetrics
from workers.search_index import SearchIndex, parse_aspect_filters, terms_of

CODEC = EventCodec(AspectEvent)


def aspect_event(listing_id: str, title: str, category: str = "handbag", **aspects: str) -> AspectEvent:
    return AspectEvent(
        listing_id=listing_id,
        source_event_id=f"e-{listing_id}",
        category=category,
        title=title,
        aspects=[AspectValue(name=n.replace("_", " "), value=v, confidence=0.9) for n, v in aspects.items()],
        model=ModelInfo(name="opal-tiny", version="v1"),
        schema_check=SchemaCheck(valid=True),
    )


def record(ev: AspectEvent) -> tuple[bytes, bytes]:
    return ev.listing_id.encode(), CODEC.encode(ev)


@pytest.fixture
def isettings(settings: OpalSettings) -> OpalSettings:
    s = settings.model_copy(update={"redis": settings.redis.model_copy(update={"key_prefix": f"t{uuid.uuid4().hex[:6]}:"})})
    apply_topology(make_admin(s.kafka), build_topology(s))
    return s


def index_of(s: OpalSettings) -> SearchIndex:
    return SearchIndex.from_url(s.redis.url_value(), s.redis.key_prefix)


def run_indexer(s: OpalSettings, group: str, **kw: Any) -> IndexerStats:
    return build_indexer(s, group_id=group, **kw).run(threading.Event(), idle_exit_s=2.0)


def test_terms_keep_only_schema_aspects_and_fold_case() -> None:
    ev = aspect_event("x", "Leather Tote BAG", Color="White", Made_up="Yes")
    terms = terms_of(ev, default_categories())
    assert "a:color=white" in terms and "c:handbag" in terms and {"w:leather", "w:tote", "w:bag"} <= set(terms)
    assert not any(t.startswith("a:made up") for t in terms)
    assert parse_aspect_filters(["Color = White"]) == {"Color": "White"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_aspect_filters(["Color"])


def test_updates_deletes_and_bad_records(isettings: OpalSettings) -> None:
    s = isettings
    publish(
        s,
        s.topics.aspects,
        [
            record(aspect_event("L1", "White leather tote", Color="white", Brand="Nike")),
            record(aspect_event("L2", "Black canvas tote", Color="black")),
            record(aspect_event("L1", "Red leather tote", Color="red", Brand="Nike")),  # L1 changed: white no longer matches
            record(aspect_event("L3", "Brown satchel", Color="brown")),
            (b"L3", None),  # tombstone: L3 removed
            (b"L4", b"not avro at all"),
            (b"L5", CODEC.encode(aspect_event("L6", "Key says L5", Color="red"))),
        ],
    )

    metrics = IndexerMetrics()
    st = run_indexer(s, f"idx-{uuid.uuid4().hex[:6]}", metrics=metrics)

    assert (st.indexed, st.deleted, st.dead_lettered) == (4, 1, 2)
    assert metrics.value("opal_index_records_total", outcome="indexed") == 4
    assert metrics.value("opal_index_dead_letters_total", reason="malformed_event") == 1
    assert sum(metrics.value("opal_index_lag", partition=str(p)) for p in range(3)) == 0  # caught up
    idx = index_of(s)
    assert idx.search({"Color": "White"}) == (0, [])
    total, hits = idx.search({"color": "RED", "Brand": "nike"})
    assert total == 1 and hits[0].listing_id == "L1" and hits[0].title == "Red leather tote"
    assert idx.search(words="tote")[0] == 2
    assert idx.search({"Color": "brown"})[0] == 0 and idx.search(category="handbag")[0] == 2 and idx.count() == 2
    dead = read_topic(s, s.topics.dead_letters, EventCodec(DeadLetter), 2)
    assert sorted((k, d.error_kind) for k, d in dead) == [(b"L4", "malformed_event"), (b"L5", "invalid_event")]
    assert all(d.value is not None and d.origin_topic == s.topics.aspects for _, d in dead)


def test_replaying_the_topic_changes_nothing(isettings: OpalSettings) -> None:
    s = isettings
    publish(s, s.topics.aspects, [record(aspect_event(f"R{i}", f"Tote {i}", Color="white" if i % 2 else "black")) for i in range(20)])
    publish(s, s.topics.aspects, [record(aspect_event("R0", "Tote 0 relisted", Color="red"))])
    first = run_indexer(s, f"idx-{uuid.uuid4().hex[:6]}")
    before = index_of(s).search(category="handbag", limit=100)

    again = run_indexer(s, f"idx-{uuid.uuid4().hex[:6]}")  # a new group reads everything again, as after lost commits

    assert (first.indexed, again.indexed, again.skipped) == (21, 0, 21)
    assert index_of(s).search(category="handbag", limit=100) == before
    assert index_of(s).search({"Color": "red"})[1][0].title == "Tote 0 relisted"


def test_redis_down_stores_no_offsets_and_a_restart_catches_up(isettings: OpalSettings) -> None:
    s = isettings
    publish(s, s.topics.aspects, [record(aspect_event(f"D{i}", f"Bag {i}", Color="white")) for i in range(5)])
    group = f"idx-{uuid.uuid4().hex[:6]}"
    down = s.model_copy(update={"redis": s.redis.model_copy(update={"url": SecretStr(f"redis://127.0.0.1:{free_port()}/0")})})

    metrics = IndexerMetrics()
    stop = threading.Event()
    stopper = threading.Timer(6.0, stop.set)
    stopper.start()
    with pytest.raises(IndexerError, match="stopped while waiting for Redis"):
        # an outage is waited out (partitions paused, Redis probed), never given up on or dead-lettered
        build_indexer(down, group_id=group, max_attempts=2, metrics=metrics).run(stop)
    assert metrics.value("opal_index_redis_breaker_open") == 1 and metrics.value("opal_index_retry_waits_total") >= 3
    st = run_indexer(s, group)  # same group: nothing was committed, so everything is read again

    assert st.indexed == 5 and index_of(s).search({"Color": "white"})[0] == 5


def test_a_record_redis_refuses_is_dead_lettered_not_retried_forever(isettings: OpalSettings) -> None:
    s = isettings
    idx = index_of(s)
    idx.r.set(f"{idx.prefix}t:a:color=red", "not a set")  # the script's SADD to it: a WRONGTYPE reply
    publish(s, s.topics.aspects, [record(aspect_event("W1", "Bag", Color="red")), record(aspect_event("W2", "Bag", Color="blue"))])
    st = run_indexer(s, f"idx-{uuid.uuid4().hex[:6]}")
    assert (st.indexed, st.dead_lettered) == (1, 1)  # Redis answered: the record, not an outage
    dead = read_topic(s, s.topics.dead_letters, EventCodec(DeadLetter), 1)
    assert [(k, d.error_kind) for k, d in dead] == [(b"W1", "internal_error")] and "WRONGTYPE" in dead[0][1].error_message


def test_cli_index_and_search(isettings: OpalSettings, cli_env: dict[str, str]) -> None:
    s = isettings
    publish(s, s.topics.aspects, [record(aspect_event("C1", "Nike white tote", Color="white", Brand="Nike"))])
    env = settings_env(s, cli_env)
    run = subprocess.run(
        [opal_bin(), "worker", "index", "--idle-exit", "2"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "search indexer" in run.stdout
    found = subprocess.run(
        [opal_bin(), "search", "-a", "brand=nike", "--text", "tote"], capture_output=True, text=True, env=env, timeout=60
    )
    assert found.returncode == 0 and "C1" in found.stdout and "1 match(es)" in found.stdout, found.stdout + found.stderr
    bad = subprocess.run([opal_bin(), "search", "-a", "brand"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stdout
