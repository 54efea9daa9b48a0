"""The vision stage (training/vision_stage.py): heads from the data, only the vision tower learns, flags restored."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import MODEL_PY, REPO
from training.vision_stage import Head, LabelledImage, label_heads


def test_heads_come_from_labels_the_data_carries_often_enough() -> None:
    items = [
        LabelledImage(Path(f"{i}.jpg"), {"category": "shoes" if i % 2 else "bag", "Color": "black" if i < 6 else "white"})
        for i in range(10)
    ]
    items += [LabelledImage(Path("x.jpg"), {"category": "bag", "Color": "teal", "Rare": "a"})]
    heads = label_heads(items, min_items=5, min_count=2)
    assert [h.name for h in heads] == ["category", "Color"]  # category first; "Rare" has one item
    color = heads[1]
    assert color.classes == ("black", "white")  # "teal" is seen once: not a class
    assert color.target({"Color": "white"}) == 1 and color.target({"Color": "teal"}) == -100 and color.target({}) == -100
    assert label_heads(items, min_items=50) == []
    assert Head("x", ("a", "b")).target({"x": "b"}) == 1


PROBE = """
import json, sys
from pathlib import Path
import torch
from transformers import AutoProcessor
from opal.samples import load_samples
from training.sft import load_model
from training.progress import Reporter
from training.vision_stage import LabelledImage, VisionStageConfig, run_vision_stage

base = Path(sys.argv[1])
model, _, _ = load_model(base, bf16=False, freeze_vision=True)
processor = AutoProcessor.from_pretrained(base)
samples = load_samples()
items = [LabelledImage(s.image, {"category": s.product_type, "Color": s.color or ""}) for s in samples]
before = {k: v.detach().clone() for k, v in model.named_parameters()}
flags = {k: v.requires_grad for k, v in model.named_parameters()}
result = run_vision_stage(model, processor, items, VisionStageConfig(steps=6, batch_size=8, min_items=4, min_count=2), Reporter(),
                          heldout=items[:8])
after = dict(model.named_parameters())
vision = [k for k in before if ".visual." in k or k.startswith("visual.")]
text = [k for k in before if k not in vision]
print(json.dumps({
    "heads": [h.name for h in result.heads],
    "steps": result.steps,
    "vision_changed": sum(not torch.equal(before[k], after[k]) for k in vision),
    "vision": len(vision),
    "text_changed": sum(not torch.equal(before[k], after[k]) for k in text),
    "flags_restored": all(after[k].requires_grad == flags[k] for k in flags),
    "heldout": [h.heldout_items for h in result.heads],
}))
"""


@pytest.mark.model_env
def test_only_the_vision_tower_learns_and_the_flags_are_restored(tiny_model: Path) -> None:
    r = subprocess.run([str(MODEL_PY), "-c", PROBE, str(tiny_model)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["steps"] == 6 and "category" in out["heads"], out
    assert out["vision_changed"] >= out["vision"] // 2 and out["text_changed"] == 0, out  # the language model is untouched
    assert out["flags_restored"], out  # a frozen tower stays frozen for what follows (requires_grad as before)
    assert all(n > 0 for n in out["heldout"][:1]), out
    assert "vision stage step 6/6" in r.stdout, r.stdout[-2000:]
