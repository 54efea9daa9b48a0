"""SFT recipes: every training hyper-parameter in one place, chosen by the base model.

Two recipes, each a frozen :class:`SftRecipe` whose fields document themselves:

- ``tiny-cpu`` for the from-scratch tiny model ``opal model init-tiny`` builds. lr 2e-5 barely
  moves a from-scratch model (loss 6.94 -> 6.84 in 50 steps); lr 1e-3 learns. A random vision
  tower, frozen or trained inside SFT, leaves the model blind (swapping photos within a
  category changed nothing), so the recipe runs a vision stage first
  (:mod:`training.vision_stage`: 400 steps, the tower learns category and aspect heads from
  the photos), then SFT with the tower frozen and the compact prompt (the model's chat
  template keeps the image and the category; :mod:`inference.prompt`). The comparison that
  chose it is in ``docs/MODEL.md``. Measured on the 4,082 ABO train items: ~3 minutes on 2
  cores in all (4 epochs = 1,024 steps at ~0.1 s/step); the cap of 2,400 steps bounds larger
  sets (~5 minutes of steps for ~10k items).
- ``paper-zero3`` for a pretrained 7-8B backbone (Qwen2-VL-7B, InternVL2.5-8B) on 8xA100:
  the paper's SFT (full-parameter, frozen pretrained vision, bf16, DeepSpeed ZeRO-3,
  1 epoch, cosine schedule, 10% warm-up). The learning rate (2e-5), per-device batch 4 x
  accumulation 4 (global 128 on 8 GPUs), max length 4096 and gradient checkpointing are
  usual settings for full fine-tuning of a 7B Qwen2-VL, not figures the paper's summary
  (``../shared/notes/DESIGN.md``) gives; override them with the CLI options.

Contract
- :func:`choose_recipe` reads the base folder's ``opal_model.json``: a ``recipe`` field
  naming a known recipe wins; ``from_scratch: "true"`` or a ``tiny-`` version (cards written
  before the field existed) selects ``tiny-cpu``; a folder without a card (a downloaded
  backbone) or with a card naming neither gets ``paper-zero3``. An explicit name overrides all.
- The command line's explicit values win over the recipe's (:func:`training.trl_configs.with_recipe`);
  :func:`recipe_rows` renders the effective values with their source for the table and the card.
- No torch: the stream environment imports this module too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ZERO3 = REPO / "training" / "configs" / "zero3.json"
CARD = "opal_model.json"


@dataclass(frozen=True)
class SftRecipe:
    """How to run SFT for one kind of base model; every field documents itself."""

    name: str = field(metadata={"help": "Recipe name (printed at start, written into the model card)."})
    summary: str = field(metadata={"help": "What the recipe is for and where its numbers come from."})
    learning_rate: float = field(metadata={"help": "Peak learning rate."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "Schedule after warm-up (transformers name)."})
    warmup: float = field(default=0.1, metadata={"help": "Warm-up as a share of the optimiser steps (the paper: 10%)."})
    batch_size: int = field(default=8, metadata={"help": "Rows per device per forward pass."})
    grad_accumulation: int = field(default=1, metadata={"help": "Forward passes accumulated per optimiser step."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training rows."})
    max_steps: int = field(default=-1, metadata={"help": "Exactly this many optimiser steps, overriding epochs; -1: run the epochs."})
    step_cap: int | None = field(
        default=None, metadata={"help": "When running by epochs, at most this many steps (a time budget); the schedule fits the cap."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Token limit per row, longer rows truncated at the end; None: no truncation."}
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU); False trains in fp32."})
    use_cpu: bool = field(default=True, metadata={"help": "Train on CPU even if a GPU is visible."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward (memory for time)."})
    deepspeed: Path | None = field(default=None, metadata={"help": "DeepSpeed JSON config (ZeRO-3 for the paper); None: plain DDP/CPU."})
    freeze_vision: bool = field(default=True, metadata={"help": "Freeze the vision encoder (the paper freezes a pretrained one)."})
    vision_stage_steps: int = field(
        default=0,
        metadata={
            "help": "Steps of the vision stage before SFT (training/vision_stage.py: the tower learns category and aspect "
            "heads from the photos); 0: none (a pretrained encoder needs none)."
        },
    )
    prompt_style: str = field(
        default="full",
        metadata={
            "help": "full: the model reads the whole instruction (system prompt, aspect list); compact: its chat template "
            "renders only the image and the category (inference/prompt.py), for models too small to read long prompts."
        },
    )
    save_steps: int = field(default=100, metadata={"help": "Write a resumable checkpoint into the output folder every this many steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (older ones are deleted)."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss, learning rate and ETA every this many steps."})
    seed: int = field(default=0, metadata={"help": "Seed for data order and any newly initialised weights."})

    def planned_steps(self, rows: int, world_size: int = 1) -> int:
        """Optimiser steps this recipe runs on ``rows`` training rows (``max_steps`` if set, else epochs, capped)."""
        if self.max_steps > 0:
            return self.max_steps
        per_epoch = max(1, math.ceil(rows / (self.batch_size * world_size)) // self.grad_accumulation)
        steps = max(1, math.ceil(self.epochs * per_epoch))
        return min(steps, self.step_cap) if self.step_cap is not None else steps

    def values(self) -> dict[str, Any]:
        """The training values (everything but name and summary), JSON-ready (paths as strings)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("name", "summary"):
                continue
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out


