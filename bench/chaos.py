"""Reliability suite: the enrichment worker on the real embedded stack, tried as hostile production would.

    .venv/bin/python bench/chaos.py                       # every scenario, ~15 min on 2 cores
    .venv/bin/python bench/chaos.py --scenarios flood,kill9 --good 100

Starts a detached embedded stack with durable broker storage (tansu on a local moto S3,
valkey), a vLLM server on the tiny model (``--model``; built with ``opal model init-tiny``
when missing) and runs `opal worker enrich` as real subprocesses. Scenarios, each on its
own topics and consumer group:

- flood: >= 1,000 hostile records of 30 kinds (bench/hostile.py, incl. ~1 MB records)
  mixed with good ones; every hostile record must get its expected dead-letter reason.
- kill9: 10 cycles of kill -9 of the worker under load, then a last worker drains.
- two-workers: two workers in one group, one killed with kill -9 mid-stream.
- valkey-down: the cache's valkey killed while records arrive, restarted 20 s later.
- vllm-down: the model server stopped for 60 s while records arrive (a fresh cache, so
  every record needs the model), then started again on the same port.
- broker-s3: the broker killed with kill -9 under load and restarted on its S3 storage.

For each: records in, outputs out, lost (no output at all: must be 0), duplicates (extra
outputs for one record: allowed by at-least-once, reported), dead letters by reason, and
dependency dead letters (a good record dead-lettered: must be 0). Prints a table, writes
``--out`` (JSON + Markdown) and exits 1 on any loss, any dependency dead letter or any
hostile record with the wrong reason.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.hostile import OVERSIZE_KINDS, good_events, hostile_records, prepare_root  # noqa: E402
from schemas.events import AspectEvent, DeadLetter, Lane, ListingImageEvent  # noqa: E402
from schemas.serde import EventCodec  # noqa: E402
from schemas.settings import OpalSettings, TopicSettings  # noqa: E402

CODEC = EventCodec(ListingImageEvent)
OPAL = str(Path(sys.executable).parent / "opal")
IMAGE_MAX_BYTES = 2_000_000


@dataclass
class Result:
    scenario: str
    records_in: int = 0
    outputs: int = 0
    lost: int = 0
    duplicates: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    dependency_dead_letters: int = 0
    wrong_reason: int = 0
    wrong: list[str] = field(default_factory=list)  # "key: expected -> got" for the first few
    seconds: float = 0.0
    notes: str = ""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.dependency_dead_letters == 0 and self.wrong_reason == 0


@dataclass
class Harness:
    """Where the stack, the model and the images are; one per run."""

    settings: OpalSettings  # bootstrap and Redis URL resolved
    vllm_url: str
    root: Path
    run_dir: Path
    restart_model: Callable[[], None] | None = None
    stop_model: Callable[[], None] | None = None
    kill_service: Callable[[str], None] | None = None
    restart_service: Callable[[str], None] | None = None
    log: Callable[[str], None] = print

    def scenario(self, name: str, partitions: int = 3, **worker: str) -> Scenario:
        tag = f"{name}-{uuid.uuid4().hex[:6]}"
        topics = TopicSettings.suffixed(tag, partitions)
        s = self.settings.model_copy(update={"topics": topics})

        from topology.admin import apply_topology
        from topology.declared import build_topology
        from workers.kafka_clients import make_admin

        apply_topology(make_admin(s.kafka), build_topology(s))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPAL_")} | {
            "OPAL_KAFKA_BOOTSTRAP": s.kafka.bootstrap or "",
            "OPAL_REDIS_URL": s.redis.url_value(),
            "OPAL_REDIS_KEY_PREFIX": f"chaos-{tag}:",
            "OPAL_VLLM_ENDPOINTS": json.dumps([self.vllm_url]),
            "OPAL_WORKER_GROUP_ID": f"chaos-{tag}",
            "OPAL_WORKER_ALLOWED_FILE_ROOT": str(self.root),
            "OPAL_WORKER_IMAGE_MAX_BYTES": str(IMAGE_MAX_BYTES),
            "OPAL_WORKER_BREAKER_PROBE_MAX_S": "5",
            "OPAL_EMBEDDED_RUN_DIR": str(self.run_dir / "workers" / tag),
            **{f"OPAL_TOPICS_{k.upper()}": str(v) for k, v in topics.model_dump().items()},
            **{f"OPAL_WORKER_{k.upper()}": v for k, v in worker.items()},
        }
        return Scenario(name, s, env, self)


@dataclass
class Scenario:
    name: str
    s: OpalSettings
    env: dict[str, str]
    h: Harness
    sent: dict[bytes | None, str] = field(default_factory=dict)  # key -> expected ("aspect" or a reason)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def publish(self, records: list[tuple[bytes | None, bytes | None, str]], lane: Lane = Lane.REALTIME) -> None:
        from workers.kafka_clients import make_producer

        topic = self.s.topics.images_realtime if lane is Lane.REALTIME else self.s.topics.images_backfill
        p = make_producer(self.s.kafka, **{"message.max.bytes": 4_000_000})
        for key, value, expected in records:
            self.sent[key] = expected
            while True:
                try:
                    p.produce(topic, key=key, value=value)
                    break
                except BufferError:
                    p.poll(0.1)
        left = p.flush(120)
        if left:
            raise RuntimeError(f"{left} records not acknowledged by the broker")

    def publish_good(self, n: int, prefix: str | None = None) -> None:
        evs = good_events(self.h.root, n, prefix or f"{self.name}-g{len(self.sent)}")
        self.publish([(e.listing_id.encode(), CODEC.encode(e), "aspect") for e in evs])

    def start_worker(self, idle_exit: float | None = None) -> subprocess.Popen[bytes]:
        argv = [OPAL, "worker", "enrich", "--log-level", "WARNING"]
        if idle_exit is not None:
            argv += ["--idle-exit", str(idle_exit)]
        log = (self.h.run_dir / f"worker-{self.name}-{len(self.workers)}.log").open("wb")
        w = subprocess.Popen(argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(w)
        return w

    def drain(self, timeout_s: float = 600) -> None:
        """Stop the running workers gracefully (they hand back what they hold), then run one last
        worker until it has been idle for 5 s: after that everything published has been processed."""
        self.stop_workers()
        w = self.start_worker(idle_exit=5)
        try:
            rc = w.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            w.kill()
            raise RuntimeError(f"{self.name}: the draining worker did not finish in {timeout_s} s") from None
        if rc != 0:
            raise RuntimeError(f"{self.name}: the draining worker exited {rc}; see {self.h.run_dir}")

    def outputs_seen(self) -> int:
        return len(_read_all(self.s, self.s.topics.aspects, settle_s=0.5)) + len(
            _read_all(self.s, self.s.topics.dead_letters, settle_s=0.5)
        )

    def wait_outputs(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.outputs_seen() < n:
            time.sleep(1)

    def stop_workers(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()

    def result(self, notes: str = "") -> Result:
        self.stop_workers()
        aspects = _read_all(self.s, self.s.topics.aspects)
        dead = _read_all(self.s, self.s.topics.dead_letters)
        per_key: Counter[bytes | None] = Counter()
        r = Result(self.name, records_in=len(self.sent), notes=notes, seconds=round(time.monotonic() - self.t0, 1))
        reasons: Counter[str] = Counter()
        for key, _ in aspects:
            per_key[key] += 1
            if self.sent.get(key) not in (None, "aspect"):
                r.wrong_reason += 1  # a hostile record that should have been dead-lettered came out as a listing
                r.wrong.append(f"{key[:60]!r}: {self.sent.get(key)} -> aspect")
        for key, dl in dead:
            per_key[key] += 1
            reasons[dl.error_kind] += 1
            expected = self.sent.get(key)
            if expected == "aspect":
                r.dependency_dead_letters += 1  # a good record dead-lettered: the worker blamed the record for something else
            elif expected is not None and expected != dl.error_kind:
                r.wrong_reason += 1
                r.wrong.append(f"{key[:60]!r}: {expected} -> {dl.error_kind} ({dl.error_message[:120]})")
        r.outputs = len(aspects) + len(dead)
        r.lost = sum(1 for k in self.sent if per_key[k] == 0)
        r.duplicates = sum(max(0, c - 1) for k, c in per_key.items() if k in self.sent)
        r.dead_letters = dict(reasons)
        return r


def _read_all(s: OpalSettings, topic: str, settle_s: float = 2.0) -> list[tuple[bytes | None, object]]:
    """Every record of ``topic`` from the beginning (a fresh group), decoded."""
    from workers.kafka_clients import make_consumer

    codec = EventCodec(AspectEvent) if topic == s.topics.aspects else EventCodec(DeadLetter)
    c = make_consumer(s.kafka, f"chaos-reader-{uuid.uuid4().hex[:6]}", **{"enable.auto.commit": False})
    c.subscribe([topic])
    out: list[tuple[bytes | None, object]] = []
    last = time.monotonic()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = c.poll(0.2)
        if m is not None and m.error() is None:
            out.append((m.key(), codec.decode(m.value())))
            last = time.monotonic()
        elif c.assignment() and time.monotonic() - last > settle_s:
            break
        elif not c.assignment():
            last = time.monotonic()
    c.close()
    return out


# -- scenarios -----------------------------------------------------------------------------------------------
def flood(h: Harness, per_kind: int = 36, good: int = 200, oversize: int = 3) -> Result:
    sc = h.scenario("flood")
    bad = hostile_records(h.root, per_kind, prefix=f"flood-{uuid.uuid4().hex[:4]}", oversize_per_kind=oversize)
    evs = good_events(h.root, good, f"flood-good-{uuid.uuid4().hex[:4]}")
    mixed: list[tuple[bytes | None, bytes | None, str]] = []
    step = max(1, len(bad) // max(1, len(evs)))
    for i, rec in enumerate(bad):
        mixed.append((rec.key, rec.value, rec.expected))
        if i % step == 0 and evs:
            e = evs.pop()
            mixed.append((e.listing_id.encode(), CODEC.encode(e), "aspect"))
    mixed += [(e.listing_id.encode(), CODEC.encode(e), "aspect") for e in evs]
    h.log(f"flood: {len(bad)} hostile records of {len({b.kind for b in bad})} kinds + {good} good")
    sc.publish(mixed)
    h.log(f"flood: published after {time.monotonic() - sc.t0:.1f} s")
    sc.drain()
    h.log(f"flood: drained after {time.monotonic() - sc.t0:.1f} s")
    kinds = len({b.kind for b in bad})
    return sc.result(f"{len(bad)} hostile of {kinds} kinds ({sum(b.kind in OVERSIZE_KINDS for b in bad)} ~1 MB) + {good} good")


def kill9(h: Harness, cycles: int = 10, good: int = 400) -> Result:
    sc = h.scenario("kill9", max_in_flight="16")
    sc.publish_good(good)
    for i in range(cycles):
        w = sc.start_worker()
        time.sleep(3 + (i % 3))
        w.send_signal(signal.SIGKILL)
        w.wait()
    sc.drain()
    return sc.result(f"{cycles} kill -9 cycles, 3-5 s apart")


def two_workers(h: Harness, good: int = 400) -> Result:
    sc = h.scenario("two-workers", partitions=6)
    sc.publish_good(good)
    a = sc.start_worker(idle_exit=8)
    b = sc.start_worker()
    sc.wait_outputs(good // 4, 180)
    b.send_signal(signal.SIGKILL)
    b.wait()
    a.wait(timeout=600)
    sc.drain()
    return sc.result("one of two group members killed with kill -9 after a quarter of the records")


def valkey_down(h: Harness, good: int = 120) -> Result:
    assert h.kill_service and h.restart_service
    sc = h.scenario("valkey-down")
    sc.start_worker()
    sc.publish_good(good // 2)
    h.kill_service("redis")
    sc.publish_good(good // 2)
    time.sleep(20)
    h.restart_service("redis")
    sc.drain()
    return sc.result("valkey kill -9 for 20 s while records arrived (cache degrades to misses)")


def vllm_down(h: Harness, good: int = 150, down_s: float = 60) -> Result:
    assert h.stop_model and h.restart_model
    sc = h.scenario("vllm-down", breaker_probe_max_s="5")
    sc.start_worker()
    sc.publish_good(10)
    sc.wait_outputs(10, 120)
    h.stop_model()
    t = time.monotonic()
    sc.publish_good(good - 10)
    time.sleep(max(0.0, down_s - (time.monotonic() - t)))
    h.restart_model()
    sc.drain(timeout_s=900)
    return sc.result(f"model server stopped for {down_s:.0f} s while {good - 10} records arrived")


def broker_s3(h: Harness, good: int = 300) -> Result:
    assert h.kill_service and h.restart_service
    sc = h.scenario("broker-s3")
    sc.publish_good(good)
    sc.start_worker()
    sc.wait_outputs(good // 5, 180)
    h.kill_service("kafka")
    time.sleep(5)
    h.restart_service("kafka")
    sc.drain()
    return sc.result("broker kill -9 under load, restarted on its S3 storage 5 s later")


SCENARIOS: dict[str, Callable[[Harness], Result]] = {
    "flood": flood,
    "kill9": kill9,
    "two-workers": two_workers,
    "valkey-down": valkey_down,
    "vllm-down": vllm_down,
    "broker-s3": broker_s3,
}


def table(results: list[Result]) -> str:
    head = "| scenario | in | outputs | lost | duplicates | dead letters by reason | dependency dead letters | wrong reason | s | ok |"
    rows = [head, "|" + "---|" * 10]
    for r in results:
        for w in r.wrong[:20]:
            print(f"  wrong reason in {r.scenario}: {w}")
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r.dead_letters.items())) or "-"
        rows.append(
            f"| {r.scenario} | {r.records_in} | {r.outputs} | {r.lost} | {r.duplicates} | {reasons} | "
            f"{r.dependency_dead_letters} | {r.wrong_reason} | {r.seconds} | {'yes' if r.ok else '**NO**'} |"
        )
    return "\n".join(rows)


@contextmanager
def embedded_harness(model: Path, run_dir: Path) -> Iterator[Harness]:
    from opal import embedded
    from opal.vllm_server import start_vllm
    from schemas.settings import EmbeddedSettings, VllmSettings

    base = OpalSettings()
    base = base.model_copy(update={"embedded": EmbeddedSettings(run_dir=run_dir, broker_storage="s3")})
    up = embedded.up_detached(base, "s3")
    settings = embedded.resolve_settings(base)
    print(f"stack: kafka {up.state['kafka_bootstrap']} (s3 storage), redis up; starting vLLM ...", flush=True)
    port = embedded.free_port()
    proc, url = start_vllm(model, VllmSettings(), run_dir / "vllm", port=port, timeout_s=600)
    state = {"proc": proc}

    def stop_model() -> None:
        print("  vLLM: stopping", flush=True)
        state["proc"].stop()

    def restart_model() -> None:
        print("  vLLM: starting again on the same port", flush=True)
        state["proc"], _ = start_vllm(model, VllmSettings(), run_dir / "vllm", port=port, timeout_s=600)

    def kill(service: str) -> None:
        print(f"  kill -9 {service}", flush=True)
        embedded.kill_service(run_dir, service)

    def restart(service: str) -> None:
        print(f"  restart {service}", flush=True)
        embedded.restart_service(run_dir, service)

    try:
        yield Harness(settings, url, run_dir / "images", run_dir, restart_model, stop_model, kill, restart)
    finally:
        state["proc"].stop()
        embedded.stop_detached(run_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {', '.join(SCENARIOS)}")
    ap.add_argument("--model", type=Path, default=REPO / ".opal" / "models" / "tiny-seed0", help="model folder to serve")
    ap.add_argument("--run-dir", type=Path, default=REPO / ".opal" / "chaos", help="stack, logs and images of this run")
    ap.add_argument("--out", type=Path, default=REPO / ".opal" / "chaos" / "results", help="folder for results.json/.md")
    args = ap.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    if not (args.model / "config.json").exists():
        print(f"building the tiny model in {args.model} ...", flush=True)
        subprocess.run([OPAL, "model", "init-tiny", "--out", str(args.model)], check=True, cwd=REPO)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    prepare_root(args.run_dir / "images", IMAGE_MAX_BYTES)
    results: list[Result] = []
    started = datetime.now(UTC)
    with embedded_harness(args.model, args.run_dir) as h:
        for name in chosen:
            print(f"== {name}", flush=True)
            r = SCENARIOS[name](h)
            results.append(r)
            print(table([r]).splitlines()[-1], flush=True)
    md = f"Chaos run {started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores (bench/chaos.py)\n\n{table(results)}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    (args.out / "results.md").write_text(md)
    print("\n" + md)
    bad = [r.scenario for r in results if not r.ok]
    if bad:
        print(f"FAILED: {', '.join(bad)} (loss, a dependency dead letter or a wrong reason)")
        return 1
    print(f"chaos: {len(results)} scenarios, {sum(r.records_in for r in results)} records, 0 lost")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
