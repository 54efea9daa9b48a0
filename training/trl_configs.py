"""TRL-native run configs: ``SftRunConfig`` is TRL's ``SFTConfig``, ``DpoRunConfig`` is ``DPOConfig`` (model side only).

Both subclass TRL's configs (as ``DPOConfig`` subclasses transformers' ``TrainingArguments``),
so every TrainingArguments option (DeepSpeed, checkpointing, logging, schedulers, ...) is
an option of ``opal train sft`` / ``opal train dpo``, parsed by TRL's own parser
(:class:`trl.TrlParser`: ``--name value`` or ``--name-with-dashes value``, booleans as
``--flag`` / ``--flag false`` / ``--no_flag``, and ``--config run.yaml``). OPAL adds the
fields an OPAL run needs (base model, data, MACE/LACU choices, the vision stage, the prompt
style) and a few short aliases (``--base``, ``--out``, ``--lr``, ``--epochs``,
``--batch-size``, ``--grad-accumulation``, ``--cpu``).

SFT recipes (:mod:`training.recipes`) stay the defaults a base model chooses: after
parsing, every recipe value the command line (or YAML) did not set explicitly is taken
from the recipe; :func:`parse_sft_args` returns which were set explicitly, for the table
and the model card. ``opal train sft --help`` prints every option with its help.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from trl import DPOConfig, SFTConfig, TrlParser

from inference.prompt import PROMPT_STYLES
from training.recipes import RECIPES, SftRecipe, choose_recipe

# SftRecipe field -> SftRunConfig (TrainingArguments/SFTConfig) field
RECIPE_FIELDS: dict[str, str] = {
    "learning_rate": "learning_rate",
    "lr_scheduler": "lr_scheduler_type",
    "warmup": "warmup_steps",
    "batch_size": "per_device_train_batch_size",
    "grad_accumulation": "gradient_accumulation_steps",
    "epochs": "num_train_epochs",
    "max_steps": "max_steps",
    "step_cap": "step_cap",
    "max_length": "max_length",
    "bf16": "bf16",
    "use_cpu": "use_cpu",
    "gradient_checkpointing": "gradient_checkpointing",
    "deepspeed": "deepspeed",
    "freeze_vision": "freeze_vision",
    "vision_stage_steps": "vision_stage_steps",
    "prompt_style": "prompt_style",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "logging_steps": "logging_steps",
    "seed": "seed",
}


def _help(text: str, *aliases: str) -> dict[str, Any]:
    return {"help": text, "aliases": list(aliases)} if aliases else {"help": text}


@dataclass
class SftRunConfig(SFTConfig):
    """One SFT run: TRL's SFTConfig plus what OPAL trains on; unset recipe values come from the base's recipe."""

    base_model: str | None = field(default=None, metadata=_help("Model folder to start from (init-tiny output or a Qwen2-VL).", "--base"))
    data: str | None = field(default=None, metadata=_help("ABO-format folder (listings.jsonl + images/); its train split is used."))
    mace: str | None = field(default=None, metadata=_help("`opal data mace` JSONL: train on its MLLM-refined listings."))
    limit: int | None = field(default=None, metadata=_help("Train on at most this many items (first by item id)."))
    refine: bool = field(default=True, metadata=_help("MACE-refine the listings; --no-refine trains on raw catalogue titles."))
    lacu: bool = field(default=False, metadata=_help("Add LACU buyer/seller Q&A rows (one per round, with the photo)."))
    recipe: str | None = field(default=None, metadata=_help(f"Recipe: {' or '.join(RECIPES)} (default: the base's card chooses)."))
    resume: bool = field(default=False, metadata=_help("Continue from the newest checkpoint in the output folder (same settings)."))
    freeze_vision: bool = field(default=True, metadata=_help("Freeze the vision encoder (the paper freezes a pretrained one)."))
    vision_stage_steps: int = field(default=0, metadata=_help("Vision-stage steps before SFT (training/vision_stage.py); 0: none."))
    prompt_style: str = field(default="full", metadata=_help(f"Prompt style: {' or '.join(PROMPT_STYLES)} (inference/prompt.py)."))
    step_cap: int | None = field(default=None, metadata=_help("When running by epochs, at most this many steps (a time budget)."))
    # TrainingArguments fields with OPAL's aliases or defaults
    output_dir: str | None = field(default=None, metadata=_help("Folder for the trained model and its checkpoints (overwritten).", "--out"))
    learning_rate: float = field(default=2e-5, metadata=_help("Peak learning rate.", "--lr"))
    num_train_epochs: float = field(default=1.0, metadata=_help("Passes over the data.", "--epochs"))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Rows per device per forward pass.", "--batch-size"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Forward passes per optimiser step.", "--grad-accumulation"))
    use_cpu: bool = field(default=False, metadata=_help("Train on CPU even if a GPU is visible.", "--cpu"))
    bf16: bool | None = field(default=False, metadata=_help("bf16 mixed precision (GPU); false trains in fp32."))
    logging_first_step: bool = field(default=True, metadata=_help("Log the first step too."))
    disable_tqdm: bool | None = field(default=True, metadata=_help("OPAL reports progress itself (loss, ETA)."))
    report_to: None | str | list[str] = field(  # noqa: RUF036 (the order TRL's parser expects, as in TrainingArguments)
        default="none", metadata=_help("Experiment trackers (none: the card keeps the log).")
    )

    def recipe_values(self) -> dict[str, Any]:
        """The recipe's fields (:class:`SftRecipe` names) with this run's values (enums as their plain values)."""
        values = {name: getattr(self, attr) for name, attr in RECIPE_FIELDS.items()}
        return {k: v.value if isinstance(v, Enum) else v for k, v in values.items()}

    def effective_recipe(self) -> SftRecipe:
        """The recipe named by :attr:`recipe` with this run's values (what the card records)."""
        base = RECIPES[self.recipe] if self.recipe in RECIPES else RECIPES["tiny-cpu"]
        values = self.recipe_values()
        values["deepspeed"] = Path(values["deepspeed"]) if values["deepspeed"] else None
        return dataclasses.replace(base, **values)


