"""`opal demo --loop`: after the demo's enrichment, one improvement round end to end on the embedded stack.

7. the judge agent (`opal worker judge`, faust) judges every demo listing against its seller
   listing; bottom verdicts become preference pairs on the preference topic;
8. the preference builder (`opal worker preferences`) writes them into the shard of the
   serving model's version;
9. the demo model is registered and made current in a registry under the run dir;
10. `opal loop round` (:func:`opal.loop.run_round`): DPO on those pairs, evaluation of current
    and candidate on the samples' test split, the gate, promotion or not;
11. if promoted: vLLM serves the candidate, `opal loop reenrich` puts every listing whose
    AspectEvent came from the old version back on the backfill lane, and the enrichment
    worker generates them again with the new version.

The last line is ``loop: <P> preference pairs, candidate <version> <promoted|kept>, <R> listings
re-enriched``. Each run starts from a fresh registry and rounds folder (the demo is a demo:
the same pairs again would rightly be "nothing to do").
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from opal.embedded import settings_env
from opal.loop import RoundConfig, run_round
from opal.vllm_server import start_vllm
from schemas.events import AspectEvent, JudgeOutcome, ListingImageEvent, PreferencePair
from schemas.serde import CodecSet, EventCodec
from schemas.settings import OpalSettings
from training.progress import Reporter
from training.registry import ModelRegistry
from training.rounds import shard_for
from workers.reenrich import plan, publish, read_latest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LoopResult:
    pairs: int
    candidate: str | None
    status: str  # promoted, kept, nothing
    reenriched: int

    def line(self) -> str:
        candidate = self.candidate or "-"
        return f"loop: {self.pairs} preference pairs, candidate {candidate} {self.status}, {self.reenriched} listings re-enriched"


def _opal_worker(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = log.open("wb")
    return subprocess.Popen([sys.executable, "-m", "opal.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _count_until(s: OpalSettings, topic: str, codec: EventCodec[JudgeOutcome], expected: int, timeout_s: float) -> int:
    """Distinct listings on ``topic`` (read to its end, polled) once ``expected`` are there or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        latest, _ = read_latest(s.kafka, topic, codec, timeout_s=30)
        if len(latest) >= expected or time.monotonic() >= deadline:
            return len(latest)
        time.sleep(1.0)


def run_loop(console: Console, s: OpalSettings, samples: Path, model_dir: Path, run_dir: Path, events: list[AspectEvent]) -> LoopResult:
    """Steps 7-11 of the demo (module docstring) on the running stack ``s``; ``events`` are the demo's AspectEvents."""
    from workers.enrich import run_worker
    from workers.kafka_clients import make_producer

    loop_dir = run_dir / "loop"
    shutil.rmtree(loop_dir, ignore_errors=True)
    env = settings_env(s, dict(os.environ)) | {
        "OPAL_JUDGE_SAMPLE_RATE": "1",  # the demo judges every listing, not only the unsure ones
        "OPAL_EMBEDDED_RUN_DIR": str(loop_dir / "run"),
        "PYTHONUNBUFFERED": "1",
    }
    codecs = CodecSet.of(s.kafka)
    judged = sum(1 for e in events if e.seller_title)
    judge = _opal_worker(["worker", "judge"], env, loop_dir / "judge.log")
    try:
        with console.status(f"judge agent judging {judged} listings ..."):
            outcomes = _count_until(s, s.topics.judge_outcomes, codecs[JudgeOutcome], judged, timeout_s=180)
    finally:
        _stop(judge)
    pairs_on_topic = len(read_latest(s.kafka, s.topics.preferences, codecs[PreferencePair], key_of=lambda p: p.pair_id)[0])
    console.print(f"[bold]7.[/] judge agent: {outcomes} listings judged, {pairs_on_topic} bottom verdicts became preference pairs")
    shards = loop_dir / "preferences"
    version = events[0].model.version
    shard = shard_for(shards, version)
    builder = _opal_worker(["worker", "preferences", "--out", str(shards)], env, loop_dir / "preferences.log")
    try:
        deadline = time.monotonic() + 120
        with console.status("preference builder writing the shard ..."):
            while time.monotonic() < deadline and (not shard.is_file() or len(shard.read_text().splitlines()) < pairs_on_topic):
                time.sleep(0.5)
    finally:
        _stop(builder)
    written = len(shard.read_text().splitlines()) if shard.is_file() else 0
    console.print(f"[bold]8.[/] preference builder: {written} pairs in {shard.name}")
    registry = ModelRegistry(loop_dir / "registry")
    current = registry.register(model_dir, note="the demo model")
    registry.promote(current.version, "demo", reason="demo start")
    console.print(f"[bold]9.[/] registry: {current.served_name} is current for deployment demo")
    config = RoundConfig(registry=registry.root, deployment="demo", shards=shards, data=samples, out=loop_dir / "rounds", min_pairs=1)
    console.print(
        "[bold]10.[/] improvement round: DPO on the pairs, then both models evaluated on the samples' test split "
        "(a handful of items: it shows the mechanism, it measures nothing; `opal loop round --data ../shared/data/abo` does)"
    )
    result = run_round(config, Reporter(console))
    console.print(result.line(), highlight=False)
    for reason in result.reasons:
        console.print(f"     {reason}", highlight=False)
    if result.status != "promoted":
        return LoopResult(result.pairs, result.candidate, result.status, 0)
    promoted = registry.current("demo")
    assert promoted is not None
    with console.status(f"starting vLLM on the promoted {promoted.served_name} ..."):
        vllm, url = start_vllm(promoted.path, s.vllm, run_dir, timeout_s=400)
    try:
        latest, unreadable = read_latest(s.kafka, s.topics.aspects, codecs[AspectEvent])
        todo = plan(latest, promoted.version, unreadable)
        producer = make_producer(s.kafka)
        sent = publish(producer, s.topics.images_backfill, todo.events, codecs[ListingImageEvent], rate_per_s=0)
        del producer  # destroyed now, while the broker is up (not at exit, where it would log connection errors)
        console.print(f"[bold]11.[/] re-enrichment: {sent} listings from {version} back on the backfill lane")
        s2 = s.model_copy(update={"vllm": s.vllm.model_copy(update={"endpoints": [url]})})
        with console.status("enrichment worker re-enriching with the promoted model ..."):
            asyncio.run(run_worker(s2, asyncio.Event(), idle_exit_s=3.0))
        after, _ = read_latest(s.kafka, s.topics.aspects, codecs[AspectEvent])
    finally:
        vllm.stop()
    reenriched = sum(1 for ev in after.values() if ev.model.version == promoted.version)
    return LoopResult(result.pairs, promoted.version, "promoted", reenriched)
