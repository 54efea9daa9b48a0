"""The judge agent (faust-streaming) against a real tansu broker, run through `opal worker judge`."""

from __future__ import annotations

import signal
import subprocess
import uuid

from schemas.events import AspectEvent, AspectValue, DeadLetter, ImageRef, JudgeOutcome, ModelInfo, PreferencePair, SchemaCheck, Verdict
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from tests.support import REPO, opal_bin, publish, read_to_end, read_topic, settings_env
from topology.admin import apply_topology
from topology.declared import build_topology
from workers.judge_agent import selected
from workers.kafka_clients import make_admin

CODEC = EventCodec(AspectEvent)
SELLER = ("white leather tote", {"Color": "white", "Material": "leather"})


def generated(listing_id: str, title: str, confidence: float, seller: bool = True, **aspects: str) -> AspectEvent:
    return AspectEvent(
        listing_id=listing_id,
        source_event_id=f"e-{listing_id}",
        category="handbag",
        title=title,
        aspects=[AspectValue(name=n, value=v, confidence=confidence) for n, v in aspects.items()],
        model=ModelInfo(name="opal-tiny", version="v1"),
        schema_check=SchemaCheck(valid=True),
        images=[ImageRef(uri=f"file:///data/{listing_id}.jpg")],
        seller_title=SELLER[0] if seller else None,
        seller_aspects=SELLER[1] if seller else {},
    )


def test_selection_is_low_confidence_or_a_stable_sample() -> None:
    low, high = generated("a", "t", 0.2, Color="white"), generated("b", "t", 0.99, Color="white")
    assert selected(low, 0.5, 0.0) and not selected(high, 0.5, 0.0) and selected(high, 0.5, 1.0)
    sample = [selected(generated(f"s{i}", "t", 0.99, Color="white"), 0.5, 0.3) for i in range(400)]
    assert 80 < sum(sample) < 160 and sample == [selected(generated(f"s{i}", "t", 0.99, Color="white"), 0.5, 0.3) for i in range(400)]


def test_judge_agent_writes_outcomes_pairs_and_dead_letters(settings: OpalSettings, cli_env: dict[str, str]) -> None:
    s = settings
    apply_topology(make_admin(s.kafka), build_topology(s))
    wrong = generated("L-wrong", "dantur kite", 0.2, Color="clear")
    right = generated("L-right", SELLER[0], 0.3, **SELLER[1])
    publish(
        s,
        s.topics.aspects,
        [
            (b"L-wrong", CODEC.encode(wrong)),
            (b"L-right", CODEC.encode(right)),
            (b"L-sure", CODEC.encode(generated("L-sure", "dantur kite", 0.99, Color="clear"))),  # confident, not sampled
            (b"L-noref", CODEC.encode(generated("L-noref", "dantur kite", 0.2, seller=False, Color="clear"))),
            (b"L-bad", b"not avro"),
            # same keys, so the same partitions, after the skipped ones: once their outcomes are out, the skips happened
            (b"L-sure", CODEC.encode(generated("L-sure", SELLER[0], 0.2, **SELLER[1]))),
            (b"L-noref", CODEC.encode(generated("L-noref", SELLER[0], 0.2, **SELLER[1]))),
        ],
    )
    env = settings_env(s, cli_env) | {"OPAL_JUDGE_SAMPLE_RATE": "0", "OPAL_KAFKA_CLIENT_ID": f"judge-{uuid.uuid4().hex[:6]}"}
    proc = subprocess.Popen([opal_bin(), "worker", "judge"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        # wait until every input shows in an output (the skipped ones through the later records with their keys)
        read_topic(s, s.topics.judge_outcomes, EventCodec(JudgeOutcome), 4, timeout_s=90)
        read_topic(s, s.topics.preferences, EventCodec(PreferencePair), 1, timeout_s=30)
        read_topic(s, s.topics.dead_letters, EventCodec(DeadLetter), 1, timeout_s=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # the agent has stopped: the topics hold all it wrote, extra records included
    outcomes = read_to_end(s, s.topics.judge_outcomes, EventCodec(JudgeOutcome))
    pairs = read_to_end(s, s.topics.preferences, EventCodec(PreferencePair))
    dead = read_to_end(s, s.topics.dead_letters, EventCodec(DeadLetter))
    verdicts = {k: o.verdict for k, o in outcomes}
    assert len(outcomes) == 4, out[-3000:]
    assert {o.judge_model for _, o in outcomes} == {"reference-rules-v1"} and "judge: reference rules" in out  # no OPAL_JUDGE_ENDPOINT
    assert verdicts == {b"L-wrong": Verdict.INCORRECT, b"L-right": Verdict.CORRECT, b"L-sure": Verdict.CORRECT, b"L-noref": Verdict.CORRECT}
    assert [(k, p.listing_id, p.rejected) for k, p in pairs] == [
        (pairs[0][1].pair_id.encode(), "L-wrong", '{"aspects":{"Color":"clear"},"title":"dantur kite"}')
    ]
    assert pairs[0][1].image.uri == "file:///data/L-wrong.jpg" and '"Color":"white"' in pairs[0][1].chosen
    assert [(k, d.error_kind) for k, d in dead] == [(b"L-bad", "malformed_event")]
    assert proc.returncode == 0, out[-3000:]
    for line in ("not_selected", "no_reference", "pairs"):
        assert line in out, out[-3000:]