@dataclass
class DpoRunConfig(DPOConfig):
    """One DPO run: TRL's DPOConfig (sigmoid loss, cosine, 10% warm-up) plus the base model and the pairs."""

    base_model: str | None = field(
        default=None, metadata=_help("Model to tune (normally the SFT output); also the frozen reference.", "--base")
    )
    pairs: str | None = field(default=None, metadata=_help("PreferencePair JSONL (`opal data pairs`, or the preferences topic's shards)."))
    freeze_vision: bool = field(default=True, metadata=_help("Freeze the vision encoder, as in SFT."))
    output_dir: str | None = field(default=None, metadata=_help("Where the tuned model folder is written (overwritten).", "--out"))
    learning_rate: float = field(default=1e-5, metadata=_help("Peak learning rate (higher collapsed the tiny model).", "--lr"))
    num_train_epochs: float = field(default=1.0, metadata=_help("Passes over the pairs.", "--epochs"))
    per_device_train_batch_size: int = field(default=2, metadata=_help("Pairs per device per step.", "--batch-size"))
    use_cpu: bool = field(default=True, metadata=_help("Train on CPU even if a GPU is visible (--no_use_cpu on GPUs).", "--cpu"))
    bf16: bool | None = field(default=False, metadata=_help("bf16 mixed precision (GPU); false trains in fp32."))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("Schedule after warm-up."))
    warmup_steps: float = field(default=0.1, metadata=_help("Warm-up steps; below 1: a share of the steps."))
    logging_steps: float = field(default=2, metadata=_help("Log loss and reward margins every this many steps."))
    save_strategy: str = field(default="no", metadata=_help("The final folder is the result; no checkpoints by default."))
    max_length: int | None = field(default=None, metadata=_help("Token limit per row; None: no truncation (it would cut image tokens)."))
    seed: int = field(default=0, metadata=_help("Seed for data order."))
    disable_tqdm: bool | None = field(default=True, metadata=_help("OPAL reports what it did."))
    report_to: None | str | list[str] = field(  # noqa: RUF036 (the order TRL's parser expects, as in TrainingArguments)
        default="none", metadata=_help("Experiment trackers.")
    )


