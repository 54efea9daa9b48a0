"""`make demo`: the whole enrichment path on embedded defaults, printed for a newcomer.

Starts tansu, valkey and a real vLLM server on the tiny local model, applies the
topology, publishes the bundled ABO sample listings plus three deliberately bad
records, runs the enrichment worker until it has nothing left to do, reads the
aspect and dead-letter topics back and prints them. Everything it starts is stopped
on exit, Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from opal.embedded import EmbeddedStack
from opal.samples import SAMPLE_DIR, load_samples, sample_event
from opal.vllm_server import start_vllm
from schemas.events import AspectEvent, DeadLetter, ImageRef, ListingImageEvent
from schemas.serde import CodecSet, EventCodec
from schemas.settings import OpalSettings
from training.abo import title_split

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "opal-tiny-abo"  # trained on the ABO train split; card: models/opal-tiny-abo/README.md


@dataclass(frozen=True)
class DemoResult:
    listings_in: int
    aspect_events: list[AspectEvent]
    dead_letters: list[DeadLetter]
    indexed: int = 0
    search_example: tuple[str, str, int] | None = None  # aspect name, value, listings the index returns for it
    held_out: frozenset[str] = frozenset()  # sample listing ids outside the model's training split
    seen: int = 0  # sample listings inside it
    loop: Any = None  # opal.demo_loop.LoopResult with --loop


def demo_model(model_dir: Path = DEMO_MODEL) -> Path:
    """The shipped trained tiny model (a folder in the repository); ``FileNotFoundError`` naming the fix if absent."""
    if (model_dir / "config.json").is_file() and (model_dir / "opal_model.json").is_file():
        return model_dir
    raise FileNotFoundError(f"{model_dir} is missing: restore it with `git checkout -- {model_dir.relative_to(REPO)}` (see its README)")


def demo_records(codec: EventCodec[ListingImageEvent], samples: Path) -> list[tuple[bytes, bytes]]:
    """(key, value) of every sample listing, one listing in a category without a schema (the generic
    fallback enriches it) and three bad records (dead-lettered)."""
    items = load_samples(samples)
    records = [(ev.listing_id.encode(), codec.encode(ev)) for ev in (sample_event(s) for s in items)]
    first = sample_event(items[0])
    corrupt = first.model_copy(
        update={"listing_id": "bad-corrupt-image", "images": [ImageRef(uri=(samples / "bad" / "truncated.jpg").resolve().as_uri())]}
    )
    outside = first.model_copy(update={"listing_id": "bad-image-outside-root", "images": [ImageRef(uri="file:///etc/passwd")]})
    no_schema = first.model_copy(update={"listing_id": "no-schema-footwear", "category": "footwear_misc"})
    records += [
        (b"no-schema-footwear", codec.encode(no_schema)),
        (b"bad-corrupt-image", codec.encode(corrupt)),
        (b"bad-image-outside-root", codec.encode(outside)),
        (b"bad-not-avro", b"this is not an avro record"),
    ]
    return records


BAD_RECORDS = 3  # the last three of demo_records


def read_topic(settings: OpalSettings, topic: str, decode: Any, expected: int, timeout_s: float = 30.0) -> list[Any]:
    """Read ``expected`` records of ``topic`` from the beginning with a throw-away group."""
    import uuid

    from workers.kafka_clients import make_consumer

    c = make_consumer(settings.kafka, f"opal-demo-reader-{uuid.uuid4().hex[:8]}")
    c.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                out.append(decode(m.value()))
    finally:
        c.close()
    return out


def run_demo(console: Console, samples: Path = SAMPLE_DIR, loop: bool = False) -> DemoResult:
    from topology.admin import apply_topology
    from topology.declared import build_topology
    from workers.enrich import run_worker
    from workers.kafka_clients import make_admin, make_producer

    t0 = time.monotonic()
    base = OpalSettings()
    run_dir = (base.embedded.run_dir / "demo").resolve()
    s0 = base.model_copy(update={"embedded": base.embedded.model_copy(update={"run_dir": run_dir})})
    model_dir = demo_model()
    with console.status("starting the embedded broker and valkey ..."):
        stack = EmbeddedStack(s0).start()
    with stack:
        s = stack.settings
        console.print(f"[bold]1.[/] kafka (tansu) {s.kafka.bootstrap}, redis (valkey) {s.redis.url_display()}")
        with console.status("starting vLLM on the trained tiny model (about 40 s on 2 cores) ..."):
            vllm, url = start_vllm(model_dir, s.vllm, run_dir, timeout_s=400)
        try:
            console.print(f"[bold]2.[/] vLLM {url} serving {model_dir.name} ({time.monotonic() - t0:.0f} s)")
            s = s.model_copy(
                update={
                    "vllm": s.vllm.model_copy(update={"endpoints": [url]}),
                    "worker": s.worker.model_copy(update={"allowed_file_root": samples.resolve()}),
                }
            )
            results = apply_topology(make_admin(s.kafka), build_topology(s))
            console.print(
                f"[bold]3.[/] topology: {sum(r.status == 'created' for r in results)} topics created, "
                f"{sum(r.status == 'ok' for r in results)} verified"
            )
            codecs = CodecSet.of(s.kafka)
            codec = codecs[ListingImageEvent]
            records = demo_records(codec, samples)
            producer = make_producer(s.kafka)
            for key, value in records:
                producer.produce(s.topics.images_realtime, key=key, value=value)
            if producer.flush(30):
                raise RuntimeError("could not publish the demo records")
            n = len(records)
            console.print(
                f"[bold]4.[/] published {n} listing-image events ({n - BAD_RECORDS - 1} real ABO photos, 1 in a category "
                f"without a schema, {BAD_RECORDS} deliberately bad)"
            )
            t_w = time.monotonic()
            with console.status("enrichment worker running ..."):
                asyncio.run(run_worker(s, asyncio.Event(), idle_exit_s=3.0))
            console.print(f"[bold]5.[/] worker done in {time.monotonic() - t_w:.0f} s")
            events = read_topic(s, s.topics.aspects, codecs[AspectEvent].decode, n - BAD_RECORDS)
            dead = read_topic(s, s.topics.dead_letters, codecs[DeadLetter].decode, BAD_RECORDS, timeout_s=10)
        finally:
            vllm.stop()
        indexed, example = index_and_search(s, events)
        console.print(f"[bold]6.[/] search indexer: {indexed} listings searchable in valkey")
        looped = None
        if loop:
            from opal.demo_loop import run_loop

            looped = run_loop(console, s, samples, model_dir, run_dir, events)
    splits = {sample_event(x).listing_id: title_split(x.title) for x in load_samples(samples)}
    held_out = frozenset(k for k, v in splits.items() if v != "train")
    return DemoResult(n, events, dead, indexed, example, held_out, len(splits) - len(held_out), looped)


def index_and_search(s: OpalSettings, events: list[AspectEvent]) -> tuple[int, tuple[str, str, int] | None]:
    """Run the search indexer over the aspect topic, then query the commonest aspect value."""
    import threading
    from collections import Counter

    from workers.index_worker import build_indexer
    from workers.search_index import SearchIndex

    stats = build_indexer(s).run(threading.Event(), idle_exit_s=2.0)
    common = Counter((a.name, a.value) for e in events for a in e.aspects).most_common(1)
    if not common:
        return stats.indexed, None
    (name, value), _ = common[0]
    index = SearchIndex.from_url(s.redis.url_value(), s.redis.key_prefix)
    try:
        return stats.indexed, (name, value, index.search({name: value})[0])
    finally:
        index.close()


def print_result(console: Console, r: DemoResult) -> None:
    t = Table(
        "listing",
        "held out",
        "category",
        "title",
        "aspects (confidence)",
        title="aspect events (a 0.8M-parameter model trained on 6,323 ABO photos: weak, but it reads the photo)",
        caption=f"held out: the photo's product is outside the model's training split ({len(r.held_out)} of {len(r.held_out) + r.seen})",
        show_lines=False,
    )
    for ev in sorted(r.aspect_events, key=lambda e: (e.listing_id not in r.held_out, e.listing_id)):
        aspects = ", ".join(f"{a.name}: {a.value} ({a.confidence:.2f})" for a in ev.aspects)
        category = f"{ev.category} (generic schema)" if ev.generic_schema else ev.category
        t.add_row(ev.listing_id, "yes" if ev.listing_id in r.held_out else "", category, ev.title[:40], aspects[:70])
    console.print(t)
    d = Table("key", "reason", "message", title="dead letters")
    for dl in r.dead_letters:
        d.add_row((dl.key or b"").decode(errors="replace"), dl.error_kind, dl.error_message[:80])
    console.print(d)
    if r.aspect_events:
        valid = sum(e.schema_check.valid for e in r.aspect_events)
        ms = sorted(e.timings.inference_ms for e in r.aspect_events if not e.cache_hit)
        hits = sum(e.cache_hit for e in r.aspect_events)
        generic = sum(e.generic_schema for e in r.aspect_events)
        console.print(
            f"schema-valid: {valid}/{len(r.aspect_events)} · generic schema (category without one): {generic} · cache hits: {hits} · "
            f"model latency p50 {ms[len(ms) // 2] if ms else 0:.0f} ms · model {r.aspect_events[0].model.name} "
            f"{r.aspect_events[0].model.version}"
        )
    if r.search_example:
        name, value, hits = r.search_example
        console.print(f"search index: {r.indexed} listings indexed; {name}={value} finds {hits} of them", highlight=False)
    print(f"demo: {r.listings_in} listings in, {len(r.aspect_events)} aspect events out, {len(r.dead_letters)} dead letters")
    if r.loop is not None:
        print(r.loop.line(), flush=True)
