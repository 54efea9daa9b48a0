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
  remote image must be fetched first) are counted and left out (``skipped``), never
  silently: the result says how many. A category without a schema gets the generic one,
  as the worker that generated the rejected listing did.
- Duplicate ``pair_id`` lines (a replayed topic, a resumed run) are used once.
- The vision tower is frozen as in SFT. The learning rate defaults to 1e-5: 5e-5 and
  above collapsed the tiny model here (both log-probabilities fall, JSON breaks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from inference.prompt import sft_prompt
from schemas.category import CategoryRegistry, default_categories
from training.preferences import read_pairs
from training.sft import load_model, logged, save_model_folder

if TYPE_CHECKING:  # TRL is model-side only
    from training.trl_configs import DpoRunConfig


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
    """Train and write the model folder (see the module contract). ``config`` is TRL's DPOConfig
    (:class:`training.trl_configs.DpoRunConfig`): every TrainingArguments option reaches the trainer."""
    import dataclasses

    from datasets import Dataset
    from transformers import AutoProcessor
    from trl import DPOTrainer

    base_model, output_dir, pairs = Path(str(config.base_model)), Path(str(config.output_dir)), Path(str(config.pairs))
    rows, skipped = dpo_rows(pairs, categories or default_categories())
    if not rows:
        raise ValueError(f"no usable preference pairs in {pairs} ({skipped} skipped)")
    processor = AutoProcessor.from_pretrained(base_model)
    model, _, _ = load_model(base_model, bool(config.bf16), config.freeze_vision)
    reference, _, _ = load_model(base_model, bool(config.bf16), freeze_vision=True)
    args = dataclasses.replace(config, output_dir=str(output_dir))
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor)
    trainer.train()
    card, log = save_model_folder(trainer, processor, base_model, output_dir, "dpo", {"pairs": str(len(rows))})
    (output_dir / "dpo_summary.json").write_text(json.dumps({"pairs": len(rows), "skipped": skipped}) + "\n")
    return DpoResult(output_dir, card, log, len(rows), skipped)
