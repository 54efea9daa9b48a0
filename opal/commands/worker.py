"""`opal worker ...`: the long-running stream workers (enrich, index, judge, preferences) and their status."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from opal.commands.common import console, current_categories, exits_on, fail, require_kafka, require_redis, resolved_settings
from schemas.settings import OpalSettings

app = typer.Typer(help="Long-running stream workers.", no_args_is_help=True)


def _metrics_url(s: OpalSettings, port: int) -> str:
    """Where this host reaches a worker's /metrics (a wildcard bind is reached on loopback)."""
    host = s.worker.metrics_host
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/metrics"


@app.command("enrich")
def worker_enrich(
    idle_exit: Annotated[float | None, typer.Option(help="Exit after this many seconds with nothing to do (batch runs).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (default OPAL_WORKER_METRICS_PORT; 0 = free).")] = None,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Consume listing-image events, write AspectEvents (or DeadLetters) until SIGTERM/Ctrl-C."""
    import asyncio
    import logging

    from workers.enrich import FatalWorkerError, run_worker
    from workers.metrics import WorkerMetrics
    from workers.status import announce, withdraw

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per model request is noise
    s = resolved_settings()
    require_kafka(s)
    metrics = WorkerMetrics()
    port = metrics.serve(s.worker.metrics_port if metrics_port is None else metrics_port, s.worker.metrics_host)
    console.print(f"metrics on {_metrics_url(s, port)}", highlight=False)
    note = announce(s.embedded.run_dir, "enrich", _metrics_url(s, port))  # for `opal worker status`

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        w = await run_worker(s, stop, idle_exit_s=idle_exit, metrics=metrics)
        console.print(f"enrich worker stopped after {w.outputs.acknowledged} outputs")

    try:
        asyncio.run(main())
    except ValueError as e:
        raise fail(str(e)) from None
    except FatalWorkerError as e:
        raise fail(f"enrich worker stopped on a fatal error (unfinished records are replayed on restart): {e}", code=1) from None
    finally:
        withdraw(note)


@app.command("status")
def worker_status(
    url: Annotated[
        list[str] | None, typer.Option("--url", help="A worker's /metrics URL (repeatable); default: every running worker of this run dir.")
    ] = None,
) -> None:
    """What each running worker holds: in flight, oldest record's age, lag and commit lag per partition, open breakers."""
    from workers.status import announced, scrape

    s = resolved_settings()
    urls = url or [str(w["metrics_url"]) for w in announced(s.embedded.run_dir)]
    if not urls:
        console.print(f"no running worker announced under {s.embedded.run_dir}/workers (pass --url)")
        raise typer.Exit(1)
    table = Table(
        "worker", "in flight", "oldest (s)", "paused", "outputs", "partition", "lag", "commit lag", "down", "dead letters", title="workers"
    )
    for u in urls:
        try:
            st = scrape(u)
        except OSError as e:
            table.add_row(u, "-", "-", "-", "-", "-", "-", "-", f"unreachable: {e}", "-")
            continue
        parts = sorted(set(st.lag) | set(st.commit_lag)) or [("", "")]
        dead = ", ".join(f"{k}={int(v)}" for k, v in sorted(st.dead_letters.items()) if v) or "0"
        for i, tp in enumerate(parts):
            head = (
                (u, f"{st.in_flight:.0f}", f"{st.oldest_in_flight_s:.1f}", f"{st.paused_partitions:.0f}", f"{st.outputs:.0f}")
                if i == 0
                else ("",) * 5
            )
            table.add_row(
                *head,
                f"{tp[0]}[{tp[1]}]" if tp[0] else tp[1] or "-",
                f"{st.lag.get(tp, 0):.0f}",
                f"{st.commit_lag.get(tp, 0):.0f}" if tp in st.commit_lag else "-",
                (", ".join(st.open_breakers) or "-") if i == 0 else "",
                dead if i == 0 else "",
            )
    console.print(table)


@app.command("index")
def worker_index(
    idle_exit: Annotated[float | None, typer.Option(help="Exit after this many seconds with nothing to do (batch runs).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Most records applied per batch (offsets stored per batch).")] = 500,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port (0 = a free one, printed).")] = 0,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Keep the search index (Redis) in step with the aspect topic until SIGTERM/Ctrl-C."""
    import logging
    import threading

    from workers.index_worker import IndexerError, build_indexer
    from workers.metrics import IndexerMetrics

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = resolved_settings()
    require_kafka(s)
    require_redis(s)
    metrics = IndexerMetrics()
    console.print(f"metrics on {_metrics_url(s, metrics.serve(metrics_port, s.worker.metrics_host))}", highlight=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        st = build_indexer(s, batch_size, metrics=metrics).run(stop, idle_exit_s=idle_exit)
    except IndexerError as e:
        raise fail(f"indexer stopped: {e}", code=1) from None
    table = Table("indexed", "deleted", "skipped (replays)", "dead letters", "batches", title="search indexer")
    table.add_row(*(str(v) for v in (st.indexed, st.deleted, st.skipped, st.dead_lettered, st.batches)))
    console.print(table)


@app.command("judge")
def worker_judge(
    log_level: Annotated[str, typer.Option(help="Logging level of the faust worker.")] = "WARNING",
    metrics_port: Annotated[int, typer.Option(help="Prometheus port (0 = a free one, printed).")] = 0,
) -> None:
    """Judge low-confidence listings (faust agent): outcomes to the judge topic, bottom verdicts to the preference topic.

    With OPAL_JUDGE_ENDPOINT the MLLM judge decides (photo + seller listing; images under the worker's allowed file
    root / hosts); without it, or when the photo cannot be read, the reference rules. /metrics has verdicts per
    judge, latency, fallbacks and the agreement of the two judges on a sample (OPAL_JUDGE_AGREEMENT_RATE).
    """
    from collections import Counter

    from inference.client import ListingClient
    from training.judge import OnlineJudge
    from workers.image_loader import ImageLoader
    from workers.judge_agent import build_judge_app
    from workers.metrics import JudgeMetrics

    s = resolved_settings()
    require_kafka(s)
    counts: Counter[str] = Counter()
    metrics = JudgeMetrics()
    console.print(f"metrics on {_metrics_url(s, metrics.serve(metrics_port, s.worker.metrics_host))}", highlight=False)
    j, w = s.judge, s.worker
    judge = OnlineJudge(
        current_categories(),
        agreement_rate=j.agreement_rate,
        on_judged=lambda kind, verdict, secs: (
            metrics.verdicts.labels(kind, verdict.value).inc(),
            metrics.latency.labels(kind).observe(secs),
        ),
        on_fallback=lambda reason: metrics.fallbacks.labels(reason).inc(),
        on_agreement=lambda agreed: metrics.agreement.labels("agree" if agreed else "disagree").inc(),
    )
    if j.endpoint:
        judge.client = ListingClient(
            [j.endpoint],
            model=j.model,
            api_key=j.api_key.get_secret_value() if j.api_key else None,
            timeout_s=j.request_timeout_s,
            max_concurrency=4,
        )
        loader = ImageLoader.from_settings(w)
        judge.load_image = loader.load
        console.print(f"judge: MLLM at {j.endpoint} (rules where it cannot judge)", highlight=False)
    else:
        console.print("judge: reference rules (set OPAL_JUDGE_ENDPOINT for the MLLM judge)", highlight=False)
    with exits_on(ValueError):  # Kafka security settings the faust agents cannot apply
        app = build_judge_app(s, judge, counts)
    _run_faust(app, counts, "judge agent", log_level)


def _run_faust(faust_app: Any, counts: Any, title: str, log_level: str) -> None:
    """Run a faust app until SIGTERM/Ctrl-C (faust's worker stops the agents, commits, leaves), then print its counts."""
    import faust

    try:
        faust.Worker(faust_app, loglevel=log_level.lower(), quiet=True).execute_from_commandline()
    finally:
        t = Table("what", "events", title=title)
        for k, v in sorted(counts.items()):
            t.add_row(k, str(v))
        console.print(t)


@app.command("preferences")
def worker_preferences(
    out: Annotated[Path, typer.Option(help="Folder of DPO shards (pairs-<model version>.jsonl), appended to.")] = Path(
        ".opal/data/preferences"
    ),
    log_level: Annotated[str, typer.Option(help="Logging level of the faust worker.")] = "WARNING",
) -> None:
    """Build the next DPO set (faust agent): new preference pairs appended to one shard per model version."""
    from collections import Counter

    from workers.preference_builder import build_preference_app

    s = resolved_settings()
    require_kafka(s)
    require_redis(s)
    counts: Counter[str] = Counter()
    with exits_on(ValueError):  # Kafka security settings the faust agents cannot apply
        faust_app = build_preference_app(s, out, counts)
    _run_faust(faust_app, counts, "preference-set builder", log_level)
