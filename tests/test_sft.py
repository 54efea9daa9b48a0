"""SFT with TRL on the tiny model: the loss falls, the vision tower stays frozen, vLLM serves the result."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from inference.client import ListingClient
from opal.samples import load_samples
from opal.vllm_server import start_vllm
from schemas.settings import VllmSettings
from tests.conftest import REPO, opal_bin

MODEL_PY = REPO / ".venv-model" / "bin" / "python"

COMPARE = """
import json, sys
from safetensors.torch import load_file
base, trained = load_file(sys.argv[1] + '/model.safetensors'), load_file(sys.argv[2] + '/model.safetensors')
def same(k): return bool((base[k].float() == trained[k].float()).all())
def is_vision(k): return k.startswith('visual.') or '.visual.' in k
vision = [k for k in base if is_vision(k)]
text = [k for k in base if not is_vision(k)]
print(json.dumps({'vision_keys': len(vision), 'vision_changed': sum(not same(k) for k in vision),
                  'text_keys': len(text), 'text_changed': sum(not same(k) for k in text)}))
"""

RUN: dict[str, Any] = {"capture_output": True, "text": True, "cwd": REPO, "timeout": 900}


def compare(base: Path, trained: Path) -> dict[str, int]:
    """How many vision and text tensors differ between two model folders (run in the model environment)."""
    r = subprocess.run([str(MODEL_PY), "-c", COMPARE, str(base), str(trained)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


@pytest.fixture(scope="module")
def sft_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sft")
    cmd = [opal_bin(), "train", "sft", "--base", str(tiny_model), "--out", str(out), "--max-steps", "16", "--lr", "2e-3"]
    r = subprocess.run(cmd, **RUN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "parameters trained / frozen" in r.stdout
    return out


@pytest.mark.model_env
def test_sft_lowers_the_loss_and_keeps_the_vision_tower_frozen(sft_model: Path, tiny_model: Path) -> None:
    log = json.loads((sft_model / "train_log.json").read_text())
    losses = [h["loss"] for h in log if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < losses[0] * 0.8, losses
    card = json.loads((sft_model / "opal_model.json").read_text())
    base = json.loads((tiny_model / "opal_model.json").read_text())
    assert card["version"].startswith("sft-") and card["base_version"] == base["version"] and card["steps"] == "16"
    assert (sft_model / "loss.png").read_bytes()[:4] == b"\x89PNG"
    diff = compare(tiny_model, sft_model)
    assert diff["vision_keys"] > 0 and diff["vision_changed"] == 0, diff
    assert diff["text_changed"] >= diff["text_keys"] // 2, diff


@pytest.mark.vllm
def test_vllm_serves_the_sft_model(sft_model: Path, tmp_path: Path) -> None:
    proc, url = start_vllm(sft_model, VllmSettings(), tmp_path, timeout_s=400)
    try:
        sample = load_samples()[0]

        async def one() -> tuple[str, bool]:
            async with ListingClient([url], timeout_s=120) as c:
                res = await c.generate([sample.image.read_bytes()], sample.product_type)
                return res.model.version, res.check.valid

        version, valid = asyncio.run(one())
    finally:
        proc.stop()
    assert version == json.loads((sft_model / "opal_model.json").read_text())["version"] and valid


@pytest.mark.model_env
def test_deepspeed_zero3_trains_and_saves_whole_weights(tiny_model: Path, tmp_path: Path) -> None:
    """The paper's ZeRO-3 config, single process on CPU (first run builds DeepSpeed's ops into .opal/, ~1 min)."""
    cmd = [opal_bin(), "train", "sft", "--base", str(tiny_model), "--out", str(tmp_path), "--max-steps", "6", "--limit", "8"]
    r = subprocess.run([*cmd, "--lr", "2e-3", "--deepspeed", str(REPO / "training" / "configs" / "zero3.json")], **RUN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert any("loss" in h for h in log)
    diff = compare(tiny_model, tmp_path)  # ZeRO-3 shards parameters; the saved folder must hold them whole
    assert diff["vision_keys"] > 0 and diff["vision_changed"] == 0 and diff["text_changed"] > 0, diff


def test_training_items_use_mace_lines_and_skip_a_torn_one(tmp_path: Path) -> None:
    from opal.samples import SAMPLE_DIR
    from schemas.category import default_categories
    from training.sft import SftRunConfig, training_items

    cats = default_categories()
    cfg = SftRunConfig(base_model=tmp_path, data=SAMPLE_DIR, output_dir=tmp_path)
    rules = training_items(cfg, cats)
    first = rules[0][0]
    mace = tmp_path / "mace.jsonl"
    good = {"item_id": first.item_id, "refined": {"title": "refined by the MLLM", "aspects": {"Color": "white"}}}
    mace.write_text(json.dumps(good) + "\n" + '{"item_id": "torn", "refi')
    items = training_items(SftRunConfig(base_model=tmp_path, data=SAMPLE_DIR, output_dir=tmp_path, mace=mace), cats)
    assert (items[0][0].item_id, items[0][1], items[0][2]) == (first.item_id, "refined by the MLLM", {"Color": "white"})
    assert len(items) == len(rules)  # the other items fall back to the rules pass
    mace.write_text(json.dumps({**good, "item_id": "not-in-this-folder"}) + "\n")
    with pytest.raises(ValueError, match="refines none of the train items"):
        training_items(SftRunConfig(base_model=tmp_path, data=SAMPLE_DIR, output_dir=tmp_path, mace=mace), cats)
