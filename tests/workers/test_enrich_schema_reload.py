"""A running worker picks up a changed schema set: the next listing's constrained output follows the new schema.

Real broker, real valkey, real vLLM; the worker runs in this process's main thread so its SIGHUP handler is
the real one (OPAL_SCHEMAS_RELOAD_S=0: files are re-read only on SIGHUP).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from schemas.events import AspectEvent, ListingImageEvent
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from tests.support import publish, read_topic, wait_for, worker_events
from workers.enrich import run_worker
from workers.metrics import WorkerMetrics

pytestmark = pytest.mark.vllm
CODEC = EventCodec(ListingImageEvent)


def _mug_schema(colour: str, version: int) -> dict[str, object]:
    return {
        "category": "mug",
        "display_name": "Mug",
        "version": version,
        "aspects": [{"name": "Color", "visual": True, "required": True, "values": [colour]}],
    }


def test_sighup_makes_a_running_worker_use_the_new_schema(wsettings: OpalSettings, images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "schemas"
    folder.mkdir()
    (folder / "mug.json").write_text(json.dumps(_mug_schema("red", 1)))
    s = wsettings.model_copy(update={"schemas": wsettings.schemas.model_copy(update={"paths": [folder], "reload_s": 0.0})})
    first, second = (
        e.model_copy(update={"category": "mug", "listing_id": f"mug-{i}", "event_id": f"mug-event-{i}"})
        for i, e in enumerate(worker_events(images, 1) * 2)
    )
    aspects = EventCodec(AspectEvent)
    metrics = WorkerMetrics()

    async def until(n: int) -> list[AspectEvent]:
        out = await asyncio.to_thread(read_topic, s, s.topics.aspects, aspects, n, 120)
        assert len(out) >= n, out
        return [ev for _, ev in out]

    def reloaded() -> bool:
        return metrics.value("opal_enrich_schema_reloads_total", result="ok") >= 1

    async def scenario() -> list[AspectEvent]:
        stop = asyncio.Event()
        task = asyncio.create_task(run_worker(s, stop, metrics=metrics))
        publish(s, s.topics.images_realtime, [(first.listing_id.encode(), CODEC.encode(first))])
        await until(1)
        (folder / "mug.json").write_text(json.dumps(_mug_schema("blue", 2)))
        os.kill(os.getpid(), signal.SIGHUP)  # the worker's handler asks for a re-read before its next batch
        # the handler runs on the loop and the worker reloads between records: wait until the new set took effect
        await asyncio.to_thread(wait_for, reloaded, 30, "the worker to reload its schemas after SIGHUP")
        publish(s, s.topics.images_realtime, [(second.listing_id.encode(), CODEC.encode(second))])  # same photo
        out = await until(2)
        stop.set()
        await task
        return out

    out = {ev.listing_id: ev for ev in asyncio.run(scenario())}
    a, b = out["mug-0"], out["mug-1"]
    assert (a.category_schema, {x.name: x.value for x in a.aspects}.get("Color")) == ("mug@v1", "red")
    assert (b.category_schema, {x.name: x.value for x in b.aspects}.get("Color")) == ("mug@v2", "blue")
    assert not b.cache_hit  # the same photo, but the schema is part of the cache key
    assert metrics.value("opal_enrich_schema_reloads_total", result="ok") == 1
