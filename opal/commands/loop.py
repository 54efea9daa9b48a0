"""`opal loop ...`: improvement rounds over the model registry (DPO on the judge's pairs, evaluation gate, promotion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from opal.commands.common import console, exits_on
from schemas.settings import OpalSettings

app = typer.Typer(help="Close the loop: judge pairs -> DPO -> evaluation gate -> promotion.", no_args_is_help=True)


@app.command("round")
def loop_round(
    data: Annotated[Path, typer.Option(help="ABO-format folder of the frozen evaluation set (the same every round).")],
    shards: Annotated[Path, typer.Option(help="The preference builder's folder of pairs-<version>.jsonl.")] = Path(
        ".opal/data/preferences"
    ),
    out: Annotated[Path, typer.Option(help="Folder for round folders (pairs, candidate, reports) and evaluations.")] = Path(".opal/rounds"),
    split: Annotated[str, typer.Option(help="Evaluation split of --data.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most this many items (faster, noisier gate).")] = None,
    min_pairs: Annotated[int, typer.Option(min=1, help="Fewer new pairs than this: no round.")] = 20,
    tolerance: Annotated[float, typer.Option(min=0.0, help="Largest fall of a headline metric the gate accepts.")] = 0.01,
    dpo_epochs: Annotated[float, typer.Option(help="DPO passes over the pairs.")] = 1.0,
) -> None:
    """One improvement round for the deployment's current model (opal/loop.py); rerun to resume after a crash.

    Takes the pairs its bottom verdicts earned since the last round, tunes it with DPO, evaluates candidate and
    current on --data with the paper's metrics and the image-swap control, and promotes the candidate only if no
    headline metric falls by more than --tolerance and JSON validity stays 1.0. Writes report.md and metrics.png.
    """
    from opal.loop import RoundConfig, StepFailed, run_round
    from training.progress import Reporter

    s = OpalSettings()
    config = RoundConfig(
        registry=s.models.registry,
        deployment=s.models.deployment,
        shards=shards,
        data=data,
        out=out,
        split=split,
        limit=limit,
        min_pairs=min_pairs,
        tolerance=tolerance,
        dpo_epochs=dpo_epochs,
    )
    with exits_on(ValueError, OSError, StepFailed, highlight=False):
        result = run_round(config, Reporter(console))
    if result.folder is not None:
        console.print(f"report: {result.folder / 'report.md'} and {result.folder / 'metrics.png'}", highlight=False)
        for reason in result.reasons:
            console.print(f"  {reason}", highlight=False)
    print(result.line(), flush=True)
