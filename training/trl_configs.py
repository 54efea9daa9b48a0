"""TRL-native run configs: ``SftRunConfig`` is TRL's ``SFTConfig``, ``DpoRunConfig`` is ``DPOConfig`` (model side only).

Both subclass TRL's configs (as ``DPOConfig`` subclasses transformers' ``TrainingArguments``),
so every TrainingArguments option (DeepSpeed, checkpointing, logging, schedulers, ...) is
an option of ``opal train sft`` / ``opal train dpo``, parsed by TRL's own parser
(:class:`trl.TrlParser`: ``--name value`` or ``--name-with-dashes value``, booleans as
``--flag`` / ``--flag false`` / ``--no_flag``, and ``--config run.yaml``). OPAL adds the
fields an OPAL run needs (base model, data, MACE/LACU choices, the vision stage, the prompt
style) and a few short aliases (``--base``, ``--out``, ``--lr``, ``--epochs``,
``--batch-size``, ``--grad-accumulation``, ``--cpu``). ``opal train sft --help`` prints every
option with its help.

Contract of :func:`parse_sft_args`
- The base model's card chooses a recipe (:func:`training.recipes.choose_recipe`; ``--recipe``
  forces one): a TRL config file that TRL's parser reads as ``--config``, so options on the
  command line > the config file > the dataclass defaults, TRL's precedence and nothing of
  OPAL's. A ``--config FILE`` of the caller's own is laid over the recipe (its keys win over
  the recipe's, the options over both) and the two go to the parser as one file.
- Which recipe values an option (or the caller's file) set is found with public API only:
  TRL's ``set_defaults_with_config`` puts a marker into every default and argparse's
  ``parse_known_args`` leaves it where nothing was given. Those values are marked ``option``
  in the table and the model card (:func:`training.recipes.recipe_rows`).
- ``--deepspeed`` takes a path, the bare name of a config in ``training/configs/`` or ``none``
  (:func:`training.recipes.deepspeed_config`, applied by both configs before transformers
  loads it).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from trl import DPOConfig, SFTConfig, TrlParser

from inference.prompt import PROMPT_STYLES
from training.recipes import RECIPES, SftRecipe, choose_recipe, config_key, deepspeed_config, recipe_file, training_fields


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

    def __post_init__(self) -> None:
        self.deepspeed = deepspeed_config(self.deepspeed)  # a shipped config's bare name, or none, before it is loaded
        super().__post_init__()

    def effective_recipe(self) -> SftRecipe:
        """The recipe named by :attr:`recipe` with this run's values (what the table shows and the card records);
        ``ValueError`` when the config names no known recipe (it did not come from :func:`parse_sft_args`)."""
        if self.recipe not in RECIPES:
            raise ValueError(f"the SFT config names no known recipe ({self.recipe!r}): build it with parse_sft_args")
        base = RECIPES[self.recipe]
        values = {config_key(f): getattr(self, config_key(f)) for f in training_fields()}
        return SftRecipe.from_config(base.name, base.summary, values)


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

    def __post_init__(self) -> None:
        self.deepspeed = deepspeed_config(self.deepspeed)  # as in SftRunConfig
        super().__post_init__()


class _Unset:
    """The marker default of :func:`_given`: no option's value is this."""


_UNSET = _Unset()


def _sft_parser() -> TrlParser:
    return TrlParser((SftRunConfig,), prog="opal train sft", allow_abbrev=False)


def _given(argv: Sequence[str]) -> dict[str, Any]:
    """Field -> value of every option given in ``argv`` (``--config`` removed): a parser whose defaults are all a marker
    (TRL's public ``set_defaults_with_config``) parses ``argv`` into a namespace (argparse's ``parse_known_args``;
    no dataclass is built); the fields still holding the marker were not given."""
    parser = _sft_parser()
    parser.set_defaults_with_config(**{f.name: _UNSET for f in dataclasses.fields(SftRunConfig) if f.init})
    namespace, _ = parser.parse_known_args(list(argv))
    return {k: v for k, v in vars(namespace).items() if v is not _UNSET}


def _pop_config(argv: list[str]) -> dict[str, Any]:
    """Remove ``--config FILE`` from ``argv`` (as TRL's parser does) and return the file's mapping ({} without one)."""
    if "--config" not in argv:
        return {}
    i = argv.index("--config")
    if i + 1 >= len(argv):
        raise ValueError("--config needs a YAML file")
    path = argv.pop(i + 1)
    del argv[i]
    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a --config file is a YAML mapping")
    return doc


@contextmanager
def _config_file(recipe: SftRecipe, own: dict[str, Any]) -> Iterator[Path]:
    """The file TRL's parser reads as ``--config``: the recipe's, or a copy with the caller's ``own`` keys laid over it."""
    if not own:
        yield recipe_file(recipe.name)
        return
    with tempfile.TemporaryDirectory(prefix="opal-sft-config-") as d:
        path = Path(d) / "config.yaml"
        path.write_text(yaml.safe_dump({**recipe.config(), **own}, sort_keys=False))
        yield path


def parse_sft_args(argv: Sequence[str]) -> tuple[SftRunConfig, str, frozenset[str]]:
    """(config, why its recipe was chosen, the recipe fields an option set) for ``opal train sft`` arguments, parsed by
    TRL's parser over the recipe's file (see the module contract). ``--help`` prints every option and exits.

    ``ValueError`` for a missing --base, --data or --out, an unknown recipe or prompt style, or a GPU recipe on a
    machine without one.
    """
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        _sft_parser().parse_args_and_config(args=argv)  # prints the help and exits
    own = _pop_config(argv)
    given = {**own, **_given(argv)}
    if not given.get("base_model") or not given.get("data") or not given.get("output_dir"):
        raise ValueError("opal train sft needs --base, --data and --out (see --help)")
    recipe, why = choose_recipe(Path(str(given["base_model"])), given.get("recipe"))
    if not given.get("use_cpu", recipe.use_cpu):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"recipe {recipe.name} trains on GPUs and none is visible: add --cpu (and --bf16 false: fp32) to run it here")
    with _config_file(recipe, own) as config:
        (parsed,) = _sft_parser().parse_args_and_config(args=[*argv, "--config", str(config)])
    if parsed.prompt_style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {parsed.prompt_style!r}; known: {', '.join(PROMPT_STYLES)}")
    overridden = frozenset(f.name for f in training_fields() if config_key(f) in given)
    return parsed, why, overridden


def parse_dpo_args(argv: Sequence[str]) -> DpoRunConfig:
    """Parse ``opal train dpo`` arguments with TRL's parser; ``ValueError`` without --base, --pairs or --out."""
    (config,) = TrlParser((DpoRunConfig,), prog="opal train dpo", allow_abbrev=False).parse_args_and_config(args=list(argv))
    if not config.base_model or not config.pairs or not config.output_dir:
        raise ValueError("opal train dpo needs --base, --pairs and --out (see --help)")
    return config
