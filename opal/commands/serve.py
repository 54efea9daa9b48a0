"""`opal serve` and `opal generate`: a real vLLM server for a model folder, and one listing through an endpoint."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from opal.commands.common import console, fail, sigterm_as_interrupt
from schemas.errors import OpalError
from schemas.settings import OpalSettings


def serve(
    model: Annotated[
        Path | None, typer.Option(help="Model folder (config.json, weights, processor); default: the deployment's current version.")
    ] = None,
    port: Annotated[int, typer.Option(help="Port; 0 picks a free one.")] = 8000,
    timeout_s: Annotated[float, typer.Option(help="Longest wait for /health.")] = 300.0,
    stop_grace_s: Annotated[float, typer.Option(help="On Ctrl-C/SIGTERM: seconds vLLM gets to exit before SIGKILL.")] = 5.0,
    warm_up: Annotated[
        bool, typer.Option(help="Report healthy only after one listing request (compiles kernels before the first user's).")
    ] = True,
) -> None:
    """Run a real vLLM OpenAI-compatible server for MODEL until Ctrl-C or SIGTERM.

    Without --model, the registry's current version for OPAL_MODELS_DEPLOYMENT is served
    (`opal model promote`). Stopping: SIGTERM to the server and every process it started, SIGKILL to survivors
    after --stop-grace-s, then exit once the port is free. Further signals during that
    are ignored (the stop is bounded anyway). If this process is SIGKILLed instead, the
    server and its engine processes are SIGKILLed with it.
    """
    sigterm_as_interrupt()
    from opal.vllm_server import served_name, start_vllm

    s = OpalSettings()
    source = ""
    if model is None:
        from training.registry import ModelRegistry

        entry = ModelRegistry(s.models.registry).current(s.models.deployment)
        if entry is None:
            raise fail(
                f"No --model and no current version for deployment {s.models.deployment!r} in {s.models.registry}.",
                " Register one: `opal model register DIR --promote`.",
            )
        model, source = entry.path, f" (current of deployment {s.models.deployment})"
    run_dir = s.embedded.run_dir.resolve()
    with console.status(f"starting vLLM on {model} ..."):
        proc, url = start_vllm(model, s.vllm, run_dir, port=port or None, timeout_s=timeout_s, stop_grace_s=stop_grace_s, warm_up=warm_up)
    console.print(f"serving [bold]{served_name(model.resolve())}[/]{source} at {url}  (log: {proc.log_path}); Ctrl-C stops it")
    print(f"export OPAL_VLLM_ENDPOINTS='[\"{url}\"]'", flush=True)
    try:
        while proc.alive():
            time.sleep(0.5)
        raise fail("vLLM exited.", f" Log tail:\n{proc.log_tail()}", code=1)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM/Ctrl-C must not cut the SIGKILL escalation short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        proc.stop(timeout_s=stop_grace_s)


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
        raise fail("No endpoint.", " Pass --endpoint or set OPAL_VLLM_ENDPOINTS (see `opal serve`).")

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
        raise fail(f"{type(e).__name__} ({e.reason}):", f" {e}", code=1) from None
    t = Table("aspect", "value", "confidence", title=f"{r.listing.title}")
    for k, v in r.listing.aspects.items():
        conf = r.aspect_confidence.get(k)
        t.add_row(k, v, "" if conf is None else f"{conf:.2f}")
    console.print(t)
    console.print(f"model {r.model.name} {r.model.version} · {r.inference_ms:.0f} ms · {r.completion_tokens} tokens")
