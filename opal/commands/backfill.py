"""`opal backfill INVENTORY`: an inventory export (JSONL, CSV, Parquet; a path or s3://) onto the backfill lane."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from opal.commands.common import console, exits_on, fail, require_kafka, resolved_settings, sigterm_as_interrupt
from workers.backfill import BackfillError, BackfillOptions, BackfillReport, Checkpoint, fingerprint, run_backfill
from workers.inventory import InventoryError, detect_format, fetch_s3, is_s3


def _state_prefix(state_dir: Path, inventory: str) -> Path:
    """``<state dir>/<name>-<hash of where it is>``: one checkpoint per inventory location."""
    name = os.path.basename(inventory.rstrip("/")) or "inventory"
    return state_dir / f"{name}-{hashlib.sha256(inventory.encode()).hexdigest()[:12]}"


def _fmt_rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s" if seconds > 0 else "-"


class _Reporter:
    """Progress from the first second: a live bar on a terminal, a plain line every 2 s otherwise (logs, CI)."""

    def __init__(self, total_hint: str) -> None:
        self.live = console.is_terminal
        self.last_line = 0.0
        self.total_hint = total_hint
        self.bar = None
        self.task = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]backfill[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=console,
            )
            self.task = self.bar.add_task("backfill", total=None, rate="", status="")
            self.bar.start()

    def __call__(self, ck: Checkpoint, rep: BackfillReport) -> None:
        done = rep.resumed_after + rep.rows_read
        rate = _fmt_rate(rep.rows_read, rep.elapsed_s)
        status = f"lag {ck.lag:,}" + (" throttled" if ck.throttled else "")
        if rep.rejected_total:
            status += f" rejected {rep.rejected_total:,}"
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, total=rep.total_rows, completed=done, rate=rate, status=status)
            return
        now = time.monotonic()
        if now - self.last_line >= 2.0 or (rep.total_rows is not None and done >= rep.total_rows):
            self.last_line = now
            left = (rep.total_rows or 0) - done
            eta = f"ETA {left / (rep.rows_read / rep.elapsed_s):,.0f} s" if rep.rows_read and rep.elapsed_s > 0 and left > 0 else ""
            print(f"backfill: {done:,}/{rep.total_rows or '?'} rows, {rate}, {eta} {status}".rstrip(), flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def backfill(
    inventory: Annotated[str, typer.Argument(help="Inventory export: a path or s3://BUCKET/KEY (.jsonl, .csv or .parquet).")],
    fmt: Annotated[str | None, typer.Option("--format", help="jsonl, csv or parquet (default: from the suffix).")] = None,
    rate: Annotated[float, typer.Option(help="Most events per second (0: unlimited).")] = 1000.0,
    max_lag: Annotated[int, typer.Option(help="Pause while the enrichment group's backfill backlog is above this.")] = 50_000,
    resume_lag: Annotated[int | None, typer.Option(help="Resume at or below this backlog (default: half of --max-lag).")] = None,
    window: Annotated[int, typer.Option(help="Most rows sent beyond the saved checkpoint (what a crash may re-send).")] = 1000,
    state_dir: Annotated[Path, typer.Option(help="Where checkpoints, rejects and S3 downloads are kept.")] = Path(".opal/backfill"),
    restart: Annotated[bool, typer.Option(help="Ignore the checkpoint and send every row again (same event ids).")] = False,
    dry_run: Annotated[bool, typer.Option(help="Validate and count every row; send nothing.")] = False,
) -> None:
    """Publish one ListingImageEvent per inventory row on the backfill lane, resumably.

    Columns: listing_id, category, image_uri or image_uris (a list), optionally title and aspects (an object).
    Bad rows go to a rejects file with their line and reason. The job paces itself (--rate) and pauses while the
    enrichment workers' backlog is above --max-lag. Killed at any point, the same command resumes from its
    checkpoint: no row is skipped, at most --window rows are sent again, each with its original event id.
    """
    sigterm_as_interrupt()
    if window < 1 or max_lag < 1 or rate < 0 or not 0 <= (max_lag // 2 if resume_lag is None else resume_lag) < max_lag:
        raise fail("--window and --max-lag must be at least 1, --rate at least 0, and 0 <= --resume-lag < --max-lag.")
    s = resolved_settings()
    if not dry_run:
        require_kafka(s)
    state = _state_prefix(state_dir.resolve(), inventory if is_s3(inventory) else str(Path(inventory).resolve()))
    with exits_on(InventoryError):
        kind = detect_format(inventory, fmt)
        if is_s3(inventory):
            state.parent.mkdir(parents=True, exist_ok=True)
            path = Path(f"{state}.download")
            console.print(f"downloading {inventory} ...")
            fp = fetch_s3(inventory, path)
            base = None
        else:
            path = Path(inventory)
            if not path.is_file():
                raise fail(f"{inventory}: no such file.")
            fp, base = fingerprint(path), path.resolve().parent
    options = BackfillOptions(rate_per_s=rate, max_lag=max_lag, resume_lag=resume_lag, window=window, dry_run=dry_run)
    if not dry_run:
        console.print(f"backfill {inventory} -> {s.topics.images_backfill} (checkpoint {state}.checkpoint.json)")
    reporter = _Reporter(inventory)
    try:
        with exits_on(InventoryError, BackfillError):
            rep = run_backfill(s, path, kind, state, options, label=inventory, image_base=base, fp=fp, restart=restart, progress=reporter)
    except KeyboardInterrupt:
        reporter.stop()
        console.print(f"[yellow]interrupted[/]: checkpoint saved in {state}.checkpoint.json; the same command resumes")
        raise typer.Exit(130) from None
    finally:
        reporter.stop()
    _summary(rep, s.topics.images_backfill)


def _summary(rep: BackfillReport, topic: str) -> None:
    if rep.already_finished:
        console.print(
            f"{rep.inventory}: already backfilled ({rep.published_total:,} published, {rep.rejected_total:,} rejected);"
            " pass --restart to send it again (same event ids)"
        )
        return
    if rep.first_rejects:
        t = Table(title="first rejected rows")
        for col in ("line", "listing_id", "reason"):
            t.add_column(col)
        for r in rep.first_rejects:
            t.add_row(str(r["line"]), str(r.get("listing_id", "")), str(r["reason"]))
        console.print(t)
    t = Table(title="backfill" + (" (dry run: nothing sent)" if rep.dry_run else ""))
    t.add_column("")
    t.add_column("this run", justify="right")
    t.add_column("all runs", justify="right")
    valid = rep.rows_read - rep.rejected
    t.add_row("rows read", f"{rep.rows_read:,}", f"{rep.resumed_after + rep.rows_read:,}")
    if rep.dry_run:
        t.add_row("valid", f"{valid:,}", "")
    else:
        t.add_row("published", f"{rep.published:,}", f"{rep.published_total:,}")
    t.add_row("rejected", f"{rep.rejected:,}", f"{rep.rejected_total:,}")
    if rep.resumed_after:
        t.add_row("resumed after row", f"{rep.resumed_after:,}", "")
    if not rep.dry_run:
        t.add_row("throttled", f"{rep.throttle_episodes} x, {rep.throttled_s:.1f} s", "")
        t.add_row("largest backlog seen", f"{rep.max_lag_seen:,}", "")
    t.add_row("time", f"{rep.elapsed_s:.1f} s ({_fmt_rate(rep.rows_read, rep.elapsed_s)})", "")
    console.print(t)
    if rep.rejected_total:
        console.print(f"rejects: {rep.rejects_path}")
    what = f"{valid:,} valid" if rep.dry_run else f"{rep.published_total:,} published to {topic}"
    print(f"backfill: {rep.resumed_after + rep.rows_read:,} rows, {what}, {rep.rejected_total:,} rejected", flush=True)
