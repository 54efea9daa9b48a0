"""`opal train ...`: train OPAL models with TRL, SFT by recipe and DPO (re-run in the model environment)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from opal.commands.common import console, exits_on, in_model_env

app = typer.Typer(help="Train OPAL models: SFT and DPO (runs in the model environment).", no_args_is_help=True)


@app.command("sft")
def train_sft(
    base: Annotated[Path, typer.Option(help="Model folder to start from (`opal model init-tiny` output or a Qwen2-VL).")],
    data: Annotated[Path, typer.Option(help="ABO-format folder (e.g. ../shared/data/abo); its train split is used.")],
    out: Annotated[Path, typer.Option(help="Folder for the trained model (overwritten) and its checkpoints; vLLM serves it as is.")],
    recipe: Annotated[str | None, typer.Option(help="Recipe: tiny-cpu or paper-zero3 (default: chosen by the base's model card).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --out (same settings).")] = False,
    mace: Annotated[Path | None, typer.Option(help="`opal data mace` JSONL: train on its MLLM-refined listings.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many items.")] = None,
    refine: Annotated[bool, typer.Option(help="MACE-refine the listings (--no-refine: raw catalogue titles, the ablation's base).")] = True,
    lacu: Annotated[bool, typer.Option(help="Add LACU buyer/seller Q&A rows (one per round, with the photo).")] = False,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data. [default: recipe]")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Exactly this many steps, overriding epochs. [default: recipe]")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Rows per device per step. [default: recipe]")] = None,
    grad_accumulation: Annotated[int | None, typer.Option(min=1, help="Steps accumulated per update. [default: recipe]")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (cosine, warm-up). [default: recipe]")] = None,
    save_steps: Annotated[int | None, typer.Option(min=1, help="Checkpoint every this many steps. [default: recipe]")] = None,
    logging_steps: Annotated[int | None, typer.Option(min=1, help="Log loss and ETA every this many steps. [default: recipe]")] = None,
    deepspeed: Annotated[Path | None, typer.Option(help="DeepSpeed JSON config, or 'none'. [default: recipe]")] = None,
    freeze_vision: Annotated[bool | None, typer.Option(help="Freeze the vision encoder. [default: recipe]")] = None,
    vision_stage_steps: Annotated[
        int | None, typer.Option(min=0, help="Vision-stage steps before SFT (0: none). [default: recipe]")
    ] = None,
    prompt_style: Annotated[str | None, typer.Option(help="full or compact (the model's chat template). [default: recipe]")] = None,
    bf16: Annotated[bool | None, typer.Option(help="bf16 mixed precision (GPU: use with --no-cpu). [default: recipe]")] = None,
    cpu: Annotated[bool | None, typer.Option(help="Train on CPU even if a GPU is visible. [default: recipe]")] = None,
) -> None:
    """Visual instruction tuning with TRL on MACE-refined listings, by a recipe the base model chooses (printed at start).

    Options left out take the recipe's value. Writes the model, train_log.json and loss.png; checkpoints every
    --save-steps into --out while training (removed once the model is written); --resume continues a stopped run.
    """
    in_model_env(sys.argv[1:])
    from dataclasses import replace

    from opal.plots import line_png
    from training.progress import Reporter
    from training.recipes import apply_overrides, choose_recipe, recipe_rows
    from training.sft import SftRunConfig, run_sft

    reporter = Reporter(console)
    no_deepspeed = deepspeed is not None and str(deepspeed).lower() == "none"
    overrides: dict[str, Any] = {
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "grad_accumulation": grad_accumulation,
        "learning_rate": lr,
        "save_steps": save_steps,
        "logging_steps": logging_steps,
        "deepspeed": None if no_deepspeed else deepspeed,
        "freeze_vision": freeze_vision,
        "vision_stage_steps": vision_stage_steps,
        "prompt_style": prompt_style,
        "bf16": bf16,
        "use_cpu": cpu,
    }
    with exits_on(ValueError):
        chosen, why = choose_recipe(base, recipe)
        effective, overridden = apply_overrides(chosen, overrides)
        if no_deepspeed:  # --deepspeed none switches the recipe's DeepSpeed off
            effective, overridden = replace(effective, deepspeed=None), overridden | {"deepspeed"}
    t = Table("setting", "value", "from", title=f"SFT recipe {effective.name} ({why})")
    for name, value, source in recipe_rows(effective, overridden):
        t.add_row(name, value, "[bold]option[/]" if source == "option" else source)
    console.print(t)
    console.print(effective.summary, highlight=False)
    config = SftRunConfig(
        base_model=base,
        data=data,
        output_dir=out,
        mace=mace,
        limit=limit,
        refine=refine,
        lacu=lacu,
        recipe=effective,
        overridden=overridden,
        resume=resume,
    )
    with exits_on(ValueError, OSError):
        result = run_sft(config, reporter=reporter)
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


@app.command("dpo")
def train_dpo(
    base: Annotated[Path, typer.Option(help="Model to tune (normally the SFT output); also the frozen reference.")],
    pairs: Annotated[Path, typer.Option(help="PreferencePair JSONL (`opal data pairs`).")],
    out: Annotated[Path, typer.Option(help="Folder for the tuned model (overwritten); vLLM serves it as is.")],
    beta: Annotated[float, typer.Option(help="DPO beta.")] = 0.1,
    epochs: Annotated[float, typer.Option(help="Passes over the pairs.")] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (-1: run the epochs).")] = -1,
    batch_size: Annotated[int, typer.Option(min=1, help="Pairs per step.")] = 2,
    lr: Annotated[float, typer.Option(help="Peak learning rate (1e-5: higher collapsed the tiny model).")] = 1e-5,
    cpu: Annotated[bool, typer.Option(help="Train on CPU even if a GPU is visible.")] = True,
    bf16: Annotated[bool, typer.Option(help="bf16 mixed precision (GPU: use with --no-cpu).")] = False,
) -> None:
    """Sigmoid DPO with TRL against a frozen reference copy; writes the model, train_log.json and dpo.png (loss, margins)."""
    in_model_env(sys.argv[1:])
    from opal.plots import line_png
    from training.dpo import DpoRunConfig, run_dpo
    from training.sft import logged

    config = DpoRunConfig(
        base_model=base,
        pairs=pairs,
        output_dir=out,
        beta=beta,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=lr,
        use_cpu=cpu,
        bf16=bf16,
    )
    with exits_on(ValueError, OSError):
        result = run_dpo(config)
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
