"""The `opal` command line: the one place that wires every layer together.

Every command reads :class:`~schemas.settings.OpalSettings` from ``OPAL_*``
variables. Where ``OPAL_KAFKA_BOOTSTRAP`` / ``OPAL_REDIS_URL`` are unset, commands
use a stack started by ``opal dev up`` if one runs, and ``opal demo`` starts its own.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from opal import __version__
from opal.embedded import read_state, resolve_settings, stop_detached, up_detached
from opal.samples import SAMPLE_DIR, load_samples, sample_event
from opal.schemas_cli import current_categories, schemas_app
from schemas.errors import OpalError
from schemas.events import ImageRef, Lane, ListingImageEvent
from schemas.serde import EventCodec, framing_for
from schemas.settings import OpalSettings

app = typer.Typer(help="OPAL: product photo -> schema-compliant marketplace listing.", no_args_is_help=True, add_completion=False)
dev_app = typer.Typer(help="Embedded local services (tansu broker, valkey).", no_args_is_help=True)
topology_app = typer.Typer(help="Kafka topics and consumer groups.", no_args_is_help=True)
events_app = typer.Typer(help="Publish and inspect events.", no_args_is_help=True)
model_app = typer.Typer(help="Build OPAL model folders (runs in the model environment).", no_args_is_help=True)
worker_app = typer.Typer(help="Long-running stream workers.", no_args_is_help=True)
eval_app = typer.Typer(help="Score generated listings with the paper's metrics.", no_args_is_help=True)
data_app = typer.Typer(help="Training data: MACE refinement and LACU conversations.", no_args_is_help=True)
train_app = typer.Typer(help="Train OPAL models: SFT and DPO (runs in the model environment).", no_args_is_help=True)
app.add_typer(dev_app, name="dev")
app.add_typer(topology_app, name="topology")
app.add_typer(schemas_app, name="schemas")
app.add_typer(events_app, name="events")
app.add_typer(model_app, name="model")
app.add_typer(worker_app, name="worker")
app.add_typer(eval_app, name="eval")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
experiment_app = typer.Typer(help="Experiments over the whole pipeline (train, serve, evaluate).", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")

console = Console()


def _settings() -> OpalSettings:
    return resolve_settings(OpalSettings())


def _require_kafka(s: OpalSettings) -> None:
    if not s.kafka.bootstrap:
        console.print("[red]No Kafka configured.[/] Set OPAL_KAFKA_BOOTSTRAP or run `opal dev up` first.")
        raise typer.Exit(2)


def _require_redis(s: OpalSettings) -> None:
    if not s.redis.url:
        console.print("[red]No Redis configured.[/] Set OPAL_REDIS_URL or run `opal dev up` first.")
        raise typer.Exit(2)


def _sigterm_as_interrupt() -> None:
    """Let SIGTERM unwind like Ctrl-C, so context managers stop child services."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@app.callback(invoke_without_command=True)
def _main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        console.print(f"opal {__version__}")
        raise typer.Exit()


@app.command("settings")
def settings_cmd(markdown: Annotated[bool, typer.Option(help="Print a Markdown table (as in the README).")] = False) -> None:
    """Print every setting, its environment variable and value (secrets masked)."""
    rows = _settings().describe()
    if markdown:
        print("| variable | default | meaning |\n| --- | --- | --- |")
        for name, value, desc in rows:
            print(f"| `{name}` | `{value}` | {desc} |" if value else f"| `{name}` | | {desc} |")
        return
    table = Table(title="OPAL settings")
    for col in ("variable", "value", "meaning"):
        table.add_column(col, overflow="fold")
    for name, value, desc in rows:
        table.add_row(name, value, desc)
    console.print(table)


