"""SFT recipes: every training hyper-parameter in one place, chosen by the base model.

A recipe is a TRL config file, ``training/configs/<name>.yaml``: its keys are fields of
:class:`training.trl_configs.SftRunConfig` (TRL's ``SFTConfig`` plus OPAL's), and ``opal train
sft`` hands the chosen one to TRL's parser as ``--config``, so precedence is TRL's own: options
on the command line > the config file > the dataclass defaults. The file's opening comment (up
to its first blank comment line) is the recipe's summary, printed at start; the rest of the
comment says where the numbers come from. Two recipes ship:

- ``tiny-cpu`` for the from-scratch tiny model ``opal model init-tiny`` builds: a vision stage,
  then SFT with the tower frozen and the compact prompt, lr 1e-3 (measured; ``docs/MODEL.md``).
- ``paper-zero3`` for a pretrained 7-8B backbone (Qwen2-VL-7B, InternVL2.5-8B) on 8xA100:
  the paper's SFT (full-parameter, frozen pretrained vision, bf16, DeepSpeed ZeRO-3,
  1 epoch, cosine schedule, 10% warm-up).

Contract
- :class:`SftRecipe` is the typed view of one file (and of a run's effective values,
  :meth:`training.trl_configs.SftRunConfig.effective_recipe`): one field per training value,
  under the name the table and the model card use; a field whose config key differs names it
  in its ``trl`` metadata (``batch_size`` is ``per_device_train_batch_size``). A recipe file
  holds exactly ``recipe`` (its own name, the file's stem) and each field's config key, with
  values of the field's type; :func:`load_recipe` refuses anything else (``ValueError``).
- ``deepspeed``: a bare file name names a DeepSpeed config shipped in ``training/configs/``
  (:func:`deepspeed_config`, also for ``--deepspeed``); ``none`` switches DeepSpeed off.
- :func:`choose_recipe` reads the base folder's ``opal_model.json``: a ``recipe`` field
  naming a known recipe wins; ``from_scratch: "true"`` or a ``tiny-`` version (cards written
  before the field existed) selects ``tiny-cpu``; a folder without a card (a downloaded
  backbone) or with a card naming neither gets ``paper-zero3``. An explicit name overrides all.
- :func:`recipe_rows` renders the effective values with their source (the recipe's name, or
  ``option`` for a value given on the command line or in the caller's own ``--config``) for
  the table and the model card.
- No torch, no TRL: the stream environment imports this module too (PyYAML is shared).
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).resolve().parent / "configs"
"""Where recipes (``*.yaml``) and the DeepSpeed configs they name (``*.json``) ship."""
ZERO3 = CONFIGS / "zero3.json"
CARD = "opal_model.json"
NOT_TRAINING = ("name", "summary")


def _trl(key: str, text: str) -> dict[str, Any]:
    return {"help": text, "trl": key}


@dataclass(frozen=True)
class SftRecipe:
    """How to run SFT for one kind of base model; every field documents itself (``trl``: its config key)."""

    name: str = field(metadata={"help": "Recipe name (printed at start, written into the model card)."})
    summary: str = field(metadata={"help": "What the recipe is for and where its numbers come from."})
    learning_rate: float = field(metadata={"help": "Peak learning rate."})
    lr_scheduler: str = field(default="cosine", metadata=_trl("lr_scheduler_type", "Schedule after warm-up (transformers name)."))
    warmup: float = field(default=0.1, metadata=_trl("warmup_steps", "Warm-up as a share of the optimiser steps (the paper: 10%)."))
    batch_size: int = field(default=8, metadata=_trl("per_device_train_batch_size", "Rows per device per forward pass."))
    grad_accumulation: int = field(
        default=1, metadata=_trl("gradient_accumulation_steps", "Forward passes accumulated per optimiser step.")
    )
    epochs: float = field(default=1.0, metadata=_trl("num_train_epochs", "Passes over the training rows."))
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

    @classmethod
    def from_config(cls, name: str, summary: str, config: Mapping[str, Any]) -> SftRecipe:
        """The recipe ``name`` with its training values read from ``config`` under their config keys (enums as their
        values, ``deepspeed`` through :func:`deepspeed_config`); ``KeyError`` for a missing key."""
        values: dict[str, Any] = {}
        for f in training_fields():
            v = config[config_key(f)]
            values[f.name] = getattr(v, "value", v)  # transformers' enums (lr_scheduler_type) as their plain value
        ds = deepspeed_config(values["deepspeed"])
        values["deepspeed"] = Path(ds) if isinstance(ds, str) else ds
        return cls(name=name, summary=summary, **values)

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
        for f in training_fields():
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out

    def config(self) -> dict[str, Any]:
        """The recipe as a TRL config mapping (what its file holds, ``deepspeed`` resolved): config key -> value."""
        return {"recipe": self.name, **{config_key(f): self.values()[f.name] for f in training_fields()}}


def training_fields() -> tuple[Field[Any], ...]:
    """The fields of :class:`SftRecipe` that are training values, in table order."""
    return tuple(f for f in fields(SftRecipe) if f.name not in NOT_TRAINING)


def config_key(f: Field[Any]) -> str:
    """The run config's (``SFTConfig``'s) name for recipe field ``f``."""
    return str(f.metadata.get("trl", f.name))


def deepspeed_config(value: Any) -> Any:
    """A ``deepspeed`` value as the trainer takes it: None for None, ``""`` or ``none``; a bare file name (no ``/``) of a
    config shipped in :data:`CONFIGS` -> its absolute path; anything else (a path, a JSON string, a dict) as given."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and "/" not in value and (CONFIGS / value).is_file():
        return str(CONFIGS / value)
    return value


def _summary(text: str) -> str:
    """The opening comment of a recipe file, up to its first blank comment line, as one line."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#") or not line.strip("# "):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def _type_ok(value: Any, hint: Any) -> bool:
    if get_origin(hint) in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Path:
        return isinstance(value, str)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def load_recipe(path: Path) -> SftRecipe:
    """Read and check one recipe file (see the module contract); ``ValueError`` naming the file and what is wrong."""
    text = path.read_text()
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of config keys")
    hints = get_type_hints(SftRecipe)
    expected = {config_key(f): f for f in training_fields()}
    if doc.get("recipe") != path.stem:
        raise ValueError(f"{path}: `recipe: {path.stem}` (the file's name) is missing or differs")
    unknown, missing = set(doc) - set(expected) - {"recipe"}, set(expected) - set(doc)
    if unknown or missing:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)} (one per SftRecipe field)")
    wrong = [f"{k}: {doc[k]!r}" for k, f in expected.items() if not _type_ok(doc[k], hints[f.name])]
    if wrong:
        raise ValueError(f"{path}: values of the wrong type: {', '.join(wrong)} (YAML floats need a dot: 1.0e-3)")
    summary = _summary(text)
    if not summary:
        raise ValueError(f"{path}: no opening comment (the recipe's summary)")
    return SftRecipe.from_config(path.stem, summary, doc)


def recipe_file(name: str) -> Path:
    """The file of the shipped recipe ``name``."""
    return CONFIGS / f"{name}.yaml"


RECIPES: dict[str, SftRecipe] = {r.name: r for r in map(load_recipe, sorted(CONFIGS.glob("*.yaml")))}
TINY_CPU = RECIPES["tiny-cpu"]
PAPER_ZERO3 = RECIPES["paper-zero3"]


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
