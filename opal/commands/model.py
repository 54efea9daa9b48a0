"""`opal model ...`: build OPAL model folders (a tiny random-weight Qwen2-VL) and write model cards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from opal.commands.common import console, exits_on, in_model_env

app = typer.Typer(help="Build OPAL model folders (runs in the model environment).", no_args_is_help=True)


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
