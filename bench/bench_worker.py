"""Cache-hit records/s per worker core: what one enrich worker core sustains when results come from Redis.

    .venv/bin/python bench/bench_worker.py [--events 20000] [--model models/opal-tiny-abo]

Starts tansu, valkey and vLLM (the shipped tiny model), runs `opal worker enrich` as a
subprocess, warms the result cache with the 40 sample photos (40 model requests), then
publishes ``--events`` ListingImageEvents over the same photos (distinct listing ids) and
measures the worker's CPU seconds (user + system of the whole process, threads included,
from /proc/<pid>/stat) from publishing them to their last output. CPU time, not wall
time: the broker and valkey share the 2 cores here.

Then it times each stage of a cache hit on the same data in this process (2,000 records), with the
worker's own functions: Avro decode + event checks, image read + header checks + hash (no pixel
decoded), the cache look-up (16 at once: one MGET), the AspectEvent build (the cache entry as an
answer, the event validated from it: ``workers.enrich.stages``) + Avro encode, and the produce call.
(Before the pipeline, this bench timed ``model_copy`` of a prepared event for the build, which left
the event's validation in "rest".)
The rest (the event loop, the consumer, delivery reports, offsets, metrics) is what the
worker's CPU per record leaves over.

Then (``--misses``, default 1,000) events whose photos are new to the cache go through the same worker: its
CPU per model request (decode and checks of the photo, resize, the request, the answer, the cache write, the
output) is what the worker costs beside the model server.

The last line is exactly ``worker: <N> cache-hit records/s per core``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from opal.embedded import EmbeddedStack, free_port, settings_env  # noqa: E402
from opal.samples import load_samples, sample_event  # noqa: E402
from opal.vllm_server import start_vllm  # noqa: E402
from schemas.events import AspectEvent, ListingImageEvent  # noqa: E402
from schemas.serde import CodecSet  # noqa: E402
from schemas.settings import OpalSettings, TopicSettings  # noqa: E402
from topology.admin import apply_topology  # noqa: E402
from topology.declared import build_topology  # noqa: E402
from workers.kafka_clients import make_admin, make_producer  # noqa: E402

TARGET = 5000  # records/s per core (issue 15)


@dataclass
class WorkerRun:
    """An embedded stack with vLLM and one `opal worker enrich` subprocess (see :func:`running_worker`)."""

    settings: OpalSettings  # topics and cache keys of this run's own
    url: str  # vLLM's base URL
    port: int  # the worker's /metrics port
    worker: subprocess.Popen[bytes]
    run_dir: Path

    def stop_worker(self) -> None:
        """SIGTERM the worker and wait for it (idempotent)."""
        if self.worker.poll() is None:
            self.worker.terminate()
            self.worker.wait(60)


def spawn_enrich_worker(s: OpalSettings, url: str, group: str, port: int) -> subprocess.Popen[bytes]:
    """`opal worker enrich` as a subprocess on settings ``s`` (nothing else from this process's OPAL_ variables),
    vLLM at ``url``, consumer-group prefix ``group``, /metrics on ``port``."""
    outside = {k: v for k, v in os.environ.items() if not k.startswith("OPAL_")}
    env = settings_env(s, outside) | {"OPAL_VLLM_ENDPOINTS": f'["{url}"]', "OPAL_WORKER_GROUP_ID": group}
    return subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "opal"), "worker", "enrich", "--log-level", "WARNING", "--metrics-port", str(port)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextlib.contextmanager
def running_worker(name: str, model: Path) -> Iterator[WorkerRun]:
    """Tansu, valkey and vLLM (``model``) under ``.opal/run/<name>``, topics and cache keys of their own (created),
    file images allowed under the repository, and `opal worker enrich` running on them; all stopped on exit."""
    base = OpalSettings()
    run_dir = (REPO / ".opal" / "run" / name).resolve()
    s0 = base.model_copy(update={"embedded": base.embedded.model_copy(update={"run_dir": run_dir})})
    print(f"starting tansu, valkey and vLLM ({model.name}) ...", flush=True)
    with EmbeddedStack(s0) as stack:
        vllm, url = start_vllm(model, stack.settings.vllm, run_dir, timeout_s=600)
        try:
            tag = uuid.uuid4().hex[:6]
            s = stack.settings.model_copy(
                update={
                    "topics": TopicSettings.suffixed(tag, 3),
                    "redis": stack.settings.redis.model_copy(update={"key_prefix": f"bench-{tag}:"}),
                    "worker": stack.settings.worker.model_copy(update={"allowed_file_root": REPO}),  # samples and new photos
                }
            )

            apply_topology(make_admin(s.kafka), build_topology(s))
            port = free_port()
            run = WorkerRun(s, url, port, spawn_enrich_worker(s, url, f"bench-{tag}", port), run_dir / tag)
            try:
                yield run
            finally:
                run.stop_worker()
        finally:
            vllm.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def metric(port: int, *prefixes: str) -> float:
    """The sum of the worker's samples whose line starts with one of ``prefixes`` (one scrape)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefixes))


def outputs(port: int) -> float:
    return metric(port, "opal_enrich_aspect_events_total ", "opal_enrich_dead_letters_total{")


def miss_events(samples: list[ListingImageEvent], n: int, folder: Path) -> list[ListingImageEvent]:
    """``n`` events whose photos are all new to the cache: each a sample photo with a trailer of its own after the
    JPEG's end (new bytes, new key, same pixels), written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ev = samples[i % len(samples)]
        path = folder / f"miss{i}.jpg"
        path.write_bytes(Path(ev.images[0].uri.removeprefix("file://")).read_bytes() + f"opal-bench-{uuid.uuid4()}".encode())
        image = ev.images[0].model_copy(update={"uri": path.as_uri()})
        out.append(ev.model_copy(update={"listing_id": f"m{i}", "event_id": str(uuid.uuid4()), "images": [image]}))
    return out


def wait_outputs(port: int, n: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if outputs(port) >= n:
                return
        except OSError:
            pass
        time.sleep(0.5)  # each look is a /metrics scrape the worker serves (Prometheus scrapes every 15 s or so)
    raise SystemExit(f"the worker did not reach {n:.0f} outputs in {timeout_s:.0f} s")


def publish(s: OpalSettings, events: list[ListingImageEvent], topic: str | None = None) -> None:
    """Publish ``events`` (default: on the realtime lane) and wait for every acknowledgement."""
    codec = CodecSet.of(s.kafka)[ListingImageEvent]
    p = make_producer(s.kafka, **{"queue.buffering.max.messages": 200_000})
    for i, ev in enumerate(events):
        p.produce(topic or s.topics.images_realtime, key=ev.listing_id.encode(), value=codec.encode(ev))
        if i % 5_000 == 0:
            p.poll(0)
    if p.flush(120):
        raise SystemExit("events not delivered")


def best_us(fn: Callable[[int], object], n: int = 2000, runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.process_time()
        for i in range(n):
            fn(i)
        best = min(best, time.process_time() - t0)
    return best / n * 1e6


def stages(s: OpalSettings, events: list[ListingImageEvent], model_version: str) -> list[tuple[str, float]]:
    """Per-stage CPU µs of one cache hit, measured here on the worker's own code paths."""
    from confluent_kafka import Producer

    from inference.images import PreparedImage
    from schemas.category import CategoryRegistry
    from schemas.events import Lane
    from schemas.schema_source import configured_categories
    from workers.enrich.record import Record
    from workers.enrich.stages import aspect_event, cached_answer
    from workers.image_loader import ImageLoader
    from workers.intake import decode_listing_event
    from workers.result_cache import CachedListing, ResultCache, images_digest

    codec = CodecSet.of(s.kafka)[ListingImageEvent]
    aspect_codec = CodecSet.of(s.kafka)[AspectEvent]
    raw = [codec.encode(ev) for ev in events[:40]]
    categories: CategoryRegistry = configured_categories(s.schemas.paths)

    class _Msg:
        def __init__(self, value: bytes) -> None:
            self._v = value

        def value(self) -> bytes:
            return self._v

    msgs = [_Msg(r) for r in raw]
    decoded = [decode_listing_event(m, codec, categories, True) for m in msgs]  # type: ignore[arg-type]
    out: list[tuple[str, float]] = []
    out.append(("Avro decode + event checks", best_us(lambda i: decode_listing_event(msgs[i % 40], codec, categories, True))))  # type: ignore[arg-type]

    async def io_stages() -> tuple[float, float, list[PreparedImage], CachedListing]:
        loader = ImageLoader.from_settings(s.worker)
        cache = ResultCache(s.redis.url_value(), s.redis.cache_ttl_s, s.redis.key_prefix)
        images = [await loader.load(ev.images[0].uri) for ev in decoded]
        t0 = time.process_time()
        for i in range(2000):
            loader.fetch_local(decoded[i % 40].images[0].uri)  # what a hit costs: bytes, header checks, hash
        load_us = (time.process_time() - t0) / 2000 * 1e6
        keys = [
            (categories.resolve(ev.category, True).key, images_digest([im.source_sha256])) for ev, im in zip(decoded, images, strict=True)
        ]
        t0 = time.process_time()
        for b in range(125):  # as the worker asks: a poll batch (16) of look-ups at once, one MGET
            got = await cache.get_many([(model_version, *keys[(b * 16 + j) % 40]) for j in range(16)])
            assert all(g is not None for g in got), "the bench reads the worker's cache entries"
        get_us = (time.process_time() - t0) / 2000 * 1e6
        await loader.aclose()
        await cache.aclose()
        assert got[0] is not None
        return load_us, get_us, images, got[0]

    load_us, get_us, images, entry = asyncio.run(io_stages())
    out.append(("image read + header checks + hash (file)", load_us))
    out.append(("cache look-up (MGET of a 16-record batch)", get_us))
    # the worker's own build: the cache entry as an answer, the AspectEvent validated from it, the Avro encode
    first = decoded[0]
    rec = Record(msg=None, lane=Lane.REALTIME, consumed_at=time.monotonic(), event=first)  # type: ignore[arg-type]
    rec.schema, rec.digest = categories.resolve(first.category, True), images_digest([images[0].source_sha256])

    def build(i: int) -> bytes:
        rec.answer = cached_answer(entry)
        return aspect_codec.encode(aspect_event(rec, time.monotonic()))

    out.append(("AspectEvent build + Avro encode", best_us(build)))
    hit = aspect_event(rec, time.monotonic())
    p = Producer({"bootstrap.servers": s.kafka.bootstrap or "", "linger.ms": 20})
    value = aspect_codec.encode(hit)

    def produce(i: int) -> None:
        p.produce(s.topics.aspects, key=b"k", value=value)
        p.poll(0)

    out.append(("produce call", best_us(produce)))
    p.flush(30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000, help="Cache-hit events measured (at least 20,000 for the record).")
    ap.add_argument("--misses", type=int, default=1000, help="Cache-miss events measured after the hits (0: none).")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "opal-tiny-abo")
    args = ap.parse_args()
    with running_worker("bench-worker", args.model) as run:
        s, port = run.settings, run.port
        samples = [sample_event(x) for x in load_samples()]
        print("warming the cache: 40 photos through the model ...", flush=True)
        publish(s, [ev.model_copy(update={"listing_id": f"warm{i}"}) for i, ev in enumerate(samples)])
        wait_outputs(port, len(samples), 600)
        n = args.events
        events = [samples[i % len(samples)].model_copy(update={"listing_id": f"b{i}", "event_id": str(uuid.uuid4())}) for i in range(n)]
        print(f"publishing {n:,} cache-hit events ...", flush=True)
        cpu0, t0 = cpu_seconds(run.worker.pid), time.monotonic()
        publish(s, events)
        wait_outputs(port, len(samples) + n, 900)
        cpu, wall = cpu_seconds(run.worker.pid) - cpu0, time.monotonic() - t0
        if args.misses:
            misses = miss_events(samples, args.misses, run.run_dir / "miss-photos")
            print(f"publishing {len(misses):,} cache-miss events (photos new to the cache) ...", flush=True)
            requests0 = metric(port, "opal_enrich_model_requests_total ")
            mcpu0, mt0 = cpu_seconds(run.worker.pid), time.monotonic()
            publish(s, misses)
            wait_outputs(port, len(samples) + n + len(misses), 1800)
            mcpu, mwall = cpu_seconds(run.worker.pid) - mcpu0, time.monotonic() - mt0
            requests = metric(port, "opal_enrich_model_requests_total ") - requests0
        run.stop_worker()
        per_us = cpu / n * 1e6
        print(f"\n{n:,} cache-hit records: worker CPU {cpu:.2f} s ({per_us:,.0f} µs a record), wall {wall:.1f} s ({n / wall:,.0f}/s)")
        if args.misses:
            print(
                f"{args.misses:,} cache-miss records: {requests:,.0f} model requests, worker CPU {mcpu:.2f} s "
                f"({mcpu / max(requests, 1) * 1000:.2f} ms per model request: {max(requests, 1) / mcpu:,.0f} requests/s per core), "
                f"wall {mwall:.1f} s ({args.misses / mwall:,.0f}/s, the served model's pace)"
            )
        timed = stages(s, events, _served_version(run.url))
    per_record_us = cpu / n * 1e6
    rate = n / cpu
    print(f"\n{'stage (this process, 2,000 records)':<44}{'µs':>8}{'share':>8}")
    for name, us in timed:
        print(f"{name:<44}{us:>8.0f}{us / per_record_us:>8.0%}")
    rest = per_record_us - sum(us for _, us in timed)
    print(f"{'rest: event loop, consumer, offsets, metrics':<44}{rest:>8.0f}{rest / per_record_us:>8.0%}")
    print(f"\ntarget {TARGET:,}/s per core: ratio {rate / TARGET:.2f}")
    print(f"worker: {rate:.0f} cache-hit records/s per core")


def _served_version(url: str) -> str:
    import json

    with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=10) as r:
        name = json.loads(r.read())["data"][0]["id"]
    return str(name)  # "<name>@<version>": the worker's cache keys carry it


if __name__ == "__main__":
    main()
