"""Realtime latency under a 100,000-event backfill backlog, against the same realtime stream on an idle worker.

    .venv/bin/python bench/bench_realtime.py [--backlog 100000] [--realtime 200] [--rate 10]

Starts tansu, valkey and vLLM (the shipped tiny model) and `opal worker enrich` (a subprocess), and warms the
result cache with the 40 sample photos. Then two phases on the same worker:

- idle: ``--realtime`` realtime events at ``--rate`` a second, each with a photo new to the cache, so each is a
  model request;
- backlog: ``--backlog`` backfill events (cache hits over the sample photos: the load that keeps the worker's
  core busiest, ~2,000 records/s of wall time here) are published first; then the same realtime stream runs
  while the worker works through them.

For each realtime record: end-to-end = when a reader in this process saw its AspectEvent minus when it was
handed to the producer; model time = the request's time as the worker measured it (the AspectEvent's
``timings.inference_ms``); added = end-to-end minus model time (the broker both ways, the worker's queueing and
work, batching). The backlog phase counts only if backfill records were still unprocessed when the last
realtime record came out (printed). Everything shares the 2 cores here: tansu, valkey, vLLM, the worker, the
publisher and the reader.

The last line is ``realtime: p99 added <idle> ms idle, <backlog> ms under a <N> backlog (+<d> ms; target < 100)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_worker import metric, miss_events, publish, running_worker, wait_outputs  # noqa: E402
from opal.plots import histogram_png  # noqa: E402
from opal.samples import load_samples, sample_event  # noqa: E402
from schemas.events import AspectEvent, ListingImageEvent  # noqa: E402
from schemas.serde import CodecSet  # noqa: E402
from schemas.settings import OpalSettings  # noqa: E402
from workers.kafka_clients import make_consumer, make_producer  # noqa: E402

TARGET_MS = 100.0


class Reader(threading.Thread):
    """Reads the aspects topic from the start; keeps (seen at, inference ms, worker ms) of each realtime listing id
    (worker ms: the AspectEvent's ``timings.total_ms``, from the worker consuming the record to building its output)."""

    def __init__(self, s: OpalSettings, prefix: bytes) -> None:
        super().__init__(daemon=True)
        self.s, self.prefix = s, prefix
        self.seen: dict[str, tuple[float, float, float]] = {}
        self.built: dict[str, float] = {}  # the AspectEvent's produced_at (when the worker built it), epoch s
        self.stop = threading.Event()

    def run(self) -> None:
        codec = CodecSet.of(self.s.kafka)[AspectEvent]
        c = make_consumer(self.s.kafka, f"bench-reader-{uuid.uuid4().hex[:6]}", **{"fetch.wait.max.ms": 5, "enable.auto.commit": False})
        c.subscribe([self.s.topics.aspects])
        try:
            while not self.stop.is_set():
                for m in c.consume(500, 0.05):
                    if m.error() is None and (m.key() or b"").startswith(self.prefix):
                        ev = codec.decode(m.value())
                        self.seen[ev.listing_id] = (time.time(), ev.timings.inference_ms or 0.0, ev.timings.total_ms or 0.0)
                        self.built[ev.listing_id] = ev.produced_at.timestamp()
        finally:
            c.close()


def stream(s: OpalSettings, events: list[ListingImageEvent], rate: float, warm: ListingImageEvent) -> dict[str, float]:
    """Publish ``events`` on the realtime lane at ``rate`` a second, evenly; returns when each was handed over.

    ``warm`` goes first, untimed: a new idempotent producer gets its producer id and connections on its first
    send (~0.6 s on tansu), which a marketplace's long-lived producer has long done."""
    codec = CodecSet.of(s.kafka)[ListingImageEvent]
    p = make_producer(s.kafka, **{"linger.ms": 0})
    p.produce(s.topics.images_realtime, key=warm.listing_id.encode(), value=codec.encode(warm))
    if p.flush(30):
        raise SystemExit("the warm-up record was not acknowledged")
    sent: dict[str, float] = {}
    t0 = time.monotonic()
    for i, ev in enumerate(events):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        value = codec.encode(ev)
        sent[ev.listing_id] = time.time()
        p.produce(s.topics.images_realtime, key=ev.listing_id.encode(), value=value)
        p.poll(0)
    p.flush(60)
    return sent


def wait_seen(reader: Reader, ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(i in reader.seen for i in ids):
            return
        time.sleep(0.05)
    raise SystemExit(f"{sum(i not in reader.seen for i in ids)} realtime records not seen in {timeout_s:.0f} s")


def added_ms(sent: dict[str, float], reader: Reader) -> dict[str, float]:
    """End-to-end minus model time, per listing id."""
    return {k: (reader.seen[k][0] - t) * 1000 - reader.seen[k][1] for k, t in sent.items()}


def summary(sent: dict[str, float], reader: Reader) -> dict[str, float]:
    e2e = sorted((reader.seen[k][0] - t) * 1000 for k, t in sent.items())
    added = sorted(added_ms(sent, reader).values())
    model = sorted(reader.seen[k][1] for k in sent)
    worker = sorted(reader.seen[k][2] - reader.seen[k][1] for k in sent)  # in the worker, less the model request

    def p99(xs: list[float]) -> float:
        return xs[min(len(xs) - 1, int(len(xs) * 0.99))]

    return {
        "e2e50": statistics.median(e2e),
        "e2e99": p99(e2e),
        "model50": statistics.median(model),
        "model99": p99(model),
        "added50": statistics.median(added),
        "added99": p99(added),
        "worker50": statistics.median(worker),
        "worker99": p99(worker),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backlog", type=int, default=100_000, help="Backfill events published before the realtime stream.")
    ap.add_argument("--realtime", type=int, default=200, help="Realtime events per phase.")
    ap.add_argument("--rate", type=float, default=10.0, help="Realtime events a second.")
    ap.add_argument("--model", type=Path, default=REPO / "models" / "opal-tiny-abo")
    args = ap.parse_args()
    with running_worker("bench-realtime", args.model) as run:
        s, port = run.settings, run.port
        samples = [sample_event(x) for x in load_samples()]
        fresh = miss_events(samples, 2 * args.realtime, run.run_dir / "realtime-photos")
        idle_events = [ev.model_copy(update={"listing_id": f"rt-idle-{i}"}) for i, ev in enumerate(fresh[: args.realtime])]
        busy_events = [ev.model_copy(update={"listing_id": f"rt-busy-{i}"}) for i, ev in enumerate(fresh[args.realtime :])]
        reader = Reader(s, b"rt-")
        reader.start()
        try:
            print("warming the cache: 40 photos through the model ...", flush=True)
            publish(s, [ev.model_copy(update={"listing_id": f"warm{i}"}) for i, ev in enumerate(samples)])
            wait_outputs(port, len(samples), 600)
            print(f"idle: {args.realtime} realtime events at {args.rate:g}/s ...", flush=True)
            idle_sent = stream(s, idle_events, args.rate, samples[0].model_copy(update={"listing_id": "warm-idle"}))
            wait_seen(reader, list(idle_sent), 300)
            print(f"backlog: publishing {args.backlog:,} backfill events ...", flush=True)
            backlog = [
                samples[i % len(samples)].model_copy(update={"listing_id": f"bf{i}", "event_id": str(uuid.uuid4())})
                for i in range(args.backlog)
            ]
            publish(s, backlog, topic=s.topics.images_backfill)
            done0 = metric(port, 'opal_enrich_consumed_total{lane="BACKFILL"}')
            print(f"  the worker had taken {done0:,.0f} of them; realtime stream starts", flush=True)
            busy_sent = stream(s, busy_events, args.rate, samples[1].model_copy(update={"listing_id": "warm-busy"}))
            wait_seen(reader, list(busy_sent), 600)
            taken = metric(port, 'opal_enrich_consumed_total{lane="BACKFILL"}')
        finally:
            reader.stop.set()
    idle, busy = summary(idle_sent, reader), summary(busy_sent, reader)
    in_progress = taken < args.backlog
    print(f"\nbackfill records taken by the last realtime output: {taken:,.0f} of {args.backlog:,} (backlog in progress: {in_progress})")
    print(f"\n{'realtime, ms':<18}{'e2e p50':>8}{'e2e p99':>8}{'model p50':>10}{'model p99':>10}{'added p50':>10}{'added p99':>10}", end="")
    print(f"{'in worker p50':>14}{'in worker p99':>14}")
    for name, r in (("idle", idle), (f"{args.backlog:,} backlog", busy)):
        print(
            f"{name:<18}{r['e2e50']:>8.0f}{r['e2e99']:>8.0f}{r['model50']:>10.0f}{r['model99']:>10.0f}{r['added50']:>10.0f}{r['added99']:>10.0f}"
            f"{r['worker50']:>14.0f}{r['worker99']:>14.0f}"
        )
    print("(added = end-to-end less the model request; in worker = consumed to output built, less the model request)")
    for name, sent in (("idle", idle_sent), ("backlog", busy_sent)):
        worst = sorted(added_ms(sent, reader).items(), key=lambda kv: -kv[1])[:3]
        print(
            f"slowest {name}: "
            + ", ".join(
                f"{k} {v:.0f} ms (published to built {(reader.built[k] - sent[k]) * 1000:.0f}, in worker "
                f"{reader.seen[k][2] - reader.seen[k][1]:.0f}, built to seen {(reader.seen[k][0] - reader.built[k]) * 1000:.0f})"
                for k, v in worst
            )
        )
    png = histogram_png(
        {"idle": list(added_ms(idle_sent, reader).values()), f"{args.backlog:,} backlog": list(added_ms(busy_sent, reader).values())},
        REPO / "docs" / "img" / "realtime_latency.png",
        f"realtime end-to-end less model time (ms), {args.realtime} records at {args.rate:g}/s, idle vs {args.backlog:,} backfill backlog",
    )
    print(f"histogram: {png.relative_to(REPO)}")
    d = busy["added99"] - idle["added99"]
    if not in_progress:
        print("the backlog was drained before the realtime stream ended: rerun with a larger --backlog")
    print(
        f"realtime: p99 added {idle['added99']:.0f} ms idle, {busy['added99']:.0f} ms under a {args.backlog:,} backlog "
        f"({d:+.0f} ms; target < {TARGET_MS:.0f})"
    )


if __name__ == "__main__":
    main()