def _explicit(parser: TrlParser, argv: Sequence[str]) -> set[str]:
    """Destinations set on the command line (``--name``, ``--name=value``, aliases, ``--no_name``)."""
    actions = parser._option_string_actions
    given = set()
    for token in argv:
        if token.startswith("--"):
            action = actions.get(token.split("=", 1)[0])
            if action is not None:
                given.add(action.dest)
    return given


def _yaml_keys(argv: Sequence[str]) -> set[str]:
    if "--config" not in argv:
        return set()
    import yaml

    path = argv[list(argv).index("--config") + 1]
    with open(path) as f:
        doc = yaml.safe_load(f)
    return set(doc) if isinstance(doc, dict) else set()


def with_recipe(config: SftRunConfig, explicit: set[str] | None = None) -> tuple[SftRunConfig, str, frozenset[str]]:
    """(config with the recipe's values where not ``explicit``, why the recipe was chosen, recipe fields set explicitly).

    ``explicit`` None (programmatic use): a field counts as explicit when it differs from the class default.
    Raises ``ValueError`` for a missing base model or data, or an unknown recipe or prompt style.
    """
    if not config.base_model or not config.data or not config.output_dir:
        raise ValueError("opal train sft needs --base, --data and --out (see --help)")
    if explicit is None:
        defaults = {f.name: f.default for f in dataclasses.fields(SftRunConfig)}
        explicit = {attr for attr in RECIPE_FIELDS.values() if getattr(config, attr) != defaults.get(attr)}
    recipe, why = choose_recipe(Path(config.base_model), config.recipe)
    take = {attr: getattr(recipe, name) for name, attr in RECIPE_FIELDS.items() if attr not in explicit}
    if "deepspeed" in take:
        take["deepspeed"] = str(take["deepspeed"]) if take["deepspeed"] else None
    use_cpu = take.get("use_cpu", config.use_cpu)
    if not use_cpu:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"recipe {recipe.name} trains on GPUs and none is visible: add --cpu (and --bf16 false: fp32) to run it here")
    resolved = dataclasses.replace(config, recipe=recipe.name, **take)
    if resolved.prompt_style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {resolved.prompt_style!r}; known: {', '.join(PROMPT_STYLES)}")
    overridden = frozenset(name for name, attr in RECIPE_FIELDS.items() if attr in explicit)
    return resolved, why, overridden


def parse_sft_args(argv: Sequence[str]) -> tuple[SftRunConfig, str, frozenset[str]]:
    """Parse ``opal train sft`` arguments with TRL's parser and fill the rest from the recipe (:func:`with_recipe`).
    ``--help`` prints every option and exits."""
    argv = list(argv)
    no_deepspeed = _drop_deepspeed_none(argv)  # `--deepspeed none`: switch the recipe's DeepSpeed off
    parser = TrlParser((SftRunConfig,), prog="opal train sft", allow_abbrev=False)  # exact names: _explicit matches them
    (config,) = parser.parse_args_and_config(args=argv)
    return with_recipe(config, _explicit(parser, argv) | _yaml_keys(argv) | ({"deepspeed"} if no_deepspeed else set()))


def _drop_deepspeed_none(argv: list[str]) -> bool:
    """Remove ``--deepspeed none`` / ``--deepspeed=none`` from ``argv`` (TrainingArguments would try to load it)."""
    for i, token in enumerate(argv):
        if token.lower() == "--deepspeed=none" or (token == "--deepspeed" and i + 1 < len(argv) and argv[i + 1].lower() == "none"):
            del argv[i : i + (1 if "=" in token else 2)]
            return True
    return False


def parse_dpo_args(argv: Sequence[str]) -> DpoRunConfig:
    """Parse ``opal train dpo`` arguments with TRL's parser; ``ValueError`` without --base, --pairs or --out."""
    (config,) = TrlParser((DpoRunConfig,), prog="opal train dpo", allow_abbrev=False).parse_args_and_config(args=list(argv))
    if not config.base_model or not config.pairs or not config.output_dir:
        raise ValueError("opal train dpo needs --base, --pairs and --out (see --help)")
    return config
