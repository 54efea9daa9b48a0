"""SFT: visual instruction tuning of an OPAL model with TRL, vision encoder frozen (the paper's step 3).

Data: the train split (:func:`training.abo.split_of`) of an ABO-format folder, each item
refined by MACE's deterministic pass (:func:`training.mace.refine`), or the ``refined``
listings of an ``opal data mace`` JSONL (the MLLM pass) when one is given. Rows are
TRL prompt/completion rows from the one prompt module (:mod:`training.sft_format`), so
what the model learns is exactly what serving asks.

Contract
- The run's config is TRL's ``SFTConfig`` (:class:`training.trl_configs.SftRunConfig`): every
  TrainingArguments option reaches the trainer. Values the caller did not set come from a
  recipe (:mod:`training.recipes`: a TRL config file) the base model's card selects, or
  ``--recipe``, read by TRL's parser (:func:`training.trl_configs.parse_sft_args`).
- :func:`run_sft` trains, then writes a folder vLLM serves as is: weights, processor
  (with ``preprocessor_config.json``), ``opal_model.json`` (name, a version derived from
  the weights, the base model's version, steps, items, ``sft_recipe`` and ``sft_settings``:
  the recipe's name and every effective value with its source) and ``train_log.json``
  (TRL's log history: loss, learning rate, token accuracy per logging step).
- ``sft_run.json`` is written into the output folder before training starts (recipe, every
  effective value, base, data, rows, planned steps).
- Checkpoints: every ``save_steps`` optimiser steps a resumable ``checkpoint-<step>`` folder
  (weights, optimiser, scheduler, RNG, trainer state) is written into the output folder;
  the newest ``save_total_limit`` are kept. A stopped run leaves them; ``resume`` continues
  from the newest complete one (``trainer_state.json`` written; a checkpoint cut off while
  being written is removed) with the same data order, schedule and log history, and
  refuses when the run's settings differ from ``sft_run.json``; with no complete
  checkpoint it starts from the base. Without ``resume``, an output folder holding
  checkpoints is refused (they would be lost or mixed). Once the final folder is
  written, the checkpoints are deleted (the final folder supersedes them).
- Progress goes through a :class:`training.progress.Reporter` from the first second:
  reading and refining items, loading images, loading the model, then step/total, loss,
  elapsed time and ETA every logging step.
- The vision tower's parameters are frozen (``requires_grad=False``) when the recipe's
  ``freeze_vision`` is set (both recipes, as in the paper); everything else trains.
- ``deepspeed`` names a DeepSpeed JSON config (``training/configs/zero3.json`` is the
  paper's ZeRO-3). Without a launcher, the single-process environment DeepSpeed needs
  (RANK, WORLD_SIZE, MASTER_ADDR/PORT) is filled in and its op cache kept under
  ``.opal/``; under ``deepspeed``/``torchrun`` the launcher's values are kept.
- Deterministic for a seed on CPU. Re-running into the same folder overwrites it (once its
  checkpoints are gone: see above).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import socket
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference.prompt import chat_template
from schemas.category import CategoryRegistry, default_categories
from training.abo import ListingRecord, load_abo, split_of
from training.lacu import conversation_from_listing, visual_rounds
from training.mace import refine
from training.progress import Reporter, eta_callback
from training.recipes import REPO, SftRecipe, read_card
from training.sft_format import qa_rows, sft_row
from training.vision_stage import LabelledImage, VisionStageConfig, VisionStageResult, run_vision_stage

if TYPE_CHECKING:  # TRL is model-side only; the stream side imports this module for train_split_items
    from training.trl_configs import SftRunConfig

STALE = ("train_log.json", "opal_model.json", "loss.png", "dpo.png", "dpo_summary.json")  # removed before a save
RUN_FILE = "sft_run.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Settings that may change between a stopped run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = frozenset({"logging_steps", "save_steps", "save_total_limit"})
# Fields a base's card passes on to the models trained from it (how its line of models is trained).
INHERITED = ("from_scratch", "recipe")


@dataclass(frozen=True)
class SftResult:
    output_dir: Path
    card: dict[str, str]
    log: list[dict[str, Any]]
    items: int
    trainable: int
    frozen: int
    recipe: SftRecipe
    resumed_from: Path | None

    def losses(self) -> list[tuple[int, float]]:
        return logged(self.log, "loss")


def logged(log: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in a TRL log history (the entries that have it)."""
    return [(int(h["step"]), float(h[key])) for h in log if key in h]


