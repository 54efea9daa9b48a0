"""`opal data ...`: training data: MACE-refined listings, LACU conversations and DPO preference pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from opal.commands.common import console, current_categories, exits_on, fail, read_jsonl
from opal.samples import SAMPLE_DIR
from schemas.errors import OpalError

app = typer.Typer(help="Training data: MACE refinement and LACU conversations.", no_args_is_help=True)


def _print_pass(summary: Any, out: Path) -> None:
    console.print(_summary_table(summary))
    console.print(f"wrote {out} and {out.with_suffix('.summary.json')}")


def _summary_table(summary: Any) -> Table:
    t = Table("", "count", title=f"{summary.name}: {summary.total} items")
    for k in ("done", "skipped", "failed"):
        t.add_row(k, str(getattr(summary, k)))
    for reason, n in summary.failures.most_common():
        t.add_row(f"  failed: {reason}", str(n))
    for reason, n in summary.removed_by_reason.most_common():
        t.add_row(f"  removed from titles: {reason}", str(n))
    return t


async def _with_client(endpoint: str, concurrency: int, work: Any) -> Any:
    """Run ``work(client)`` with a ListingClient on ``endpoint`` that is closed afterwards."""
    from inference.client import ListingClient

    async with ListingClient([endpoint], max_concurrency=concurrency) as c:
        return await work(c)


@app.command("mace")
def data_mace(
    abo: Annotated[Path, typer.Option(help="ABO-layout folder (listings.jsonl + images/).")] = SAMPLE_DIR,
    out: Annotated[
        Path, typer.Option(help="Output JSONL: with --endpoint appended (reruns skip done items); the rules pass rewrites it.")
    ] = Path(".opal/data/mace.jsonl"),
    endpoint: Annotated[str | None, typer.Option(help="MLLM endpoint (…/v1); unset: the deterministic pass only.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N records.")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
) -> None:
    """Refine seller titles and aspects: deterministic rules, then (with --endpoint) the MLLM against the image."""
    import asyncio
    import itertools

    from training.abo import load_abo
    from training.mllm_passes import run_mace, run_mace_rules

    reg = current_categories()
    records = list(itertools.islice(load_abo(abo, reg), limit))
    if endpoint:
        summary = asyncio.run(_with_client(endpoint, concurrency, lambda c: run_mace(records, c, out, reg, concurrency)))
    else:
        summary = run_mace_rules(records, out, reg)
    _print_pass(summary, out)


@app.command("pairs")
def data_pairs(
    endpoint: Annotated[str, typer.Option(help="Endpoint (…/v1) serving the model to judge, normally the SFT model.")],
    data: Annotated[Path, typer.Option(help="ABO-format folder (e.g. ../shared/data/abo); its train split is used.")],
    out: Annotated[Path, typer.Option(help="PreferencePair JSONL (overwritten).")] = Path(".opal/data/pairs.jsonl"),
    mace: Annotated[Path | None, typer.Option(help="`opal data mace` JSONL: judge against its MLLM-refined listings.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many items.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 8,
) -> None:
    """DPO pairs: generate on the train split, judge against the MACE-refined reference, pair the bottom two verdicts."""
    import asyncio

    from training.preferences import build_pairs, write_pairs
    from training.sft import train_split_items

    reg = current_categories()
    with exits_on(ValueError, OSError):
        items = train_split_items(data, reg, mace=mace, limit=limit)

    async def work(c: Any) -> Any:
        await c.served_model()  # fail fast, before any item, when the endpoint is down
        return await build_pairs(items, c, reg)

    with exits_on(OpalError, ValueError, OSError):
        summary = asyncio.run(_with_client(endpoint, concurrency, work))
    if summary.failed == summary.items:
        raise fail(f"all {summary.items} requests failed; {out} left as it was", code=1)
    write_pairs(summary.pairs, out)
    t = Table("verdict", "items", title=f"judged {summary.items - summary.failed} of {summary.items} train items")
    for verdict, n in sorted(summary.verdicts.items()):
        t.add_row(verdict, str(n))
    t.add_row("failed requests", str(summary.failed))
    console.print(t)
    console.print(f"wrote {len(summary.pairs)} preference pairs to {out}", highlight=False)


@app.command("lacu")
def data_lacu(
    mace: Annotated[Path, typer.Option(help="MACE output JSONL.")] = Path(".opal/data/mace.jsonl"),
    out: Annotated[Path, typer.Option(help="Output JSONL of conversations.")] = Path(".opal/data/lacu.jsonl"),
    endpoint: Annotated[str | None, typer.Option(help="Text-LLM endpoint (…/v1); unset: built from the listing and its Q&A.")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
) -> None:
    """Buyer/seller conversations (at least five rounds) about each refined listing."""
    import asyncio

    from training.mllm_passes import run_lacu, run_lacu_rules

    reg = current_categories()
    rows = read_jsonl(mace)
    if endpoint:
        summary = asyncio.run(_with_client(endpoint, concurrency, lambda c: run_lacu(rows, c, out, reg, concurrency)))
    else:
        summary = run_lacu_rules(rows, out, reg)
    _print_pass(summary, out)
