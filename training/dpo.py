"""DPO: preference tuning of an (SFT) OPAL model with TRL on judge-built pairs (the paper's step 4).

Pairs come from :mod:`training.preferences` (offline) or the preferences topic (online),
one ``PreferencePair`` JSON per line: the serving prompt for the pair's category, the
image, ``chosen`` = reference listing, ``rejected`` = the model's output. Loss: sigmoid
DPO against a frozen reference copy of the starting model.

Contract
- :func:`run_dpo` writes the same kind of folder as SFT (:func:`training.sft.save_model_folder`:
  vLLM serves it as is; version ``dpo-<weights hash>``), plus ``train_log.json`` with TRL's
  reward margins and accuracies per logging step.
- Pairs whose image cannot be read (only local ``file:`` URIs and paths are read; a
  remote image must be fetched first) or whose category has no schema are counted and
  left out (``skipped``), never silently: the result says how many.
- Duplicate ``pair_id`` lines (a replayed topic, a resumed run) are used once.
- The vision tower is frozen as in SFT. The learning rate defaults to 1e-5: 5e-5 and
  above collapsed the tiny model here (both log-probabilities fall, JSON breaks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from inference.prompt import sft_prompt
from schemas.category import CategoryRegistry, default_categories
from training.preferences import read_pairs
from training.sft import load_model, logged, save_model_folder


@dataclass(frozen=True)
class DpoRunConfig:
    """One DPO run; every field documents itself (TRL's DPOConfig gets the training ones)."""

    base_model: Path = field(metadata={"help": "Model to tune (normally the SFT output); also the frozen reference."})
    pairs: Path = field(metadata={"help": "PreferencePair JSONL (`opal data pairs`, or a dump of the preferences topic)."})
    output_dir: Path = field(metadata={"help": "Where the tuned model folder is written (overwritten)."})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature: how far the policy may move from the reference."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the pairs."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimiser steps; -1: run the epochs."})
    batch_size: int = field(default=2, metadata={"help": "Pairs per device per step."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (cosine, 10% warm-up)."})
    freeze_vision: bool = field(default=True, metadata={"help": "Freeze the vision encoder, as in SFT."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU)."})
    use_cpu: bool = field(default=True, metadata={"help": "Train on CPU even if a GPU is visible."})
    logging_steps: int = field(default=2, metadata={"help": "Log loss and reward margins every this many steps."})
    seed: int = field(default=0, metadata={"help": "Seed for data order."})


@dataclass(frozen=True)
class DpoResult:
    output_dir: Path
    card: dict[str, str]
    log: list[dict[str, Any]]
    pairs: int
    skipped: int

    def margins(self) -> list[tuple[int, float]]:
        return logged(self.log, "rewards/margins")


def _image_path(uri: str) -> Path:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)


def dpo_rows(pairs_file: Path, categories: CategoryRegistry) -> tuple[list[dict[str, Any]], int]:
    """TRL conversational preference rows with an ``images`` column; (rows, skipped)."""
    from PIL import Image

    rows, skipped, seen = [], 0, set()
    for p in read_pairs(pairs_file):
        if p.pair_id in seen:
            continue
        seen.add(p.pair_id)
        if p.category not in categories:
            skipped += 1
            continue
        try:
            image = Image.open(_image_path(p.image.uri)).convert("RGB")
        except (OSError, Image.DecompressionBombError):
            skipped += 1
            continue
        rows.append(
            {
                "prompt": sft_prompt(categories.resolve(p.category), 1),
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": p.chosen}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": p.rejected}]}],
                "images": [image],
            }
        )
    return rows, skipped


def run_dpo(config: DpoRunConfig, categories: CategoryRegistry | None = None) -> DpoResult:
    """Train and write the model folder (see the module contract)."""
    from datasets import Dataset
    from transformers import AutoProcessor
    from trl import DPOConfig, DPOTrainer

    rows, skipped = dpo_rows(config.pairs, categories or default_categories())
    if not rows:
        raise ValueError(f"no usable preference pairs in {config.pairs} ({skipped} skipped)")
    processor = AutoProcessor.from_pretrained(config.base_model)
    model, _, _ = load_model(config.base_model, config.bf16, config.freeze_vision)
    reference, _, _ = load_model(config.base_model, config.bf16, freeze_vision=True)
    args = DPOConfig(
        output_dir=str(config.output_dir),
        loss_type=["sigmoid"],
        beta=config.beta,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        bf16=config.bf16,
        use_cpu=config.use_cpu,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to="none",
        max_length=None,  # truncation would cut image tokens
        seed=config.seed,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor)
    trainer.train()
    card, log = save_model_folder(trainer, processor, config.base_model, config.output_dir, "dpo", {"pairs": str(len(rows))})
    (config.output_dir / "dpo_summary.json").write_text(json.dumps({"pairs": len(rows), "skipped": skipped}) + "\n")
    return DpoResult(config.output_dir, card, log, len(rows), skipped)
