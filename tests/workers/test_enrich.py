"""The enrichment worker end to end on the real broker, real valkey and real vLLM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from schemas.category import default_categories
from schemas.events import AspectEvent, DeadLetter, ImageRef, Lane, ListingImageEvent
from schemas.serde import EventCodec
from schemas.settings import OpalSettings, TopicSettings
from tests.support import REPO, opal_bin, publish, read_to_end, read_topic
from tests.support import worker_events as _events
from topology.admin import apply_topology
from topology.declared import build_topology
from workers.enrich import EnrichWorker, run_worker
from workers.enrich.lanes import LaneConsumers
from workers.kafka_clients import make_admin
from workers.metrics import WorkerMetrics

pytestmark = pytest.mark.vllm
CODEC = EventCodec(ListingImageEvent)


def _publish(s: OpalSettings, records: list[tuple[bytes, bytes | None]], topic: str | None = None) -> None:
    publish(s, topic or s.topics.images_realtime, records)


_read = read_topic


def _run(s: OpalSettings, idle: float = 2.0) -> tuple[EnrichWorker, WorkerMetrics]:
    metrics = WorkerMetrics()
    w = asyncio.run(run_worker(s, asyncio.Event(), idle_exit_s=idle, metrics=metrics))
    return w, metrics


def test_n_in_n_out_then_cache_skips_the_model(wsettings: OpalSettings, images: Path) -> None:
    evs = _events(images, 12)
    _publish(wsettings, [(e.listing_id.encode(), CODEC.encode(e)) for e in evs])
    w, m = _run(wsettings)
    out = _read(wsettings, wsettings.topics.aspects, EventCodec(AspectEvent), 12)
    assert sorted(k.decode() for k, _ in out) == sorted(e.listing_id for e in evs)
    by_id = {e.listing_id: e for e in evs}
    for key, ev in out:
        assert ev.listing_id == key.decode() and ev.source_event_id == by_id[ev.listing_id].event_id
        assert ev.schema_check.valid and ev.model.name == "opal-tiny" and not ev.cache_hit
        assert ev.category == by_id[ev.listing_id].category
    assert m.value("opal_enrich_aspect_events_total") == 12
    assert m.value("opal_enrich_model_requests_total") == 12
    assert w.clients.model.stats.requests >= 12

    # a cached entry keeps the schema check its output got: one entry rewritten as if it had been invalid
    from workers.result_cache import CachedListing, ResultCache

    first = out[0][1]
    marked = CachedListing(first.title, [(a.name, a.value, a.confidence) for a in first.aspects], invalid_values=["Color=sky"])
    cache = ResultCache(wsettings.redis.url_value(), 60, wsettings.redis.key_prefix)
    schema_key = default_categories().resolve(first.category).key

    async def mark() -> None:
        await cache.put(f"{first.model.name}@{first.model.version}", schema_key, first.image_sha256, marked)
        await cache.aclose()

    asyncio.run(mark())

    # same photos again (new listings): every result comes from valkey, no request reaches the server
    again = _events(images, 12, prefix="again")
    _publish(wsettings, [(e.listing_id.encode(), CODEC.encode(e)) for e in again])
    w2, m2 = _run(wsettings)
    out2 = [ev for _, ev in _read(wsettings, wsettings.topics.aspects, EventCodec(AspectEvent), 24) if ev.listing_id.startswith("again-")]
    assert len(out2) == 12 and all(ev.cache_hit for ev in out2)
    checks = {ev.image_sha256: ev.schema_check for ev in out2}
    assert not checks[first.image_sha256].valid and checks[first.image_sha256].invalid_values == ["Color=sky"]
    assert sum(c.valid for c in checks.values()) == len(checks) - 1
    assert m2.value("opal_enrich_cache_hits_total") == 12
    assert m2.value("opal_enrich_model_requests_total") == 0
    assert w2.clients.model.stats.requests == 1  # only the start-up GET /models; no generation request


def test_poison_events_become_dead_letters(wsettings: OpalSettings, images: Path) -> None:
    good = _events(images, 4)
    base = good[0]
    outside = REPO / "data" / "sample" / "images" / "00020b5a.jpg"  # exists, but outside the allowed root
    bad = {
        "bad-avro": b"\xc3\x01garbage that is not avro",
        "corrupt-image": CODEC.encode(
            base.model_copy(update={"listing_id": "corrupt-image", "images": [ImageRef(uri=(images / "truncated.jpg").as_uri())]})
        ),
        "outside-root": CODEC.encode(base.model_copy(update={"listing_id": "outside-root", "images": [ImageRef(uri=outside.as_uri())]})),
        "http-not-allowed": CODEC.encode(
            base.model_copy(update={"listing_id": "http-not-allowed", "images": [ImageRef(uri="http://169.254.169.254/latest/meta-data")]})
        ),
        "oversized": CODEC.encode(
            base.model_copy(update={"listing_id": "oversized", "images": [ImageRef(uri=(images / "huge.png").as_uri())]})
        ),
    }
    no_schema = base.model_copy(update={"listing_id": "no-schema", "category": "spaceship"})  # enriched: generic schema
    records = [(e.listing_id.encode(), CODEC.encode(e)) for e in [*good, no_schema]] + [(k.encode(), v) for k, v in bad.items()]
    _publish(wsettings, records)
    _run(wsettings)
    aspects = dict(_read(wsettings, wsettings.topics.aspects, EventCodec(AspectEvent), 5))
    assert sorted(k.decode() for k in aspects) == sorted(e.listing_id for e in [*good, no_schema])
    generic = aspects[b"no-schema"]
    assert generic.category == "spaceship" and generic.generic_schema and generic.category_schema == "generic@v1"
    assert generic.schema_check.valid and {a.name for a in generic.aspects} <= set(default_categories().resolve("spaceship").names)
    assert all(not a.generic_schema and a.category_schema == f"{a.category}@v1" for k, a in aspects.items() if k != b"no-schema")
    dead = {k.decode(): dl for k, dl in _read(wsettings, wsettings.topics.dead_letters, EventCodec(DeadLetter), len(bad))}
    assert set(dead) == set(bad)
    assert dead["bad-avro"].error_kind == "unknown_schema" and dead["bad-avro"].value == bad["bad-avro"]
    assert dead["corrupt-image"].error_kind == "invalid_image" and "truncated" in dead["corrupt-image"].error_message
    assert dead["outside-root"].error_kind == "invalid_image" and "outside the allowed root" in dead["outside-root"].error_message
    assert (
        dead["http-not-allowed"].error_kind == "invalid_image"
        and "not in OPAL_WORKER_ALLOWED_HTTP_HOSTS" in dead["http-not-allowed"].error_message
    )
    assert dead["oversized"].error_kind == "invalid_image" and "limit 500000" in dead["oversized"].error_message
    for k, dl in dead.items():
        assert dl.value == dict(bad)[k] and dl.origin_topic == wsettings.topics.images_realtime


def _worker_env(s: OpalSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPAL_")}
    t = s.topics
    env.update(
        {
            "OPAL_KAFKA_BOOTSTRAP": s.kafka.bootstrap or "",
            "OPAL_REDIS_URL": s.redis.url_value(),
            "OPAL_REDIS_KEY_PREFIX": s.redis.key_prefix,
            "OPAL_VLLM_ENDPOINTS": f'["{s.vllm.endpoints[0]}"]',
            "OPAL_WORKER_GROUP_ID": s.worker.group_id,
            "OPAL_WORKER_ALLOWED_FILE_ROOT": str(s.worker.allowed_file_root),
            "OPAL_WORKER_MAX_IN_FLIGHT": "4",
            **{f"OPAL_TOPICS_{k.upper()}": str(v) for k, v in t.model_dump().items()},
        }
    )
    return env


def _restart_and_read_all(s: OpalSettings, env: dict[str, str]) -> list[tuple[Any, Any]]:
    """Run a fresh worker until idle, then read every record of the aspects topic (the worker has exited: nothing
    is written any more, so the topic's end offsets are final)."""
    second = subprocess.run(
        [opal_bin(), "worker", "enrich", "--idle-exit", "3", "--log-level", "WARNING"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    return read_to_end(s, s.topics.aspects, EventCodec(AspectEvent))


def test_kill_9_mid_stream_loses_nothing(wsettings: OpalSettings, images: Path) -> None:
    evs = _events(images, 40, prefix="k")
    _publish(wsettings, [(e.listing_id.encode(), CODEC.encode(e)) for e in evs])
    env = _worker_env(wsettings)
    first = subprocess.Popen(
        [opal_bin(), "worker", "enrich", "--log-level", "WARNING"], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        got = _read(wsettings, wsettings.topics.aspects, EventCodec(AspectEvent), 5, timeout_s=120)
        assert len(got) >= 5, "worker produced nothing before the kill"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    out = _restart_and_read_all(wsettings, env)
    latest = {k: ev for k, ev in out}  # what a compacted topic / a keep-latest reader holds
    assert sorted(k.decode() for k in latest) == sorted(e.listing_id for e in evs)  # nothing lost, one current record each


def test_realtime_lane_is_served_ahead_of_backfill(wsettings: OpalSettings, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = wsettings.model_copy(
        update={
            "topics": TopicSettings.suffixed("1p", 1),
            "worker": wsettings.worker.model_copy(update={"max_in_flight": 4, "backfill_share": 0.25, "batch_max_size": 4}),
        }
    )

    apply_topology(make_admin(s.kafka), build_topology(s))
    backfill = _events(images, 40, Lane.BACKFILL, prefix="bf")
    realtime = _events(images, 8, Lane.REALTIME, prefix="rt")
    _publish(s, [(e.listing_id.encode(), CODEC.encode(e)) for e in backfill], s.topics.images_backfill)
    _publish(s, [(e.listing_id.encode(), CODEC.encode(e)) for e in realtime], s.topics.images_realtime)
    # The worker's own record of what it did, in order: each record taken (with whether the realtime lane had joined
    # its group by then) and each record finished (output acknowledged).
    trace: list[tuple[str, Lane, bool]] = []
    hold, release = LaneConsumers.hold, LaneConsumers.release

    def traced_hold(self: LaneConsumers, msg: Any, lane: Lane, now: float) -> Any:
        record = hold(self, msg, lane, now)
        trace.append(("start", lane, Lane.REALTIME in self.joined))
        return record

    def traced_release(self: LaneConsumers, record: Any) -> None:
        release(self, record)
        trace.append(("finish", record.lane, True))

    monkeypatch.setattr(LaneConsumers, "hold", traced_hold)
    monkeypatch.setattr(LaneConsumers, "release", traced_release)
    _run(s)
    order = [ev.listing_id for _, ev in _read(s, s.topics.aspects, EventCodec(AspectEvent), 48)]  # one partition: produce order
    assert len(order) == 48
    # What the flow control guarantees, whatever the model's latency: no backfill record before the realtime lane
    # joined (its backlog is unknown until then), and while a realtime record is unfinished backfill holds at most
    # its share of the window, max(1, int(4 * 0.25)) = 1 record.
    cap = max(1, int(4 * 0.25))
    held = {Lane.REALTIME: 0, Lane.BACKFILL: 0}
    realtime_done = 0
    for i, (what, lane, realtime_joined) in enumerate(trace):
        if what == "finish":
            held[lane] -= 1
            realtime_done += lane is Lane.REALTIME
            continue
        held[lane] += 1
        if lane is Lane.BACKFILL:
            assert realtime_joined, f"backfill record taken before the realtime lane joined (event {i}): {trace[: i + 1]}"
            if realtime_done < len(realtime):
                assert held[Lane.BACKFILL] <= cap, f"backfill held {held[Lane.BACKFILL]} > {cap} with realtime unfinished: {trace}"
    assert realtime_done >= len(realtime), trace
    # The effect: realtime, published last, is done while backfill still waits to be taken. (Backfill goes one record
    # at a time until then, so this fails only if realtime is not taken while it has backlog; without lane priority
    # the realtime records came out last, at positions 40-47.)
    last_realtime_finish = max(i for i, (what, lane, _) in enumerate(trace) if what == "finish" and lane is Lane.REALTIME)
    last_backfill_start = max(i for i, (what, lane, _) in enumerate(trace) if what == "start" and lane is Lane.BACKFILL)
    assert last_realtime_finish < last_backfill_start, [(w, lane.value) for w, lane, _ in trace]


def test_sigterm_finishes_in_flight_work_and_commits_it(wsettings: OpalSettings, images: Path) -> None:
    evs = _events(images, 40, prefix="t")
    _publish(wsettings, [(e.listing_id.encode(), CODEC.encode(e)) for e in evs])
    env = _worker_env(wsettings)
    worker = subprocess.Popen(
        [opal_bin(), "worker", "enrich", "--log-level", "WARNING"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert len(_read(wsettings, wsettings.topics.aspects, EventCodec(AspectEvent), 5, timeout_s=120)) >= 5
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=90)
    assert worker.returncode == 0, err[-2000:]
    before = len(read_to_end(wsettings, wsettings.topics.aspects, EventCodec(AspectEvent)))  # the worker has exited
    out = _restart_and_read_all(wsettings, env)
    assert sorted({k.decode() for k, _ in out}) == sorted(e.listing_id for e in evs)
    assert len(out) == 40, f"{len(out) - 40} duplicates: the graceful stop did not commit all it produced ({before} before restart)"
