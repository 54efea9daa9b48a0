"""The `opal` command line: the one place that wires every layer together.

Every command reads :class:`~schemas.settings.OpalSettings` from ``OPAL_*``
variables. Where ``OPAL_KAFKA_BOOTSTRAP`` / ``OPAL_REDIS_URL`` are unset, commands
use a stack started by ``opal dev up`` if one runs, and ``opal demo`` starts its own.

This module only builds the command tree: each command group is a module of
:mod:`opal.commands` (helpers they share in :mod:`opal.commands.common`).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from opal import __version__
from opal.commands import (
    backfill,
    data,
    demo,
    dev,
    dlq,
    events,
    experiment,
    loop,
    model,
    schemas,
    search,
    serve,
    settings,
    topology,
    train,
    worker,
)
from opal.commands import eval as eval_  # the module is named after its command; the alias keeps the builtin eval unshadowed
from opal.commands.common import console

app = typer.Typer(help="OPAL: product photo -> schema-compliant marketplace listing.", no_args_is_help=True, add_completion=False)

# Top-level commands, then the groups, each in the order `opal --help` lists them.
app.command("settings")(settings.settings_cmd)
app.command("demo")(demo.demo)
app.command("search")(search.search)
app.command("serve")(serve.serve)
app.command("generate")(serve.generate)
app.command("backfill")(backfill.backfill)
for name, group in (
    ("dev", dev.app),
    ("topology", topology.app),
    ("schemas", schemas.app),
    ("events", events.app),
    ("model", model.app),
    ("worker", worker.app),
    ("dlq", dlq.app),
    ("eval", eval_.app),
    ("data", data.app),
    ("train", train.app),
    ("experiment", experiment.app),
    ("loop", loop.app),
):
    app.add_typer(group, name=name)


@app.callback(invoke_without_command=True)
def _main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False) -> None:
    if version:
        console.print(f"opal {__version__}")
        raise typer.Exit()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