def training_items(
    config: SftRunConfig, categories: CategoryRegistry, reporter: Reporter | None = None
) -> list[tuple[ListingRecord, str, dict[str, str]]]:
    """(record, title, aspects) for each train item of ``config``: :func:`train_split_items` with its data settings."""
    return train_split_items(
        Path(str(config.data)),
        categories,
        mace=Path(config.mace) if config.mace else None,
        refined=config.refine,
        limit=config.limit,
        reporter=reporter,
    )


def train_split_items(
    data: Path,
    categories: CategoryRegistry,
    *,
    mace: Path | None = None,
    refined: bool = True,
    limit: int | None = None,
    reporter: Reporter | None = None,
) -> list[tuple[ListingRecord, str, dict[str, str]]]:
    """(record, title, aspects) for each train item of ``data``: MACE-refined (rules, or the MLLM pass's JSONL).

    ``refined=False`` keeps the raw catalogue title and aspects; ``limit`` keeps the first items by item id.
    With a ``reporter``, reading and refining are reported as they go.
    """
    if reporter:
        reporter.note(f"reading listings from {data} ...")
    records = sorted((r for r in load_abo(data, categories) if split_of(r) == "train"), key=lambda r: r.item_id)
    if reporter:
        reporter.note(f"{len(records):,} train-split items with a category schema")
    mllm: dict[str, dict[str, Any]] = {}
    if mace is not None:
        for line in mace.read_text().splitlines():
            try:  # `opal data mace` appends: a crash can leave a torn last line, which it skips too
                row = json.loads(line)
                mllm[str(row["item_id"])] = {"title": str(row["refined"]["title"]), "aspects": dict(row["refined"]["aspects"])}
            except (ValueError, KeyError, TypeError):
                continue
        if not any(r.item_id in mllm for r in records):
            raise ValueError(f"{mace} refines none of the train items of {data} (built from another folder?)")
    out = []
    source = "raw catalogue listings (no MACE)" if not refined else "MACE (rules + MLLM JSONL)" if mace else "MACE (rules)"
    for r in reporter.track(records, len(records), f"refining with {source}") if reporter else records:
        if not refined:
            title, aspects = r.title, dict(r.aspects)
        elif r.item_id in mllm:
            title, aspects = mllm[r.item_id]["title"], dict(mllm[r.item_id]["aspects"])
        else:
            det = refine(r.item_id, r.title, r.aspects, categories.resolve(r.category))
            title, aspects = det.title, det.aspects
        if title:
            out.append((r, title, aspects))
    return out[:limit] if limit is not None else out


def checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-<step>`` folders in ``folder``, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def usable(checkpoint: Path) -> bool:
    """Whether a checkpoint was written completely: transformers writes ``trainer_state.json`` last."""
    try:
        return isinstance(json.loads((checkpoint / "trainer_state.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def run_record(config: SftRunConfig, recipe: SftRecipe) -> dict[str, Any]:
    """What defines a run (compared on resume): inputs and every effective recipe value."""
    return {
        "base_model": str(Path(str(config.base_model)).resolve()),
        "data": str(Path(str(config.data)).resolve()),
        "mace": str(Path(config.mace).resolve()) if config.mace else None,
        "limit": config.limit,
        "refine": config.refine,
        "lacu": config.lacu,
        "recipe": recipe.name,
        "settings": recipe.values(),
    }


def _check_resumable(config: SftRunConfig, recipe: SftRecipe) -> None:
    path = Path(str(config.output_dir)) / RUN_FILE
    if not path.is_file():
        raise ValueError(f"{config.output_dir} has checkpoints but no {RUN_FILE}: not an `opal train sft` run, cannot resume")
    before, now = json.loads(path.read_text()), run_record(config, recipe)
    diffs = [k for k in ("base_model", "data", "mace", "limit", "refine", "lacu") if before.get(k) != now[k]]
    old_settings = before.get("settings", {})
    diffs += [k for k, v in now["settings"].items() if k not in RESUMABLE_CHANGES and old_settings.get(k) != v]
    if diffs:
        shown = ", ".join(f"{k}: {before.get(k, old_settings.get(k))!r} -> {now.get(k, now['settings'].get(k))!r}" for k in diffs)
        raise ValueError(f"--resume with other settings than the stopped run in {config.output_dir} ({shown}); run with the same ones")


def _deepspeed_env(deepspeed: Path | None) -> None:
    if deepspeed is None:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".opal" / "torch-extensions"))
    # DeepSpeed calls torch.distributed's deprecated collectives once per parameter and step: one warning each.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def run_sft(
    config: SftRunConfig,
    categories: CategoryRegistry | None = None,
    reporter: Reporter | None = None,
    overridden: frozenset[str] = frozenset(),
) -> SftResult:
    """Train and write the model folder (see the module contract); ``ValueError`` for unusable inputs or a refused resume.

    ``config`` comes from :func:`training.trl_configs.parse_sft_args` (its recipe applied; ``overridden`` names the
    recipe fields set by options); a config naming no known recipe is refused (``ValueError``).
    """
    rep = reporter or Reporter()
    recipe = config.effective_recipe()
    base_model, output_dir, data = Path(str(config.base_model)), Path(str(config.output_dir)), Path(str(config.data))
    if not (base_model / "config.json").is_file():
        raise ValueError(f"{base_model} is not a model folder (no config.json)")
    if output_dir.resolve() == base_model.resolve():
        raise ValueError(f"refusing to overwrite the base model {base_model}: choose another output folder")
    found = checkpoints(output_dir)
    resume_from: Path | None = None
    complete = [c for c in found if usable(c)]
    if config.resume and complete:
        _check_resumable(config, recipe)
        resume_from = complete[-1]
        for torn in found[found.index(resume_from) + 1 :]:  # cut off while being written: never resume from it
            rep.note(f"removing incomplete {torn.name} (no trainer_state.json)")
            shutil.rmtree(torn, ignore_errors=True)
        rep.note(f"resuming from {resume_from}")
    elif config.resume:
        rep.note(f"no complete checkpoint in {output_dir}: starting from the base model")
        for torn in found:
            shutil.rmtree(torn, ignore_errors=True)
    elif found:
        raise ValueError(
            f"{output_dir} holds checkpoints of an earlier run (newest: {found[-1].name}): "
            "pass --resume to continue it, or delete them / choose another --out to start afresh"
        )

    if not recipe.use_cpu:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"recipe {recipe.name} trains on GPUs and none is visible: add --cpu (and --bf16 false: fp32) to run it here")

    cats = categories or default_categories()
    items = training_items(config, cats, rep)
    if not items:
        raise ValueError(f"no train items in {data}")
    rows = []
    for r, title, aspects in rep.track(items, len(items), "building rows"):
        image = str(r.image)  # decoded lazily by the dataset's Image feature (see build_dataset)
        category = cats.resolve(r.category)
        rows.append(sft_row(title, aspects, category, image))
        if config.lacu:
            turns = conversation_from_listing(title, aspects, category, r.qa)
            rows += qa_rows([(t.buyer, t.seller) for t in visual_rounds(turns)], image)
    if config.lacu:
        rep.note(f"{len(rows) - len(items):,} LACU Q&A rows beside {len(items):,} listing rows")
        random.Random(recipe.seed).shuffle(rows)  # TRL shuffles too; this keeps an item's rounds out of one batch
    rep.note("loading torch, transformers and TRL ...")
    from transformers import AutoProcessor, PrinterCallback, ProgressCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTTrainer

    hf_logging.disable_progress_bar()  # weight loading/saving bars: the reporter's lines say what happens

    _deepspeed_env(recipe.deepspeed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = recipe.planned_steps(len(rows), world)
    dataset = build_dataset(rows, rep)
    processor = AutoProcessor.from_pretrained(base_model)
    # Resuming without DeepSpeed, the weights come from the checkpoint through from_pretrained: transformers 5.19's
    # Trainer loads a checkpoint's state dict without Qwen2-VL's key mapping and silently keeps the base weights.
    own_load = resume_from is not None and recipe.deepspeed is None
    rep.note(f"loading the model from {resume_from if own_load else base_model} ...")
    model, trainable, frozen = load_model(resume_from if own_load else base_model, bool(recipe.bf16), recipe.freeze_vision)
    vision = None
    if recipe.vision_stage_steps > 0 and resume_from is None:  # a checkpoint already holds the trained tower
        vision = _vision_stage(model, processor, config, recipe, items, cats, rep)
    template = chat_template(recipe.prompt_style)
    if template is not None:  # saved with the processor: vLLM and TRL render the same compact prompt
        processor.chat_template = template
        processor.tokenizer.chat_template = template
    rep.note(f"parameters trained / frozen: {trainable:,} / {frozen:,}; {len(rows):,} rows -> {steps:,} steps")
    capped = recipe.max_steps > 0 or (recipe.step_cap is not None and steps == recipe.step_cap)
    # the config is TRL's SFTConfig: every TrainingArguments option given on the command line reaches the trainer
    args = dataclasses.replace(config, max_steps=steps if capped else -1, output_dir=str(output_dir), save_strategy="steps")
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {**run_record(config, recipe), "overridden": sorted(overridden), "rows": len(rows), "planned_steps": steps}
    (output_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")

    class Trainer(SFTTrainer):  # the only change: see own_load above
        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            if not own_load or model is not None:
                super()._load_from_checkpoint(resume_from_checkpoint, model)

    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(eta_callback(rep))
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    rep.note(f"saving the model folder into {output_dir} ...")
    settings = {k: {"value": v, "source": "option" if k in overridden else recipe.name} for k, v in recipe.values().items()}
    extra = {
        "items": str(len(items)),  # listings; with --lacu the rows are more (sft_run.json has them)
        "data": str(data),
        "sft_recipe": recipe.name,
        "sft_settings": json.dumps(settings, sort_keys=True),
        "prompt_style": recipe.prompt_style,
    }
    if vision is not None:
        extra["vision_stage"] = json.dumps(asdict(vision), sort_keys=True)
    card, log = save_model_folder(trainer, processor, base_model, output_dir, "sft", extra)
    for ckpt in checkpoints(output_dir):  # the final folder supersedes them
        shutil.rmtree(ckpt, ignore_errors=True)
    return SftResult(output_dir, card, log, len(items), trainable, frozen, recipe, resume_from)


def _vision_stage(
    model: Any,
    processor: Any,
    config: SftRunConfig,
    recipe: SftRecipe,
    items: list[tuple[ListingRecord, str, dict[str, str]]],
    cats: CategoryRegistry,
    rep: Reporter,
) -> VisionStageResult:
    """Run the recipe's vision stage on the training items; held-out accuracy on the data's validation split."""
    train = [LabelledImage(r.image, {"category": r.category, **aspects}) for r, _, aspects in items]
    val = [
        LabelledImage(r.image, {"category": r.category, **r.aspects})
        for r in load_abo(Path(str(config.data)), cats)
        if split_of(r) == "validation"
    ]
    stage = VisionStageConfig(steps=recipe.vision_stage_steps, seed=recipe.seed)
    rep.note(f"vision stage: {stage.steps} steps of {stage.batch_size} images (lr {stage.learning_rate:g}) on {len(train):,} items")
    result = run_vision_stage(model, processor, train, stage, rep, heldout=val)
    for h in result.heads:
        held = (
            "-"
            if h.heldout_accuracy is None
            else f"{h.heldout_accuracy:.3f} (commonest class {h.heldout_majority:.3f}, n={h.heldout_items})"
        )
        rep.note(f"vision stage head {h.name}: {h.classes} classes · train {h.train_accuracy:.3f} · validation {held}")
    return result


def build_dataset(rows: list[dict[str, Any]], reporter: Reporter) -> Any:
    """``datasets.Dataset`` of ``rows`` in their order; ``images`` hold file paths, decoded (PIL) when a batch is built.

    Storing paths instead of encoded pixels makes building the dataset instant (encoding 4k PIL images into Arrow
    took ~50 s) and keeps memory flat; the processor converts every image to RGB itself.
    """
    from datasets import Dataset, Image, List

    reporter.note(f"building the dataset ({len(rows):,} rows) ...")
    return Dataset.from_list(rows).cast_column("images", List(Image()))


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
    model's name, version ``<stage>-<sha256 of the weights, 12 hex>``, the base version, the step count, the
    base card's ``from_scratch`` and ``recipe`` (how this line of models trains) and ``extra``.
    """
    from transformers import Qwen2VLImageProcessor

    if out.resolve() == base_model.resolve():
        raise ValueError(f"refusing to overwrite the base model {base_model}: choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json"), *(out / n for n in STALE)]:
        stale.unlink(missing_ok=True)  # a previous run's shards or plots must not mix with this one
    trainer.save_model(str(out))
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the card and sft_run.json record every setting
    processor.save_pretrained(out)
    Qwen2VLImageProcessor.from_pretrained(base_model).save_pretrained(out)  # preprocessor_config.json for vLLM
    log = list(trainer.state.log_history)
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    base = read_card(base_model) or {"name": base_model.name, "version": "?"}
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
        **{k: str(base[k]) for k in INHERITED if k in base},
        **extra,
    }
    tmp = out / "opal_model.json.tmp"  # the card last and whole: its presence means "the folder is complete"
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(out / "opal_model.json")
    return card, log
