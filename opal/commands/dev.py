"""`opal dev ...`: the embedded local services (tansu broker, valkey) in the background."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from opal.commands.common import console, fail
from opal.embedded import read_state, stop_detached, up_detached
from schemas.settings import OpalSettings

app = typer.Typer(help="Embedded local services (tansu broker, valkey).", no_args_is_help=True)


@app.command("up")
def dev_up(
    storage: Annotated[
        str | None,
        typer.Option(help="Broker storage: memory or s3 (durable, via a local moto server). Default: OPAL_EMBEDDED_BROKER_STORAGE."),
    ] = None,
) -> None:
    """Start tansu and valkey in the background (restart only what is down); print the variables to use them."""
    if storage not in (None, "memory", "s3"):
        raise fail("--storage must be memory or s3", f", not {storage!r}")
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


@app.command("restart")
def dev_restart(
    service: Annotated[str, typer.Argument(help="kafka, redis or s3.")],
) -> None:
    """Restart one background service on its recorded port (kafka on s3 storage keeps its data)."""
    from opal.embedded import ServiceStartError, restart_service

    s = OpalSettings()
    try:
        proc = restart_service(s.embedded.run_dir, service, timeout_s=s.embedded.start_timeout_s)
    except LookupError as e:
        raise fail(str(e)) from None
    except ServiceStartError as e:
        raise fail(f"{service} did not come back:", f" {e}", code=1) from None
    console.print(f"{service}: {proc.name} pid {proc.pid} on 127.0.0.1:{proc.port}")


@app.command("down")
def dev_down() -> None:
    """Stop the background services started by `opal dev up`."""
    stopped = stop_detached(OpalSettings().embedded.run_dir)
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command("status")
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
