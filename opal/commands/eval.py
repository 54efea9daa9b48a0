"""`opal eval ...`: score generated listings with the paper's metrics, or run a whole evaluation against baselines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from opal.commands.common import console, current_categories, exits_on, fail, read_jsonl, resolved_settings, sigterm_as_interrupt
from schemas.errors import OpalError

app = typer.Typer(help="Score generated listings with the paper's metrics.", no_args_is_help=True)


@app.command("score")
def eval_score(
    pred: Annotated[Path, typer.Option(help="JSONL: {id, output} per line (output = the raw generated string).")],
    ref: Annotated[Path, typer.Option(help="JSONL: {id, category, title, aspects} per line.")],
    schemas: Annotated[
        Path | None, typer.Option(help="Schema folder or bulk file (default: OPAL_SCHEMAS_PATHS, the packaged set).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """ROUGE-L F1, aspect F1, schema-compliance recall, JSON validity (definitions in training/metrics.py)."""
    from schemas.category import CategoryRegistry
    from schemas.schema_source import load_location
    from training.metrics import score

    predictions = {str(r["id"]): str(r.get("output", "")) for r in read_jsonl(pred)}
    references = read_jsonl(ref)
    with exits_on(OpalError, ValueError):
        registry = CategoryRegistry(load_location(schemas)) if schemas else current_categories()
        report = score(predictions, references, registry)
    if as_json:
        keys = ("rouge_l_f1", "aspect_f1", "schema_recall", "json_valid", "n", "schema_coverage", "generic_items")
        print(json.dumps({**{k: report.summary()[k] for k in keys}, "generic_schema_recall": report.generic_schema_recall}))
        return
    t = Table("metric", "value", title=f"{report.n} examples ({report.missing_predictions} without a prediction)")
    for k, v in report.summary().items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)
    console.print(
        f"schema recall over the {report.n - report.generic_items} references with a category schema "
        f"({report.schema_coverage:.1%}); {report.generic_items} fell back to the generic schema"
        + (f" (their schema recall {report.generic_schema_recall:.4f})" if report.generic_schema_recall is not None else "")
    )
    a = Table("aspect", "precision", "recall", "predicted", "reference", title="per aspect name")
    for name, (p, r, n_p, n_r) in sorted(report.per_aspect.items(), key=lambda kv: -kv[1][3]):
        a.add_row(name, f"{p:.3f}", f"{r:.3f}", str(n_p), str(n_r))
    console.print(a)


@app.command("run")
def eval_run(
    data: Annotated[Path, typer.Option(help="ABO-format folder (listings.jsonl + images/) whose split is scored.")],
    endpoint: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL (ending in /v1) serving the model under test.")] = None,
    model: Annotated[Path | None, typer.Option(help="Model folder to serve with vLLM for this run (instead of --endpoint).")] = None,
    split: Annotated[str, typer.Option(help="train, validation, test or all (all includes train items).")] = "test",
    train_data: Annotated[
        Path | None, typer.Option(help="ABO-format folder whose train split fits the baselines (default: the train split of --data).")
    ] = None,
    allow_in_sample: Annotated[
        bool, typer.Option(help="Allow scoring items the baselines were fitted on (refused by default; the report says so).")
    ] = False,
    swap_control: Annotated[
        bool, typer.Option(help="Also generate every item with another item's photo of its category (doubles the requests).")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the within-category photo swap.")] = 0,
    limit: Annotated[int | None, typer.Option(min=1, help="Score at most this many items of the split.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for predictions, references, report.json/.md and metrics.png.")] = Path(".opal/eval"),
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 16,
) -> None:
    """Score a split of --data beside majority and retrieval baselines and an image-swap control (training/evaluate.py).

    The model is the one --endpoint serves, or --model served by vLLM for the run (stopped afterwards).
    """
    if split not in ("train", "validation", "test", "all"):
        raise fail(f"unknown split {split!r}", " (train, validation, test, all)")
    if (endpoint is None) == (model is None):
        raise fail("give exactly one of --endpoint (a running server) and --model (a folder to serve)")
    server = None
    if model is not None:
        from opal.vllm_server import served_name, start_vllm

        sigterm_as_interrupt()
        with console.status(f"starting vLLM on {model} ..."), exits_on(OpalError, highlight=False):
            server, endpoint = start_vllm(model, resolved_settings().vllm, resolved_settings().embedded.run_dir.resolve(), timeout_s=600)
        console.print(f"serving {served_name(model.resolve())} at {endpoint} for this run", highlight=False)
    assert endpoint is not None
    from training.evaluate import EvalConfig

    config = EvalConfig(
        data=data,
        endpoint=endpoint,
        split=split,  # type: ignore[arg-type]
        limit=limit,
        concurrency=concurrency,
        train_data=train_data,
        allow_in_sample=allow_in_sample,
        swap_control=swap_control,
        seed=seed,
        repetition_penalty=resolved_settings().vllm.repetition_penalty,  # the deployment's decoding, not the client's defaults
        frequency_penalty=resolved_settings().vllm.frequency_penalty,
    )
    try:
        _eval_run(config, out)
    finally:
        if server is not None:
            server.stop()


def _eval_run(config: Any, out: Path) -> None:
    """Run ``config`` (an EvalConfig), write the report files and print the tables."""
    import asyncio

    from rich.progress import Progress

    from opal.plots import bars_png
    from training.eval_report import plot_series, tables, write_eval
    from training.evaluate import PLOT_NOTE, run_eval

    data, split = config.data, config.split
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("generating", total=None)
        # no items, in-sample baselines, unreadable data, endpoint down
        with exits_on(ValueError, OSError, OpalError, highlight=False):
            progress = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
            result = asyncio.run(run_eval(config, current_categories(), progress=progress))
    paths = write_eval(result, out)
    groups, series = plot_series(result)
    title = f"{result.model} on {data.name}/{split} ({len(result.references)} items); {PLOT_NOTE}"
    png = bars_png(groups, series, out / "metrics.png", title)
    for t in tables(result):
        rt = Table(*t.headers, title=t.title, caption=t.note or None)
        for row in t.rows:
            rt.add_row(*row)
        console.print(rt)
    console.print(f"rejected outputs: {result.rejected} · failed requests: {result.failed}")
    console.print("wrote " + ", ".join(str(x) for x in [*paths, png]), highlight=False)
