"""`opal experiment ...`: experiments over the whole pipeline (train, serve, evaluate), such as the paper's ablation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from opal.commands.common import console, fail, sigterm_as_interrupt
from schemas.errors import OpalError

app = typer.Typer(help="Experiments over the whole pipeline (train, serve, evaluate).", no_args_is_help=True)


@app.command("ablation")
def experiment_ablation(
    data: Annotated[Path, typer.Option(help="ABO-format folder (e.g. ../shared/data/abo): train split trains, test split is scored.")],
    out: Annotated[Path, typer.Option(help="Folder for models, pairs, evaluations and report.md/json + ablation.png; rerun to resume.")],
    base: Annotated[Path | None, typer.Option(help="Base model folder (default: a tiny model built into --out/base).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the tiny base and of the image swap.")] = 0,
    pairs_items: Annotated[int, typer.Option(min=1, help="Train items the + LACU model is judged on for DPO pairs.")] = 1000,
    dpo_epochs: Annotated[float, typer.Option(help="Passes over the DPO pairs.")] = 1.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight to vLLM.")] = 32,
) -> None:
    """The paper's ablation: majority, retrieval, untrained, SFT raw, SFT MACE, + LACU, + DPO, with the image-swap control.

    About an hour on 2 cores for ~4k training items. Every finished step is kept: rerun the same command to resume.
    """
    sigterm_as_interrupt()
    from opal.ablation import COLUMNS, GUARANTEED, LABELS, Ablation, AblationConfig, StepFailed, fmt
    from training.progress import Reporter

    config = AblationConfig(
        data=data, out=out, base=base, seed=seed, pairs_items=pairs_items, dpo_epochs=dpo_epochs, concurrency=concurrency
    )
    if not (data / "listings.jsonl").is_file():
        raise fail(f"{data} has no listings.jsonl (an ABO-format folder is needed)", highlight=False)
    try:
        report = Ablation(config, Reporter(console)).run()
    except (ValueError, OSError, OpalError, StepFailed) as e:
        raise fail(str(e), "\nfinished steps are kept: rerun the same command to continue", highlight=False) from None
    shown = [c for c in COLUMNS if c not in GUARANTEED]  # the guaranteed two are in report.md; one line here
    t = Table(title=f"ablation on {data.name}/test ({report['test_items']} items)")
    t.add_column("row", no_wrap=True)
    for c in shown:
        t.add_column(LABELS[c], justify="right", min_width=6)
    for r in report["rows"]:
        t.add_row(r["row"], *(fmt(r[c], signed=c.startswith("swap_")) for c in shown))
    console.print(t)
    lows = [min(float(r[c]) for r in report["rows"]) for c in GUARANTEED]
    console.print(f"JSON validity / schema recall: at least {lows[0]:.3f} / {lows[1]:.3f} in every row (guaranteed: constrained decoding)")
    console.print("wrote " + ", ".join(str(out / n) for n in ("report.md", "report.json", "ablation.png")), highlight=False)
