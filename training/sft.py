"""SFT: visual instruction tuning of an OPAL model with TRL, vision encoder frozen (the paper's step 3).

Data: the train split (:func:`training.abo.split_of`) of an ABO-format folder, each item
refined by MACE's deterministic pass (:func:`training.mace.refine`), or the ``refined``
listings of an ``opal data mace`` JSONL (the MLLM pass) when one is given. Rows are
TRL prompt/completion rows from the one prompt module (:mod:`training.sft_format`), so
what the model learns is exactly what serving asks.

Contract
- :func:`run_sft` trains, then writes a folder vLLM serves as is: weights, processor
  (with ``preprocessor_config.json``), ``opal_model.json`` (name, a version derived from
  the weights, the base model's version, steps, items) and ``train_log.json`` (TRL's
  log history: loss, learning rate, token accuracy per logging step).
- The vision tower's parameters are frozen (``requires_grad=False``) when
  ``freeze_vision`` is set (the default, as in the paper); everything else trains.
- ``deepspeed`` names a DeepSpeed JSON config (``training/configs/zero3.json`` is the
  paper's ZeRO-3). Without a launcher, the single-process environment DeepSpeed needs
  (RANK, WORLD_SIZE, MASTER_ADDR/PORT) is filled in and its op cache kept under
  ``.opal/``; under ``deepspeed``/``torchrun`` the launcher's values are kept.
- Deterministic for a seed on CPU. Re-running into the same folder overwrites it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.category import CategoryRegistry, default_categories
from training.abo import ListingRecord, load_abo, split_of
from training.mace import refine
from training.sft_format import sft_row

REPO = Path(__file__).resolve().parents[1]
ZERO3 = REPO / "training" / "configs" / "zero3.json"
STALE = ("train_log.json", "opal_model.json", "loss.png", "dpo.png", "dpo_summary.json")  # removed before a save


@dataclass(frozen=True)
class SftRunConfig:
    """One SFT run; every field documents itself (TRL's SFTConfig gets the training ones)."""

    base_model: Path = field(metadata={"help": "Model folder to start from (e.g. `opal model init-tiny` output or a Qwen2-VL)."})
    data: Path = field(metadata={"help": "ABO-format folder (listings.jsonl + images/); its train split is used."})
    output_dir: Path = field(metadata={"help": "Where the trained model folder is written (overwritten)."})
    mace: Path | None = field(default=None, metadata={"help": "`opal data mace` JSONL: use its MLLM-refined listings."})
    limit: int | None = field(default=None, metadata={"help": "Train on at most this many items (first by item id)."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the data (the paper: 1)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimiser steps; -1: run the epochs."})
    batch_size: int = field(default=4, metadata={"help": "Rows per device per step."})
    grad_accumulation: int = field(default=1, metadata={"help": "Steps accumulated per optimiser step."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (cosine schedule)."})
    warmup: float = field(default=0.1, metadata={"help": "Warm-up as a share of the steps (the paper: 10%)."})
    freeze_vision: bool = field(default=True, metadata={"help": "Freeze the vision encoder (the paper does)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU); CPU trains in fp32."})
    use_cpu: bool = field(default=True, metadata={"help": "Train on CPU even if a GPU is visible."})
    deepspeed: Path | None = field(default=None, metadata={"help": f"DeepSpeed config JSON, e.g. {ZERO3.relative_to(REPO)}."})
    logging_steps: int = field(default=5, metadata={"help": "Log loss every this many steps."})
    seed: int = field(default=0, metadata={"help": "Seed for data order and initialisation of anything new."})


@dataclass(frozen=True)
class SftResult:
    output_dir: Path
    card: dict[str, str]
    log: list[dict[str, Any]]
    items: int
    trainable: int
    frozen: int

    def losses(self) -> list[tuple[int, float]]:
        return logged(self.log, "loss")


def logged(log: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in a TRL log history (the entries that have it)."""
    return [(int(h["step"]), float(h[key])) for h in log if key in h]


def training_items(config: SftRunConfig, categories: CategoryRegistry) -> list[tuple[ListingRecord, str, dict[str, str]]]:
    """(record, title, aspects) for each train item: MACE-refined (rules, or the MLLM pass's JSONL)."""
    records = sorted((r for r in load_abo(config.data, categories) if split_of(r) == "train"), key=lambda r: r.item_id)
    mllm: dict[str, dict[str, Any]] = {}
    if config.mace is not None:
        for line in config.mace.read_text().splitlines():
            try:  # `opal data mace` appends: a crash can leave a torn last line, which it skips too
                row = json.loads(line)
                mllm[str(row["item_id"])] = {"title": str(row["refined"]["title"]), "aspects": dict(row["refined"]["aspects"])}
            except (ValueError, KeyError, TypeError):
                continue
        if not any(r.item_id in mllm for r in records):
            raise ValueError(f"{config.mace} refines none of the train items of {config.data} (built from another folder?)")
    out = []
    for r in records:
        if r.item_id in mllm:
            title, aspects = mllm[r.item_id]["title"], dict(mllm[r.item_id]["aspects"])
        else:
            det = refine(r.item_id, r.title, r.aspects, categories.get(r.category))
            title, aspects = det.title, det.aspects
        if title:
            out.append((r, title, aspects))
    return out[: config.limit] if config.limit is not None else out


def _deepspeed_env(config: SftRunConfig) -> None:
    if config.deepspeed is None:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".opal" / "torch-extensions"))


def run_sft(config: SftRunConfig, categories: CategoryRegistry | None = None) -> SftResult:
    """Train and write the model folder (see the module contract)."""
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor
    from trl import SFTConfig, SFTTrainer

    cats = categories or default_categories()
    items = training_items(config, cats)
    if not items:
        raise ValueError(f"no train items in {config.data}")
    rows = [sft_row(title, aspects, cats.get(r.category), Image.open(r.image).convert("RGB")) for r, title, aspects in items]
    _deepspeed_env(config)
    processor = AutoProcessor.from_pretrained(config.base_model)
    model, trainable, frozen = load_model(config.base_model, config.bf16, config.freeze_vision)
    args = SFTConfig(
        output_dir=str(config.output_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup,  # a float below 1 is a share of the steps (transformers 5)
        bf16=config.bf16,
        use_cpu=config.use_cpu,
        deepspeed=str(config.deepspeed) if config.deepspeed else None,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to="none",
        max_length=None,  # truncation would cut image tokens
        seed=config.seed,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor)
    trainer.train()
    card, log = save_model_folder(
        trainer, processor, config.base_model, config.output_dir, "sft", {"items": str(len(rows)), "data": str(config.data)}
    )
    return SftResult(config.output_dir, card, log, len(rows), trainable, frozen)


def load_model(path: Path, bf16: bool, freeze_vision: bool) -> tuple[Any, int, int]:
    """(Qwen2-VL model, trainable parameter count, frozen count); fp32 unless ``bf16``; vision tower frozen if asked."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    if freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad = False
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, trainable, sum(p.numel() for p in model.parameters()) - trainable


def save_model_folder(
    trainer: Any, processor: Any, base_model: Path, out: Path, stage: str, extra: dict[str, str]
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Write a trained model as a folder vLLM serves as is; returns (model card, TRL log history).

    Weights, processor and ``preprocessor_config.json``; ``train_log.json``; ``opal_model.json`` with the base
    model's name, version ``<stage>-<sha256 of the weights, 12 hex>``, the base version and the step count.
    """
    from transformers import Qwen2VLImageProcessor

    if out.resolve() == base_model.resolve():
        raise ValueError(f"refusing to overwrite the base model {base_model}: choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json"), *(out / n for n in STALE)]:
        stale.unlink(missing_ok=True)  # a previous run's shards or plots must not mix with this one
    trainer.save_model(str(out))
    processor.save_pretrained(out)
    Qwen2VLImageProcessor.from_pretrained(base_model).save_pretrained(out)  # preprocessor_config.json for vLLM
    log = list(trainer.state.log_history)
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    base_card_path = base_model / "opal_model.json"
    base = json.loads(base_card_path.read_text()) if base_card_path.exists() else {"name": base_model.name, "version": "?"}
    h = hashlib.sha256()
    for w in sorted(out.glob("*.safetensors")):
        with w.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    digest = h.hexdigest()[:12]
    card = {
        "name": str(base["name"]),
        "version": f"{stage}-{digest}",
        "base_version": str(base["version"]),
        "steps": str(trainer.state.global_step),
        **extra,
    }
    (out / "opal_model.json").write_text(json.dumps(card, indent=2) + "\n")
    return card, log
