"""Preference pairs from a served model, and DPO with TRL on them (the paper's step 4)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from opal.samples import SAMPLE_DIR
from schemas.events import ImageRef, Verdict
from tests.support import RUN, compare, opal_bin, synthetic_pairs
from training.preferences import read_pairs, write_pairs


@pytest.mark.model_env
def test_dpo_raises_the_reward_margin_and_counts_unusable_pairs(tiny_model: Path, tmp_path: Path) -> None:
    pairs = synthetic_pairs(12)
    gone = pairs[0].model_copy(update={"pair_id": "p-gone", "image": ImageRef(uri=(tmp_path / "missing.jpg").as_uri())})
    write_pairs([*pairs, pairs[1], gone], tmp_path / "pairs.jsonl")  # a duplicate line and a pair whose image is gone
    out = tmp_path / "dpo"
    cmd = [opal_bin(), "train", "dpo", "--base", str(tiny_model), "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(out)]
    r = subprocess.run([*cmd, "--max-steps", "8"], **RUN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((out / "dpo_summary.json").read_text()) == {"pairs": 12, "skipped": 1}
    margins = [h["rewards/margins"] for h in json.loads((out / "train_log.json").read_text()) if "rewards/margins" in h]
    assert len(margins) >= 3 and margins[-1] > margins[0] and margins[-1] > 0, margins
    assert json.loads((out / "opal_model.json").read_text())["version"].startswith("dpo-")
    diff = compare(tiny_model, out)
    assert diff["vision_changed"] == 0 and diff["text_changed"] > 0, diff


@pytest.mark.model_env
def test_no_usable_pairs_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    gone = synthetic_pairs(1)[0].model_copy(update={"image": ImageRef(uri=(tmp_path / "missing.jpg").as_uri())})
    write_pairs([gone], tmp_path / "pairs.jsonl")
    cmd = [opal_bin(), "train", "dpo", "--base", str(tiny_model), "--pairs", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path)]
    r = subprocess.run(cmd, **RUN)
    assert r.returncode == 2 and "no usable preference pairs" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.vllm
def test_pairs_from_a_served_model_are_the_bottom_two_verdicts(vllm_url: str, tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    cmd = [opal_bin(), "data", "pairs", "--endpoint", vllm_url, "--data", str(SAMPLE_DIR), "--limit", "10", "--out", str(out)]
    r = subprocess.run(cmd, **RUN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pairs = read_pairs(out)
    assert pairs, r.stdout  # the tiny model has random weights: most of its listings are judged (mostly) incorrect
    assert len({p.pair_id for p in pairs}) == len(pairs)
    for p in pairs:
        assert p.verdict in (Verdict.MOSTLY_INCORRECT, Verdict.INCORRECT) and p.chosen != p.rejected
        assert Path(p.image.uri.removeprefix("file://")).exists() and p.model.version.startswith("tiny-seed3-")
    assert f"wrote {len(pairs)} preference pairs" in r.stdout
