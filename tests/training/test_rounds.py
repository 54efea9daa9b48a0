"""The decisions of an improvement round: which pairs it trains on and whether its candidate is promoted."""

from __future__ import annotations

from pathlib import Path

from schemas.events import ImageRef, ModelInfo, PreferencePair, Verdict
from training.rounds import append_ledger, gate, new_pairs, read_ledger, shard_for, summary


def _pair(pid: str, version: str = "sft-1") -> PreferencePair:
    return PreferencePair(
        pair_id=pid,
        listing_id=f"l-{pid}",
        category="shoes",
        prompt="p",
        image=ImageRef(uri="file:///x.jpg"),
        chosen='{"aspects":{},"title":"a"}',
        rejected='{"aspects":{},"title":"b"}',
        verdict=Verdict.INCORRECT,
        model=ModelInfo(name="opal-tiny", version=version),
    )


def test_a_round_takes_each_new_pair_once_and_skips_torn_lines(tmp_path: Path) -> None:
    shard = shard_for(tmp_path, "sft-1")
    assert shard.name == "pairs-sft-1.jsonl" and new_pairs(shard, []).pairs == []  # no shard yet: nothing
    lines = [_pair(p).model_dump_json() for p in ("a", "b", "a", "c")]
    shard.write_text("\n".join(lines) + '\n{"pair_id": "torn", "li')
    got = new_pairs(shard, used={"b"})
    assert [p.pair_id for p in got.pairs] == ["a", "c"] and (got.torn, got.already_used, got.duplicates) == (1, 1, 1)
    ledger = tmp_path / "ledger.txt"
    append_ledger(ledger, [p.pair_id for p in got.pairs])
    assert read_ledger(ledger) == {"a", "c"}
    assert new_pairs(shard, read_ledger(ledger) | {"b"}).pairs == []  # a second round with nothing new does nothing


def test_the_gate_promotes_only_a_candidate_no_worse_within_the_tolerance_with_valid_json() -> None:
    cur = {"rouge_l_f1": 0.36, "aspect_f1": 0.29, "colour_accuracy": 0.45, "json_valid": 1.0}
    assert gate(cur, {**cur, "aspect_f1": 0.285}, tolerance=0.01).promote  # within the tolerance
    worse = gate(cur, {**cur, "colour_accuracy": 0.40}, tolerance=0.01)
    assert not worse.promote and any("colour_accuracy fell" in r for r in worse.reasons)
    invalid = gate(cur, {**cur, "json_valid": 0.99})
    assert not invalid.promote and any("json_valid" in r for r in invalid.reasons)
    assert summary({"rouge_l_f1": 0.5, "aspect_f1": 0.4, "json_valid": 1, "n": 3}) == {
        "rouge_l_f1": 0.5,
        "aspect_f1": 0.4,
        "colour_accuracy": None,
        "json_valid": 1.0,
    }
