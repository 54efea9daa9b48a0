from __future__ import annotations

from pathlib import Path

from schemas.category import default_categories
from tests.support import REPO, opal_bin
from training.abo import load_abo
from training.lacu import MIN_ROUNDS, Turn, contradictions, conversation_from_listing, to_sft_messages
from training.mace import refine

SAMPLE = REPO / "data" / "sample"
REG = default_categories()


def test_every_sample_gets_a_consistent_conversation_of_five_rounds() -> None:
    for r in load_abo(SAMPLE):
        cat = REG.get(r.category)
        refined = refine(r.item_id, r.title, r.aspects, cat)
        turns = conversation_from_listing(refined.title, refined.aspects, cat, r.qa)
        assert len(turns) >= MIN_ROUNDS
        assert contradictions(turns, refined.aspects, cat) == []
        covered = {n for n in refined.aspects if any(f"{n}:" in t.seller for t in turns)}
        assert covered == set(refined.aspects)  # every aspect is discussed


def test_contradicting_qa_is_left_out_and_detected() -> None:
    shoes = REG.get("shoes")
    aspects = {"Color": "white", "Heel Type": "kitten"}
    qa = [("What is the main color of the shoe", "black"), ("What type of heel does the shoe have", "kitten")]
    turns = conversation_from_listing("white court shoes", aspects, shoes, qa)
    assert all("Black" not in t.seller for t in turns)
    assert any(t.seller == "Kitten." for t in turns)
    assert contradictions([Turn("What colour is it?", "It is black.")], aspects, shoes)
    assert not contradictions([Turn("What colour is it?", "White, with black laces.")], aspects, shoes)


def test_sft_export_alternates_roles_with_the_image_first() -> None:
    msgs = to_sft_messages([Turn("q1", "a1"), Turn("q2", "a2")])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"][0] == {"type": "image"} and {"type": "image"} not in msgs[2]["content"]


def test_data_cli_deterministic_passes(tmp_path: Path) -> None:
    import json
    import subprocess

    mace, lacu = tmp_path / "m.jsonl", tmp_path / "l.jsonl"
    r = subprocess.run([opal_bin(), "data", "mace", "--out", str(mace)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and "removed from titles: size" in r.stdout
    rows = [json.loads(x) for x in mace.read_text().splitlines()]
    assert len(rows) == 40 and rows[0]["refined"]["title"] == "find. women's kitten heel court, white"
    assert rows[0]["deterministic"]["removed"] == [{"text": "7 uk", "reason": "size"}]
    r = subprocess.run(
        [opal_bin(), "data", "lacu", "--mace", str(mace), "--out", str(lacu)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert r.returncode == 0
    convs = [json.loads(x) for x in lacu.read_text().splitlines()]
    assert len(convs) == 40 and all(len(c["turns"]) >= MIN_ROUNDS for c in convs)
    assert convs[0]["messages"][0]["content"][0] == {"type": "image"}  # the chat format SFT uses
    summary = json.loads((tmp_path / "l.summary.json").read_text())
    assert summary["done"] == 40 and summary["failed"] == 0
    assert json.loads((tmp_path / "m.summary.json").read_text())["removed_by_reason"]["size"] >= 5
