"""What every command module shares: the console, settings, required services, error exits and JSONL input."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from opal.embedded import resolve_settings
from schemas.category import CategoryRegistry
from schemas.schema_source import configured_categories
from schemas.settings import OpalSettings

console = Console()


def resolved_settings() -> OpalSettings:
    """``OPAL_*`` settings, with Kafka and Redis of a running `opal dev up` stack where they are unset."""
    return resolve_settings(OpalSettings())


def current_categories() -> CategoryRegistry:
    """The registry of the configured schema locations (``OPAL_SCHEMAS_PATHS``)."""
    return configured_categories(OpalSettings().schemas.paths)


def fail(message: str, after: str = "", *, code: int = 2, highlight: bool = True) -> typer.Exit:
    """Print ``message`` in red (then ``after`` as it is) and return the exit for the caller to raise.

    ``raise fail(str(e)) from None`` ends a command with exit code ``code`` (2: bad input or an unusable service).
    """
    console.print(f"[red]{message}[/]{after}", highlight=highlight)
    return typer.Exit(code)


@contextmanager
def exits_on(*errors: type[Exception], code: int = 2, highlight: bool = True) -> Iterator[None]:
    """Turn any of ``errors`` raised in the block into :func:`fail` with the error's text."""
    try:
        yield
    except errors as e:
        raise fail(str(e), code=code, highlight=highlight) from None


def require_kafka(s: OpalSettings) -> None:
    if not s.kafka.bootstrap:
        raise fail("No Kafka configured.", " Set OPAL_KAFKA_BOOTSTRAP or run `opal dev up` first.")


def require_redis(s: OpalSettings) -> None:
    if not s.redis.url:
        raise fail("No Redis configured.", " Set OPAL_REDIS_URL or run `opal dev up` first.")


def sigterm_as_interrupt() -> None:
    """Let SIGTERM unwind like Ctrl-C, so context managers stop child services."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped); exit 2 naming the first line that is not JSON."""
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise fail(f"{path}:{i}: not JSON ({e})") from None
    return rows


def in_model_env(args: list[str]) -> None:
    """Run this CLI command again in the model-side interpreter when this one lacks torch."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("torch") is not None:
        return
    from opal.vllm_server import model_python

    py = model_python(OpalSettings().vllm.python)
    raise typer.Exit(subprocess.call([str(py), "-m", "opal.cli", *args]))