TINY_CPU = SftRecipe(
    name="tiny-cpu",
    summary=(
        "from-scratch tiny model on a 2-core CPU: a 400-step vision stage teaches the random tower to see "
        "(category/colour/material heads), then SFT with the tower frozen, compact prompt, lr 1e-3, batch 16, "
        "4 epochs (at most 2,400 steps); measured ~3 min for the 4,082 ABO train items"
    ),
    learning_rate=1e-3,
    batch_size=16,
    grad_accumulation=1,
    epochs=4.0,
    step_cap=2400,
    freeze_vision=True,  # after the vision stage (measured: frozen 0.424 colour vs 0.380 trained on with the rest)
    vision_stage_steps=400,
    prompt_style="compact",
    max_length=None,  # truncation would cut image tokens; tiny rows are short anyway
    bf16=False,
    use_cpu=True,
    gradient_checkpointing=False,  # recomputation costs time; the tiny model needs no memory saving
    deepspeed=None,
    save_steps=100,
    logging_steps=10,
)

PAPER_ZERO3 = SftRecipe(
    name="paper-zero3",
    summary=(
        "the paper's SFT of a pretrained 7-8B backbone on 8xA100 with DeepSpeed ZeRO-3: full-parameter, "
        "frozen pretrained vision, bf16, 1 epoch, cosine, 10% warm-up, global batch 8x4x4 = 128"
    ),
    learning_rate=2e-5,
    batch_size=4,
    grad_accumulation=4,
    epochs=1.0,
    max_length=4096,  # image tokens come first: keep the processor's max_pixels so an image fits well within
    bf16=True,
    use_cpu=False,
    gradient_checkpointing=True,
    deepspeed=ZERO3,
    save_steps=200,
    logging_steps=10,
)

RECIPES: dict[str, SftRecipe] = {r.name: r for r in (TINY_CPU, PAPER_ZERO3)}


def read_card(base: Path) -> dict[str, Any] | None:
    """The base folder's ``opal_model.json``, or None when it has none (or it is not a JSON object)."""
    path = base / CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except ValueError:
        return None
    return card if isinstance(card, dict) else None


def choose_recipe(base: Path, name: str | None = None) -> tuple[SftRecipe, str]:
    """(recipe, why it was chosen) for SFT from ``base``; ``name`` forces one (``ValueError`` if unknown)."""
    if name is not None:
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        return RECIPES[name], "asked for with --recipe"
    card = read_card(base)
    if card is None:
        return PAPER_ZERO3, f"{base} has no {CARD}: a pretrained backbone"
    named = str(card.get("recipe", ""))
    if named in RECIPES:
        return RECIPES[named], f"the base's {CARD} names it"
    if str(card.get("from_scratch", "")).lower() == "true" or str(card.get("version", "")).startswith("tiny-"):
        return TINY_CPU, f"the base's {CARD} marks a from-scratch tiny model"
    return PAPER_ZERO3, f"the base's {CARD} marks no from-scratch model: a pretrained backbone"


def recipe_rows(recipe: SftRecipe, overridden: frozenset[str]) -> list[tuple[str, str, str]]:
    """(field, value, source) for every training value: source is the recipe's name or ``option``."""
    rows = []
    for k, v in recipe.values().items():
        shown = "-" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))
        rows.append((k, shown, "option" if k in overridden else recipe.name))
    return rows
