"""`opal events ...`: publish the bundled sample listings (and bad records) to the image topics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from opal.commands.common import console, require_kafka, resolved_settings
from opal.samples import SAMPLE_DIR, publish_samples
from schemas.events import Lane

app = typer.Typer(help="Publish and inspect events.", no_args_is_help=True)


@app.command("publish-samples")
def events_publish_samples(
    lane: Annotated[Lane, typer.Option(help="Lane to publish to.")] = Lane.REALTIME,
    bad: Annotated[bool, typer.Option(help="Also publish two bad records (corrupt bytes, unknown category).")] = False,
    samples: Annotated[Path, typer.Option(help="Sample folder (listings.jsonl + images/).")] = SAMPLE_DIR,
) -> None:
    """Publish the bundled sample listings as ListingImageEvents."""
    s = resolved_settings()
    require_kafka(s)
    n = publish_samples(s, lane, bad, samples)
    console.print(f"published {n} records")
