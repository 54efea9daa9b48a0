"""`opal model ...`: build OPAL model folders (a tiny random-weight Qwen2-VL) and write model cards."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from opal.commands.common import console, exits_on, in_model_env
from schemas.settings import OpalSettings

if TYPE_CHECKING:
    from training.registry import ModelRegistry

app = typer.Typer(help="Model folders: build the tiny model, write cards, register, promote and roll back versions.", no_args_is_help=True)


@app.command("init-tiny")
def model_init_tiny(
    out: Annotated[Path, typer.Option(help="Folder to write the model into.")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives byte-identical files.")] = 0,
) -> None:
    """Build a tiny random-weight Qwen2-VL (tokenizer, processor, weights) with no downloads."""
    in_model_env(["model", "init-tiny", "--out", str(out), "--seed", str(seed)])
    from training.tiny_model import TinyModelConfig, build_tiny_model

    with console.status("building tiny Qwen2-VL ..."):
        card = build_tiny_model(out, TinyModelConfig(seed=seed))
    t = Table("field", "value", title=f"model in {out}")
    for k in ("name", "version", "parameters"):
        t.add_row(k, card[k])
    console.print(t)


@app.command("card")
def model_card(
    model: Annotated[Path, typer.Option(help="Trained model folder (opal_model.json).")],
    eval_dir: Annotated[Path, typer.Option("--eval", help="`opal eval run --out` folder of an evaluation of this model.")],
    reproduce: Annotated[str, typer.Option(help="The command that rebuilds the model (shown in the card).")] = "make demo-model",
) -> None:
    """Write the model card: test metrics into opal_model.json and README.md (data, attribution, recipe, evaluation)."""
    from opal.model_card import write_card

    with exits_on(ValueError, OSError, KeyError, highlight=False):
        card = write_card(model, eval_dir, reproduce)
    console.print(f"wrote {model / 'README.md'} and test_metrics into {model / 'opal_model.json'} ({card['version']})", highlight=False)


def _registry() -> tuple[ModelRegistry, str]:
    from training.registry import ModelRegistry

    s = OpalSettings()
    return ModelRegistry(s.models.registry), s.models.deployment


@app.command("register")
def model_register(
    model: Annotated[Path, typer.Argument(help="Model folder with opal_model.json (an `opal train` output).")],
    note: Annotated[str, typer.Option(help="Why this version exists (kept in its manifest).")] = "",
    promote: Annotated[bool, typer.Option(help="Also make it the deployment's current version.")] = False,
) -> None:
    """Copy MODEL into the registry (OPAL_MODELS_REGISTRY) under its card's version, with a manifest of file hashes."""
    reg, deployment = _registry()
    with exits_on(ValueError, OSError, highlight=False):
        entry = reg.register(model, note=note)
        moved = reg.promote(entry.version, deployment, reason=note or "registered with --promote") if promote else False
    console.print(f"registered {entry.served_name} at {entry.path}" + (f"; now current for {deployment}" if moved else ""), highlight=False)


@app.command("list")
def model_list() -> None:
    """The registered versions, the deployment's current one, and its history."""
    reg, deployment = _registry()
    current = reg.state(deployment).get("current")
    t = Table("", "version", "name", "registered", "note", title=f"models in {reg.root} (deployment {deployment})")
    for v in reg.versions():
        e = reg.get(v)
        t.add_row("*" if v == current else "", v, e.name, str(e.manifest.get("registered_at", "")), str(e.manifest.get("note", "")))
    console.print(t)
    h = Table("at", "action", "version", "reason", title=f"history of {deployment}")
    for entry in reg.history(deployment):
        h.add_row(entry["at"], entry["action"], entry["version"], entry.get("reason", ""))
    console.print(h)


@app.command("promote")
def model_promote(
    version: Annotated[str, typer.Argument(help="A registered version (see `opal model list`).")],
    reason: Annotated[str, typer.Option(help="Recorded in the deployment's history.")] = "",
) -> None:
    """Make VERSION the deployment's current version (atomic pointer; `opal serve` without --model serves it)."""
    reg, deployment = _registry()
    with exits_on(ValueError, highlight=False):
        moved = reg.promote(version, deployment, reason=reason or "promoted by hand")
    console.print(f"{deployment}: {version} " + ("is now current" if moved else "was already current"), highlight=False)


@app.command("rollback")
def model_rollback(reason: Annotated[str, typer.Option(help="Recorded in the deployment's history.")] = "") -> None:
    """Point the deployment back at the version that was current before the current one."""
    reg, deployment = _registry()
    with exits_on(ValueError, highlight=False):
        version = reg.rollback(deployment, reason=reason)
    console.print(f"{deployment}: rolled back to {version}", highlight=False)