# -- dev ---------------------------------------------------------------------------------
@dev_app.command("up")
def dev_up(
    storage: Annotated[
        str | None,
        typer.Option(help="Broker storage: memory or s3 (durable, via a local moto server). Default: OPAL_EMBEDDED_BROKER_STORAGE."),
    ] = None,
) -> None:
    """Start tansu and valkey in the background (restart only what is down); print the variables to use them."""
    if storage not in (None, "memory", "s3"):
        console.print(f"[red]--storage must be memory or s3[/], not {storage!r}")
        raise typer.Exit(2)
    r = up_detached(OpalSettings(), storage)
    kafka, redis, storage_used = r.state["kafka_bootstrap"], r.state["redis_url"], r.state.get("storage", "memory")
    if r.action == "running":
        console.print(f"already up: kafka {kafka}  redis {redis}  (storage {storage_used})")
        return
    if r.action == "restarted":
        console.print(f"restarted on the recorded ports: {', '.join(r.restarted)}")
    console.print(f"kafka  {kafka}  (storage {storage_used})\nredis  {redis}\nlogs   {Path(r.state['processes'][0]['log']).parent}")
    console.print("Commands in this folder use them automatically; elsewhere export:")
    print(f"export OPAL_KAFKA_BOOTSTRAP={kafka} OPAL_REDIS_URL={redis}")


@dev_app.command("restart")
def dev_restart(
    service: Annotated[str, typer.Argument(help="kafka, redis or s3.")],
) -> None:
    """Restart one background service on its recorded port (kafka on s3 storage keeps its data)."""
    from opal.embedded import ServiceStartError, restart_service

    s = OpalSettings()
    try:
        proc = restart_service(s.embedded.run_dir, service, timeout_s=s.embedded.start_timeout_s)
    except LookupError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    except ServiceStartError as e:
        console.print(f"[red]{service} did not come back:[/] {e}")
        raise typer.Exit(1) from None
    console.print(f"{service}: {proc.name} pid {proc.pid} on 127.0.0.1:{proc.port}")


@dev_app.command("down")
def dev_down() -> None:
    """Stop the background services started by `opal dev up`."""
    stopped = stop_detached(OpalSettings().embedded.run_dir)
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@dev_app.command("status")
def dev_status() -> None:
    """Show whether the background services run (exit 1: no stack recorded)."""
    state = read_state(OpalSettings().embedded.run_dir)
    if state is None:
        console.print("no embedded stack (run `opal dev up`)")
        raise typer.Exit(1)
    table = Table("service", "pid", "alive", "port", "restarts", "log")
    for p in state["processes"]:
        alive = "yes" if state["alive"][p["name"]] else "[red]no[/]"
        table.add_row(p["name"], str(p["pid"]), alive, str(p.get("port") or ""), str(p.get("restarts", 0)), p["log"])
    console.print(table)
    console.print(f"kafka {state['kafka_bootstrap']}  redis {state['redis_url']}  (storage {state.get('storage', 'memory')})")


# -- topology ----------------------------------------------------------------------------
@topology_app.command("apply")
def topology_apply() -> None:
    """Create missing topics, verify existing ones; exit 1 on a mismatch."""
    from confluent_kafka.admin import AdminClient

    from topology.admin import TopologyMismatchError, apply_topology
    from topology.declared import build_topology

    s = _settings()
    _require_kafka(s)
    try:
        results = apply_topology(AdminClient(s.kafka.librdkafka_config()), build_topology(s))
    except TopologyMismatchError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    table = Table("topic", "status", "detail", title=f"topology on {s.kafka.bootstrap}")
    for r in results:
        table.add_row(r.name, r.status, r.detail)
    console.print(table)


@topology_app.command("show")
def topology_show() -> None:
    """Print the declared topics, consumer groups and the flow between them."""
    from topology.declared import build_topology
    from topology.render import render_flow

    topo = build_topology(_settings())
    t = Table("topic", "partitions", "key", "value", "configs", "purpose", title="topics")
    for spec in topo.topics:
        t.add_row(
            spec.name,
            str(spec.partitions),
            spec.key,
            spec.value.__name__,
            ", ".join(f"{k}={v}" for k, v in spec.configs.items()),
            spec.description,
        )
    console.print(t)
    g = Table("group", "reads", "writes", "process", title="consumer groups")
    for grp in topo.groups:
        g.add_row(grp.group_id, "\n".join(grp.reads), "\n".join(grp.writes), grp.process)
    console.print(g)
    console.print(render_flow(topo), markup=False, highlight=False)


