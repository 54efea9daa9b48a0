"""`opal train ...`: train OPAL models with TRL, SFT by recipe and DPO (re-run in the model environment)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from opal.commands.common import console, current_categories, exits_on, in_model_env

app = typer.Typer(help="Train OPAL models: SFT and DPO (runs in the model environment).", no_args_is_help=True)


PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command("sft", context_settings=PASS_THROUGH, add_help_option=False)
def train_sft(ctx: typer.Context) -> None:
    """Visual instruction tuning with TRL on MACE-refined listings, by a recipe the base model chooses (printed at start).

    Options are TRL's SFTConfig (every TrainingArguments option: --deepspeed, --save_steps, --lr_scheduler_type, ...)
    plus OPAL's (--base, --data, --out, --mace, --limit, --no-refine, --lacu, --recipe, --resume, --vision_stage_steps,
    --prompt_style ...), parsed by TRL's parser; `opal train sft --help` lists them all. Options left out take the
    recipe's value. Writes the model, train_log.json and loss.png; checkpoints every --save_steps into --out while
    training (removed once the model is written); --resume continues a stopped run.
    """
    in_model_env(sys.argv[1:])
    from opal.plots import line_png
    from training.progress import Reporter
    from training.recipes import recipe_rows
    from training.sft import run_sft
    from training.trl_configs import parse_sft_args

    reporter = Reporter(console)
    with exits_on(ValueError):
        config, why, overridden = parse_sft_args(ctx.args)
    effective = config.effective_recipe()
    t = Table("setting", "value", "from", title=f"SFT recipe {effective.name} ({why})")
    for name, value, source in recipe_rows(effective, overridden):
        t.add_row(name, value, "[bold]option[/]" if source == "option" else source)
    console.print(t)
    console.print(effective.summary, highlight=False)
    with exits_on(ValueError, OSError):
        result = run_sft(config, categories=current_categories(), reporter=reporter, overridden=overridden)
    out, base = Path(str(config.output_dir)), Path(str(config.base_model))
    losses = result.losses()
    png = line_png({"training loss": losses}, out / "loss.png", f"SFT of {base.name}: {result.items} items") if losses else None
    t = Table("field", "value", title=f"SFT -> {out}")
    t.add_row("model", f"{result.card['name']}@{result.card['version']}")
    t.add_row("recipe", result.recipe.name + (f" (+ {', '.join(sorted(overridden))})" if overridden else ""))
    t.add_row("items", str(result.items))
    t.add_row("steps", result.card["steps"] + (f" (resumed from {result.resumed_from.name})" if result.resumed_from else ""))
    t.add_row("parameters trained / frozen", f"{result.trainable:,} / {result.frozen:,}")
    t.add_row("time", f"{reporter.elapsed():.0f} s")
    if losses:
        t.add_row("loss first -> last logged", f"{losses[0][1]:.3f} -> {losses[-1][1]:.3f}")
    console.print(t)
    if png:
        console.print(f"loss curve: {png}", highlight=False)


@app.command("dpo", context_settings=PASS_THROUGH, add_help_option=False)
def train_dpo(ctx: typer.Context) -> None:
    """Sigmoid DPO with TRL against a frozen reference copy; writes the model, train_log.json and dpo.png (loss, margins).

    Options are TRL's DPOConfig (every TrainingArguments option) plus --base, --pairs, --out and --freeze_vision,
    parsed by TRL's parser; `opal train dpo --help` lists them all. OPAL's defaults: lr 1e-5 (higher collapsed the
    tiny model), batch 2, 1 epoch, cosine with 10% warm-up, on CPU (--no_use_cpu on GPUs).
    """
    in_model_env(sys.argv[1:])
    from opal.plots import line_png
    from training.dpo import run_dpo
    from training.sft import logged
    from training.trl_configs import parse_dpo_args

    with exits_on(ValueError):
        config = parse_dpo_args(ctx.args)
    with exits_on(ValueError, OSError):
        result = run_dpo(config, current_categories())
    out, base = Path(str(config.output_dir)), Path(str(config.base_model))
    margins = result.margins()
    losses = logged(result.log, "loss")
    png = (
        line_png({"loss": losses, "reward margin": margins}, out / "dpo.png", f"DPO of {base.name}: {result.pairs} pairs")
        if losses
        else None
    )
    t = Table("field", "value", title=f"DPO -> {out}")
    t.add_row("model", f"{result.card['name']}@{result.card['version']}")
    t.add_row("pairs used / skipped", f"{result.pairs} / {result.skipped}")
    t.add_row("steps", result.card["steps"])
    if margins:
        t.add_row("reward margin first -> last logged", f"{margins[0][1]:.4f} -> {margins[-1][1]:.4f}")
    console.print(t)
    if png:
        console.print(f"curves: {png}", highlight=False)
