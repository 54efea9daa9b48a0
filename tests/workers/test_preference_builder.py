"""The preference-set builder (faust-streaming) against real tansu and valkey, run through `opal worker preferences`."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

from schemas.events import DeadLetter, ImageRef, ModelInfo, PreferencePair, Verdict
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from tests.support import REPO, opal_bin, publish, read_topic, settings_env
from topology.admin import apply_topology
from topology.declared import build_topology
from training.preferences import read_pairs
from workers.kafka_clients import make_admin

CODEC = EventCodec(PreferencePair)


def pair(pair_id: str, version: str) -> PreferencePair:
    return PreferencePair(
        pair_id=pair_id,
        listing_id=f"L-{pair_id}",
        category="handbag",
        prompt="p",
        image=ImageRef(uri=f"file:///data/{pair_id}.jpg"),
        chosen='{"title":"white tote","aspects":{"Color":"white"}}',
        rejected='{"title":"kite","aspects":{"Color":"clear"}}',
        verdict=Verdict.INCORRECT,
        model=ModelInfo(name="opal-tiny", version=version),
    )


def test_pairs_land_once_in_one_shard_per_model_version(settings: OpalSettings, cli_env: dict[str, str], tmp_path: Path) -> None:
    s = settings.model_copy(update={"redis": settings.redis.model_copy(update={"key_prefix": f"t{uuid.uuid4().hex[:6]}:"})})
    apply_topology(make_admin(s.kafka), build_topology(s))
    records = [
        (p.pair_id.encode(), CODEC.encode(p)) for p in (pair("a", "sft-1"), pair("b", "sft-1"), pair("c", "dpo/2"), pair("a", "sft-1"))
    ]
    sentinel = (b"a", CODEC.encode(pair("z", "sft-1")))  # key "a": same partition, after the duplicate
    publish(s, s.topics.preferences, [*records, (b"junk", b"not avro"), sentinel])
    out = tmp_path / "shards"
    proc = subprocess.Popen(
        [opal_bin(), "worker", "preferences", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=settings_env(s, cli_env),
        cwd=REPO,
    )
    try:
        dead = read_topic(s, s.topics.dead_letters, EventCodec(DeadLetter), 1, timeout_s=90)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(len(read_pairs(f)) for f in out.glob("*.jsonl")) < 4:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=60)
    shards = {f.name: sorted(p.pair_id for p in read_pairs(f)) for f in out.glob("*.jsonl")}
    assert shards == {"pairs-sft-1.jsonl": ["a", "b", "z"], "pairs-dpo_2.jsonl": ["c"]}, log[-3000:]
    assert [(k, d.error_kind) for k, d in dead] == [(b"junk", "malformed_event")]
    assert proc.returncode == 0 and "duplicates" in log and "written" in log, log[-3000:]