# -- events ------------------------------------------------------------------------------
@events_app.command("publish-samples")
def events_publish_samples(
    lane: Annotated[Lane, typer.Option(help="Lane to publish to.")] = Lane.REALTIME,
    bad: Annotated[bool, typer.Option(help="Also publish two bad records (corrupt bytes, unknown category).")] = False,
    samples: Annotated[Path, typer.Option(help="Sample folder (listings.jsonl + images/).")] = SAMPLE_DIR,
) -> None:
    """Publish the bundled sample listings as ListingImageEvents."""
    s = _settings()
    _require_kafka(s)
    n = _publish_samples(s, lane, bad, samples)
    console.print(f"published {n} records")


def _publish_samples(s: OpalSettings, lane: Lane, bad: bool, samples: Path) -> int:
    from workers.kafka_clients import make_producer

    codec = EventCodec(ListingImageEvent, framing=framing_for(s.kafka.schema_registry_url, s.kafka.schema_registry_auth))
    topic = s.topics.images_realtime if lane is Lane.REALTIME else s.topics.images_backfill
    producer = make_producer(s.kafka)
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    records: list[tuple[bytes, bytes]] = []
    for item in load_samples(samples):
        ev = sample_event(item, lane)
        records.append((ev.listing_id.encode(), codec.encode(ev)))
    if bad:
        good = sample_event(load_samples(samples)[0], lane)
        records.append((b"bad-corrupt-bytes", b"this is not an avro record"))
        odd = good.model_copy(update={"listing_id": "bad-image-outside-root", "images": [ImageRef(uri="file:///etc/passwd")]})
        records.append((odd.listing_id.encode(), codec.encode(odd)))
    for key, value in records:
        producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
        producer.poll(0)
    remaining = producer.flush(30)
    if remaining or errors:
        raise RuntimeError(f"{remaining} records undelivered, errors: {errors[:3]}")
    return len(records)


@app.command("demo")
def demo(samples: Annotated[Path, typer.Option(help="Sample folder.")] = SAMPLE_DIR) -> None:
    """Run the whole pipeline on embedded defaults (broker, valkey, vLLM, worker) and print what happened."""
    _sigterm_as_interrupt()
    from opal.demo import print_result, run_demo

    print_result(console, run_demo(console, samples))


# -- evaluation --------------------------------------------------------------------------
def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                console.print(f"[red]{path}:{i}: not JSON ({e})[/]")
                raise typer.Exit(2) from None
    return rows


@eval_app.command("score")
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

    predictions = {str(r["id"]): str(r.get("output", "")) for r in _jsonl(pred)}
    references = _jsonl(ref)
    try:
        registry = CategoryRegistry(load_location(schemas)) if schemas else current_categories()
        report = score(predictions, references, registry)
    except (OpalError, ValueError) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
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


@eval_app.command("run")
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
        console.print(f"[red]unknown split {split!r}[/] (train, validation, test, all)")
        raise typer.Exit(2)
    if (endpoint is None) == (model is None):
        console.print("[red]give exactly one of --endpoint (a running server) and --model (a folder to serve)[/]")
        raise typer.Exit(2)
    server = None
    if model is not None:
        from opal.vllm_server import served_name, start_vllm

        _sigterm_as_interrupt()
        with console.status(f"starting vLLM on {model} ..."):
            try:
                server, endpoint = start_vllm(model, _settings().vllm, _settings().embedded.run_dir.resolve(), timeout_s=600)
            except OpalError as e:
                console.print(f"[red]{e}[/]", highlight=False)
                raise typer.Exit(2) from None
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
        repetition_penalty=_settings().vllm.repetition_penalty,  # the deployment's decoding, not the client's defaults
        frequency_penalty=_settings().vllm.frequency_penalty,
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
    from training.evaluate import PLOT_NOTE, plot_series, run_eval, tables, write_eval

    data, split = config.data, config.split
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("generating", total=None)
        try:
            result = asyncio.run(run_eval(config, progress=lambda done, total: bar.update(task, completed=done, total=total)))
        except (ValueError, OSError, OpalError) as e:  # no items, in-sample baselines, unreadable data, endpoint down
            console.print(f"[red]{e}[/]", highlight=False)
            raise typer.Exit(2) from None
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


# -- training data -----------------------------------------------------------------------
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


