"""Worker memory under backlog: RSS with a 100k-event backlog vs. a 1k-event backlog.

    .venv/bin/python bench/bench_backlog.py [--big 100000] [--small 1000] [--seconds 45]

Starts tansu, valkey and vLLM (tiny model from .opal/models/tiny-seed0, built by
`make demo`), publishes a backlog of ListingImageEvents (the 40 sample photos in
rotation, so after the first 40 most results come from the valkey cache), runs
`opal worker enrich` as a subprocess for ``--seconds`` while sampling its RSS every
second, and does that once per backlog size. Prints peak and final RSS, records
processed, and the ratio big/small of peak RSS (bounded memory: close to 1.0).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_worker import spawn_enrich_worker  # noqa: E402
from opal.embedded import EmbeddedStack, free_port  # noqa: E402
from opal.samples import load_samples, sample_event  # noqa: E402
from opal.vllm_server import start_vllm  # noqa: E402
from schemas.events import ListingImageEvent  # noqa: E402
from schemas.serde import EventCodec  # noqa: E402
from schemas.settings import OpalSettings, TopicSettings  # noqa: E402
from topology.admin import apply_topology  # noqa: E402
from topology.declared import build_topology  # noqa: E402
from workers.kafka_clients import make_admin, make_producer  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_case(s: OpalSettings, n: int, seconds: float, url: str) -> dict[str, float]:

    tag = uuid.uuid4().hex[:6]
    topics = TopicSettings.suffixed(tag, 3)
    s = s.model_copy(update={"topics": topics, "redis": s.redis.model_copy(update={"key_prefix": f"bench-{tag}:"})})  # a cold cache each
    apply_topology(make_admin(s.kafka), build_topology(s))
    codec = EventCodec(ListingImageEvent)
    samples = load_samples()
    base = [sample_event(x) for x in samples]
    p = make_producer(s.kafka, **{"queue.buffering.max.messages": 200_000})
    t0 = time.perf_counter()
    for i in range(n):
        ev = base[i % len(base)].model_copy(update={"listing_id": f"b{i}", "event_id": str(uuid.uuid4())})
        p.produce(topics.images_realtime, key=ev.listing_id.encode(), value=codec.encode(ev))
        if i % 10_000 == 0:
            p.poll(0)
    p.flush(120)
    print(f"  published {n} events in {time.perf_counter() - t0:.1f} s", flush=True)
    s = s.model_copy(update={"worker": s.worker.model_copy(update={"allowed_file_root": REPO / "data" / "sample"})})
    port = free_port()
    w = spawn_enrich_worker(s, url, f"bench-{tag}", port)
    samples_mb: list[float] = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(1)
            samples_mb.append(rss_mb(w.pid))
        import urllib.request

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        done = sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith(("opal_enrich_aspect_events_total", "opal_enrich_dead_letters_total{"))
        )
    finally:
        w.terminate()
        w.wait(60)
    return {"peak": max(samples_mb), "final": samples_mb[-1], "first": samples_mb[0], "done": done, "series": samples_mb}  # type: ignore[dict-item]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--model", type=Path, default=REPO / ".opal" / "models" / "tiny-seed0")
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit("no tiny model: run `make demo` once (or `opal model init-tiny --out .opal/models/tiny-seed0`)")
    base = OpalSettings()
    run_dir = (REPO / ".opal" / "run" / "bench-backlog").resolve()
    s0 = base.model_copy(update={"embedded": base.embedded.model_copy(update={"run_dir": run_dir})})
    with EmbeddedStack(s0) as stack:
        vllm, url = start_vllm(args.model, stack.settings.vllm, run_dir, timeout_s=400)
        try:
            results = {}
            for n in (args.small, args.big):
                print(f"backlog {n}:", flush=True)
                results[n] = run_case(stack.settings, n, args.seconds, url)
                r = results[n]
                print(
                    f"  worker RSS first {r['first']:.0f} MB, peak {r['peak']:.0f} MB, final {r['final']:.0f} MB; "
                    f"{r['done']:.0f} records processed in {args.seconds:.0f} s",
                    flush=True,
                )
        finally:
            vllm.stop()
    small, big = results[args.small], results[args.big]
    print(f"\n{'backlog':>10}{'peak RSS MB':>13}{'final RSS MB':>14}{'processed':>11}")
    for n in (args.small, args.big):
        r = results[n]
        print(f"{n:>10}{r['peak']:>13.0f}{r['final']:>14.0f}{r['done']:>11.0f}")
    print(f"peak RSS ratio {args.big}/{args.small} backlog: {big['peak'] / small['peak']:.2f} (bounded memory: ~1.0)")


if __name__ == "__main__":
    main()
