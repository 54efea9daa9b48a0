"""`opal loop ...`: improvement rounds over the model registry (DPO on the judge's pairs, evaluation gate, promotion)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from opal.commands.common import console, exits_on, fail, require_kafka, resolved_settings
from schemas.errors import OpalError
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
    config = RoundConfig(  # absolute paths: the steps run as subprocesses in the repository folder
        registry=s.models.registry.resolve(),
        deployment=s.models.deployment,
        shards=shards.resolve(),
        data=data.resolve(),
        out=out.resolve(),
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


@app.command("reenrich")
def loop_reenrich(
    version: Annotated[str | None, typer.Option(help="Target model version (default: the deployment's current one).")] = None,
    rate: Annotated[float, typer.Option(min=0.0, help="Events per second at most (0: no limit); backfill yields to realtime.")] = 50.0,
    dry_run: Annotated[bool, typer.Option(help="Count what would be sent; send nothing.")] = False,
    force: Annotated[bool, typer.Option(help="Send even when OPAL_VLLM_ENDPOINTS do not serve the target version.")] = False,
) -> None:
    """Re-publish, on the backfill lane, every listing whose current AspectEvent came from another model version.

    Order after a promotion: restart `opal serve` (it serves the registry's current version), restart the enrich
    workers (they read the served version at start), then run this. It refuses while the endpoints in
    OPAL_VLLM_ENDPOINTS serve another version (the workers would answer from the old version's cache).

    Reads the aspect topic to its end, keeps each listing's latest event, and sends the stale ones again (event ids
    derived from listing and version: a rerun sends the same events). Run it after a promotion; run it again to see
    how far the catalogue has converged.
    """
    from rich.table import Table

    from schemas.events import AspectEvent, ListingImageEvent
    from schemas.serde import CodecSet
    from training.registry import ModelRegistry
    from workers.kafka_clients import make_producer
    from workers.reenrich import plan, publish, read_latest

    s = resolved_settings()
    require_kafka(s)
    if version is None:
        current = ModelRegistry(s.models.registry).current(s.models.deployment)
        if current is None:
            raise fail(f"No --version and no current model for deployment {s.models.deployment!r}.")
        version = current.version
    if not dry_run and not force:
        _require_served(s.vllm.endpoints, version)
    codecs = CodecSet.of(s.kafka)
    with console.status(f"reading {s.topics.aspects} to its end ..."), exits_on(TimeoutError, OpalError, highlight=False):
        latest, unreadable = read_latest(s.kafka, s.topics.aspects, codecs[AspectEvent])
    p = plan(latest, version, unreadable)
    sent = 0
    if p.events and not dry_run:
        producer = make_producer(s.kafka)
        with exits_on(RuntimeError, highlight=False):
            sent = publish(
                producer,
                s.topics.images_backfill,
                p.events,
                codecs[ListingImageEvent],
                rate,
                progress=lambda done, total: console.print(f"  sent {done:,}/{total:,}", highlight=False),
            )
    t = Table("listings", "count", title=f"re-enrichment to {version}")
    t.add_row("with a current AspectEvent", str(p.listings))
    t.add_row("already from the target version", str(p.at_target))
    t.add_row("stale (from another version)", str(len(p.events) + p.without_images))
    t.add_row("  without images (cannot be sent)", str(p.without_images))
    t.add_row("unreadable records", str(p.unreadable))
    t.add_row("sent on the backfill lane" + (" (dry run: none)" if dry_run else ""), str(sent))
    console.print(t)
    print(f"reenrich: {sent} listings re-published for {version}; {p.at_target} of {p.listings} already at it", flush=True)


def _require_served(endpoints: list[str], version: str) -> None:
    """Exit 2 unless some endpoint serves ``<name>@<version>`` (none configured: a warning, the operator's call)."""
    import httpx

    if not endpoints:
        console.print("[yellow]OPAL_VLLM_ENDPOINTS is unset: cannot check that the target version is served[/]")
        return
    served: list[str] = []
    for url in endpoints:
        try:
            served += [m["id"] for m in httpx.get(f"{url.rstrip('/')}/models", timeout=10).json().get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            raise fail(f"cannot list the models at {url}: {e}") from None
    if not any(m.endswith(f"@{version}") for m in served):
        raise fail(
            f"{version} is not served at {', '.join(endpoints)} (serving: {', '.join(served) or 'nothing'}).",
            " Restart `opal serve` and the enrich workers on the promoted version first, or pass --force.",
        )