@data_app.command("mace")
def data_mace(
    abo: Annotated[Path, typer.Option(help="ABO-layout folder (listings.jsonl + images/).")] = SAMPLE_DIR,
    out: Annotated[Path, typer.Option(help="Output JSONL (appended; reruns skip done items).")] = Path(".opal/data/mace.jsonl"),
    endpoint: Annotated[str | None, typer.Option(help="MLLM endpoint (…/v1); unset: the deterministic pass only.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N records.")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
) -> None:
    """Refine seller titles and aspects: deterministic rules, then (with --endpoint) the MLLM against the image."""
    import asyncio
    import dataclasses
    import itertools

    from training.abo import load_abo
    from training.mace import refine
    from training.mllm_passes import PassSummary, run_mace

    reg = current_categories()
    records = list(itertools.islice(load_abo(abo, reg), limit))
    if endpoint:
        summary = asyncio.run(_with_client(endpoint, concurrency, lambda c: run_mace(records, c, out, reg, concurrency)))
    else:
        summary = PassSummary("mace (deterministic)", total=len(records))
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for r in records:
                d = refine(r.item_id, r.title, r.aspects, reg.resolve(r.category))
                for rem in d.removed:
                    summary.removed_by_reason[rem.reason] += 1
                f.write(
                    json.dumps(
                        {
                            "item_id": r.item_id,
                            "category": r.category,
                            "image": str(r.image),
                            "original": {"title": r.title, "aspects": r.aspects},
                            "deterministic": {
                                "removed": [dataclasses.asdict(x) for x in d.removed],
                                "dropped_aspects": [dataclasses.asdict(x) for x in d.dropped_aspects],
                            },
                            "refined": {"title": d.title, "aspects": d.aspects},
                            "qa": r.qa,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                summary.done += 1
        summary.save(out)  # the endpoint passes save their own
    _print_pass(summary, out)


@data_app.command("pairs")
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
    from training.sft import SftRunConfig, training_items

    reg = current_categories()
    try:
        items = training_items(SftRunConfig(base_model=Path("."), data=data, output_dir=Path("."), mace=mace, limit=limit), reg)
    except (ValueError, OSError) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None

    async def work(c: Any) -> Any:
        await c.served_model()  # fail fast, before any item, when the endpoint is down
        return await build_pairs(items, c, reg)

    try:
        summary = asyncio.run(_with_client(endpoint, concurrency, work))
    except (OpalError, ValueError, OSError) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    if summary.failed == summary.items:
        console.print(f"[red]all {summary.items} requests failed; {out} left as it was[/]")
        raise typer.Exit(1)
    write_pairs(summary.pairs, out)
    t = Table("verdict", "items", title=f"judged {summary.items - summary.failed} of {summary.items} train items")
    for verdict, n in sorted(summary.verdicts.items()):
        t.add_row(verdict, str(n))
    t.add_row("failed requests", str(summary.failed))
    console.print(t)
    console.print(f"wrote {len(summary.pairs)} preference pairs to {out}", highlight=False)


@data_app.command("lacu")
def data_lacu(
    mace: Annotated[Path, typer.Option(help="MACE output JSONL.")] = Path(".opal/data/mace.jsonl"),
    out: Annotated[Path, typer.Option(help="Output JSONL of conversations.")] = Path(".opal/data/lacu.jsonl"),
    endpoint: Annotated[str | None, typer.Option(help="Text-LLM endpoint (…/v1); unset: built from the listing and its Q&A.")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
) -> None:
    """Buyer/seller conversations (at least five rounds) about each refined listing."""
    import asyncio
    import dataclasses

    from training.lacu import contradictions, conversation_from_listing, to_sft_messages
    from training.mllm_passes import PassSummary, run_lacu

    reg = current_categories()
    rows = _jsonl(mace)
    if endpoint:
        summary = asyncio.run(_with_client(endpoint, concurrency, lambda c: run_lacu(rows, c, out, reg, concurrency)))
    else:
        summary = PassSummary("lacu (from the listing)", total=len(rows))
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for row in rows:
                cat = reg.resolve(row["category"])
                qa = [(q, a) for q, a in row.get("qa", [])]
                turns = conversation_from_listing(row["refined"]["title"], row["refined"]["aspects"], cat, qa)
                if contradictions(turns, row["refined"]["aspects"], cat):
                    summary.failures["contradiction"] += 1
                    continue
                f.write(
                    json.dumps(
                        {
                            "item_id": row["item_id"],
                            "image": row.get("image"),
                            "turns": [dataclasses.asdict(t) for t in turns],
                            "messages": to_sft_messages(turns),
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                summary.done += 1
        summary.save(out)  # the endpoint passes save their own
    _print_pass(summary, out)


# -- workers -----------------------------------------------------------------------------
@worker_app.command("enrich")
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
    s = _settings()
    _require_kafka(s)
    metrics = WorkerMetrics()
    port = metrics.serve(s.worker.metrics_port if metrics_port is None else metrics_port)
    console.print(f"metrics on http://127.0.0.1:{port}/metrics", highlight=False)
    note = announce(s.embedded.run_dir, "enrich", f"http://127.0.0.1:{port}/metrics")  # for `opal worker status`

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        w = await run_worker(s, stop, idle_exit_s=idle_exit, metrics=metrics)
        console.print(f"enrich worker stopped after {w.outputs} outputs")

    try:
        asyncio.run(main())
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    except FatalWorkerError as e:
        console.print(f"[red]enrich worker stopped on a fatal error (unfinished records are replayed on restart): {e}[/]")
        raise typer.Exit(1) from None
    finally:
        withdraw(note)


@worker_app.command("status")
def worker_status(
    url: Annotated[
        list[str] | None, typer.Option("--url", help="A worker's /metrics URL (repeatable); default: every running worker of this run dir.")
    ] = None,
) -> None:
    """What each running worker holds: in flight, oldest record's age, lag and commit lag per partition, open breakers."""
    from workers.status import announced, scrape

    s = _settings()
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


@worker_app.command("index")
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
    s = _settings()
    _require_kafka(s)
    _require_redis(s)
    metrics = IndexerMetrics()
    console.print(f"metrics on http://127.0.0.1:{metrics.serve(metrics_port)}/metrics", highlight=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        st = build_indexer(s, batch_size, metrics=metrics).run(stop, idle_exit_s=idle_exit)
    except IndexerError as e:
        console.print(f"[red]indexer stopped: {e}[/]")
        raise typer.Exit(1) from None
    table = Table("indexed", "deleted", "skipped (replays)", "dead letters", "batches", title="search indexer")
    table.add_row(*(str(v) for v in (st.indexed, st.deleted, st.skipped, st.dead_lettered, st.batches)))
    console.print(table)


@worker_app.command("judge")
def worker_judge(
    log_level: Annotated[str, typer.Option(help="Logging level of the faust worker.")] = "WARNING",
) -> None:
    """Judge low-confidence listings (faust agent): outcomes to the judge topic, bottom verdicts to the preference topic."""
    import functools
    from collections import Counter

    from training.judge import judge_event
    from workers.judge_agent import build_judge_app

    s = _settings()
    _require_kafka(s)
    counts: Counter[str] = Counter()
    app = build_judge_app(s, functools.partial(judge_event, categories=current_categories()), counts)
    _run_faust(app, counts, "judge agent", log_level)


def _run_faust(app: Any, counts: Any, title: str, log_level: str) -> None:
    """Run a faust app until SIGTERM/Ctrl-C (faust's worker stops the agents, commits, leaves), then print its counts."""
    import faust

    try:
        faust.Worker(app, loglevel=log_level.lower(), quiet=True).execute_from_commandline()
    finally:
        t = Table("what", "events", title=title)
        for k, v in sorted(counts.items()):
            t.add_row(k, str(v))
        console.print(t)


@worker_app.command("preferences")
def worker_preferences(
    out: Annotated[Path, typer.Option(help="Folder of DPO shards (pairs-<model version>.jsonl), appended to.")] = Path(
        ".opal/data/preferences"
    ),
    log_level: Annotated[str, typer.Option(help="Logging level of the faust worker.")] = "WARNING",
) -> None:
    """Build the next DPO set (faust agent): new preference pairs appended to one shard per model version."""
    from collections import Counter

    from workers.preference_builder import build_preference_app

    s = _settings()
    _require_kafka(s)
    _require_redis(s)
    counts: Counter[str] = Counter()
    app = build_preference_app(s, out, counts)
    _run_faust(app, counts, "preference-set builder", log_level)


@app.command("search")
def search(
    aspect: Annotated[list[str] | None, typer.Option("--aspect", "-a", help="NAME=VALUE; repeat to AND several.")] = None,
    category: Annotated[str | None, typer.Option(help="Only this category.")] = None,
    text: Annotated[str, typer.Option(help="Words that must all be in the title.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="Most hits printed.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
) -> None:
    """Query the search index the indexer keeps (exact aspect values, case-insensitive)."""
    from workers.search_index import SearchIndex, parse_aspect_filters

    s = _settings()
    _require_redis(s)
    import redis

    try:
        filters = parse_aspect_filters(aspect or [])
        index = SearchIndex.from_url(s.redis.url_value(), s.redis.key_prefix)
        total, hits = index.search(filters, category, text, limit)
        indexed = index.count()
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    except redis.RedisError as e:
        console.print(f"[red]Redis unavailable: {e}[/]")
        raise typer.Exit(2) from None
    if as_json:
        for h in hits:
            print(json.dumps({"listing_id": h.listing_id, "title": h.title, "category": h.category, "aspects": h.aspects}))
        return
    table = Table("listing", "category", "title", "aspects", title=f"{total} match(es) in {indexed} indexed listings")
    for h in hits:
        table.add_row(h.listing_id, h.category, h.title, ", ".join(f"{k}: {v}" for k, v in h.aspects.items()))
    console.print(table)


# -- model side ---------------------------------------------------------------------------
def _in_model_env(args: list[str]) -> None:
    """Run this CLI command again in the model-side interpreter when this one lacks torch."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("torch") is not None:
        return
    from opal.vllm_server import model_python

    py = model_python(OpalSettings().vllm.python)
    raise typer.Exit(subprocess.call([str(py), "-m", "opal.cli", *args]))


@model_app.command("init-tiny")
def model_init_tiny(
    out: Annotated[Path, typer.Option(help="Folder to write the model into.")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives byte-identical files.")] = 0,
) -> None:
    """Build a tiny random-weight Qwen2-VL (tokenizer, processor, weights) with no downloads."""
    _in_model_env(["model", "init-tiny", "--out", str(out), "--seed", str(seed)])
    from training.tiny_model import TinyModelConfig, build_tiny_model

    with console.status("building tiny Qwen2-VL ..."):
        card = build_tiny_model(out, TinyModelConfig(seed=seed))
    t = Table("field", "value", title=f"model in {out}")
    for k in ("name", "version", "parameters"):
        t.add_row(k, card[k])
    console.print(t)


@model_app.command("card")
def model_card(
    model: Annotated[Path, typer.Option(help="Trained model folder (opal_model.json).")],
    eval_dir: Annotated[Path, typer.Option("--eval", help="`opal eval run --out` folder of an evaluation of this model.")],
    reproduce: Annotated[str, typer.Option(help="The command that rebuilds the model (shown in the card).")] = "make demo-model",
) -> None:
    """Write the model card: test metrics into opal_model.json and README.md (data, attribution, recipe, evaluation)."""
    from opal.model_card import write_card

    try:
        card = write_card(model, eval_dir, reproduce)
    except (ValueError, OSError, KeyError) as e:
        console.print(f"[red]{e}[/]", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"wrote {model / 'README.md'} and test_metrics into {model / 'opal_model.json'} ({card['version']})", highlight=False)


@train_app.command("sft")
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
    _in_model_env(sys.argv[1:])
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
    try:
        chosen, why = choose_recipe(base, recipe)
        effective, overridden = apply_overrides(chosen, overrides)
        if no_deepspeed:  # --deepspeed none switches the recipe's DeepSpeed off
            effective, overridden = replace(effective, deepspeed=None), overridden | {"deepspeed"}
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
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
    try:
        result = run_sft(config, reporter=reporter)
    except (ValueError, OSError) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
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


@train_app.command("dpo")
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
    _in_model_env(sys.argv[1:])
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
    try:
        result = run_dpo(config)
    except (ValueError, OSError) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
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


@experiment_app.command("ablation")
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
    _sigterm_as_interrupt()
    from opal.ablation import COLUMNS, GUARANTEED, LABELS, Ablation, AblationConfig, StepFailed, fmt
    from training.progress import Reporter

    config = AblationConfig(
        data=data, out=out, base=base, seed=seed, pairs_items=pairs_items, dpo_epochs=dpo_epochs, concurrency=concurrency
    )
    if not (data / "listings.jsonl").is_file():
        console.print(f"[red]{data} has no listings.jsonl (an ABO-format folder is needed)[/]", highlight=False)
        raise typer.Exit(2)
    try:
        report = Ablation(config, Reporter(console)).run()
    except (ValueError, OSError, OpalError, StepFailed) as e:
        console.print(f"[red]{e}[/]", highlight=False)
        console.print("finished steps are kept: rerun the same command to continue", highlight=False)
        raise typer.Exit(2) from None
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


@app.command("serve")
def serve(
    model: Annotated[Path, typer.Option(help="Model folder (config.json, weights, processor).")],
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 8000,
    timeout_s: Annotated[float, typer.Option(help="Longest wait for /health.")] = 300.0,
    stop_grace_s: Annotated[float, typer.Option(help="On Ctrl-C/SIGTERM: seconds vLLM gets to exit before SIGKILL.")] = 5.0,
) -> None:
    """Run a real vLLM OpenAI-compatible server for MODEL until Ctrl-C or SIGTERM.

    Stopping: SIGTERM to the server and every process it started, SIGKILL to survivors
    after --stop-grace-s, then exit once the port is free. Further signals during that
    are ignored (the stop is bounded anyway). If this process is SIGKILLed instead, the
    server and its engine processes are SIGKILLed with it.
    """
    _sigterm_as_interrupt()
    from opal.vllm_server import served_name, start_vllm

    s = OpalSettings()
    run_dir = s.embedded.run_dir.resolve()
    with console.status(f"starting vLLM on {model} ..."):
        proc, url = start_vllm(model, s.vllm, run_dir, port=port or None, timeout_s=timeout_s, stop_grace_s=stop_grace_s)
    console.print(f"serving [bold]{served_name(model.resolve())}[/] at {url}  (log: {proc.log_path}); Ctrl-C stops it")
    print(f"export OPAL_VLLM_ENDPOINTS='[\"{url}\"]'", flush=True)
    try:
        while proc.alive():
            time.sleep(0.5)
        console.print(f"[red]vLLM exited.[/] Log tail:\n{proc.log_tail()}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM/Ctrl-C must not cut the SIGKILL escalation short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        proc.stop(timeout_s=stop_grace_s)


@app.command("generate")
def generate(
    image: Annotated[Path, typer.Argument(help="Product photo (JPEG/PNG/WebP).")],
    category: Annotated[str, typer.Option(help="Category slug (see `opal schemas categories`).")],
    endpoint: Annotated[str | None, typer.Option(help="vLLM base URL ending in /v1; default OPAL_VLLM_ENDPOINTS.")] = None,
) -> None:
    """Write one listing for IMAGE through the configured vLLM endpoint(s)."""
    import asyncio

    from inference.client import ListingClient

    s = OpalSettings()
    endpoints = [endpoint] if endpoint else s.vllm.endpoints
    if not endpoints:
        console.print("[red]No endpoint.[/] Pass --endpoint or set OPAL_VLLM_ENDPOINTS (see `opal serve`).")
        raise typer.Exit(2)

    async def run() -> Any:
        async with ListingClient(
            endpoints,
            model=s.vllm.model,
            timeout_s=s.vllm.request_timeout_s,
            max_retries=s.vllm.max_retries,
            repetition_penalty=s.vllm.repetition_penalty,
            frequency_penalty=s.vllm.frequency_penalty,
        ) as c:
            return await c.generate([image.read_bytes()], category)

    try:
        r = asyncio.run(run())
    except OpalError as e:
        console.print(f"[red]{type(e).__name__} ({e.reason}):[/] {e}")
        raise typer.Exit(1) from None
    t = Table("aspect", "value", "confidence", title=f"{r.listing.title}")
    for k, v in r.listing.aspects.items():
        conf = r.aspect_confidence.get(k)
        t.add_row(k, v, "" if conf is None else f"{conf:.2f}")
    console.print(t)
    console.print(f"model {r.model.name} {r.model.version} · {r.inference_ms:.0f} ms · {r.completion_tokens} tokens")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
