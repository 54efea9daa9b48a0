"""The `opal` command line: the one place that wires every layer together.

Every command reads :class:`~schemas.settings.OpalSettings` from ``OPAL_*``
variables. Where ``OPAL_KAFKA_BOOTSTRAP`` / ``OPAL_REDIS_URL`` are unset, commands
use a stack started by ``opal dev up`` if one runs, and ``opal demo`` starts its own.

Contract (as vLLM's CLI, ``vllm/entrypoints/cli/main.py``, maps command names to modules)
- :data:`COMMANDS` is the whole command tree's top level: command name -> module and
  attribute (a command function, or the ``typer.Typer`` of a command group) and its
  one-line help, in the order ``opal --help`` lists them.
- Only the module of the command actually invoked is imported (:class:`LazyGroup`), so a
  command module may import what its commands need at module level: the stream side's
  Kafka/faust/Redis clients, or the model side's torch/TRL, each present in one of the two
  environments only (``.venv``, ``.venv-model``). Helpers all commands share live in
  :mod:`opal.commands.common`, which must load in both.
- ``opal --help`` lists every command with the table's help and imports no command module;
  ``opal <command> --help`` imports that command's module and prints its own help.
- Model-side commands re-run themselves in ``.venv-model`` through
  :func:`opal.commands.common.in_model_env` (``python -m opal.cli ...``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import typer
from typer.core import TyperCommand, TyperGroup

from opal import __version__
from opal.commands.common import console


@dataclass(frozen=True)
class LazyCommand:
    """Where a command lives: ``module``'s ``attr`` (a command function or a ``typer.Typer`` group), and its help line."""

    module: str
    attr: str
    help: str

    def load(self, name: str) -> Any:
        """Import the module and build the click command named ``name`` (a group for a ``typer.Typer``)."""
        target = getattr(importlib.import_module(self.module), self.attr)
        if isinstance(target, typer.Typer):
            command: Any = typer.main.get_group(target)
        else:
            single = typer.Typer(add_completion=False)
            single.command(name)(target)
            command = typer.main.get_command(single)
        command.name = name
        return command


COMMANDS: dict[str, LazyCommand] = {
    # top-level commands, then the groups, in the order `opal --help` lists them
    "settings": LazyCommand(
        "opal.commands.settings", "settings_cmd", "Print every setting, its environment variable and value (secrets masked)."
    ),
    "demo": LazyCommand(
        "opal.commands.demo", "demo", "Run the whole pipeline on embedded defaults (broker, valkey, vLLM, worker) and print what happened."
    ),
    "search": LazyCommand(
        "opal.commands.search", "search", "Query the search index the indexer keeps (exact aspect values, case-insensitive)."
    ),
    "serve": LazyCommand("opal.commands.serve", "serve", "Run a real vLLM OpenAI-compatible server for MODEL until Ctrl-C or SIGTERM."),
    "generate": LazyCommand("opal.commands.serve", "generate", "Write one listing for IMAGE through the configured vLLM endpoint(s)."),
    "backfill": LazyCommand(
        "opal.commands.backfill", "backfill", "Publish one ListingImageEvent per inventory row on the backfill lane, resumably."
    ),
    "dev": LazyCommand("opal.commands.dev", "app", "Embedded local services (tansu broker, valkey)."),
    "topology": LazyCommand("opal.commands.topology", "app", "Kafka topics and consumer groups."),
    "schemas": LazyCommand("opal.commands.schemas", "app", "Category schemas: list, export, import, induce from a catalogue."),
    "events": LazyCommand("opal.commands.events", "app", "Publish and inspect events."),
    "model": LazyCommand(
        "opal.commands.model", "app", "Model folders: build the tiny model, write cards, register, promote and roll back versions."
    ),
    "worker": LazyCommand("opal.commands.worker", "app", "Long-running stream workers."),
    "dlq": LazyCommand("opal.commands.dlq", "app", "Dead letters: list them by origin and reason, replay them by reason."),
    "eval": LazyCommand("opal.commands.eval", "app", "Score generated listings with the paper's metrics."),
    "data": LazyCommand("opal.commands.data", "app", "Training data: MACE refinement and LACU conversations."),
    "train": LazyCommand("opal.commands.train", "app", "Train OPAL models: SFT and DPO (runs in the model environment)."),
    "experiment": LazyCommand("opal.commands.experiment", "app", "Experiments over the whole pipeline (train, serve, evaluate)."),
    "loop": LazyCommand("opal.commands.loop", "app", "Close the loop: judge pairs -> DPO -> evaluation gate -> promotion."),
}


class LazyGroup(TyperGroup):
    """A command group whose commands are imported on first use, from the :attr:`table` of a subclass.

    ``commands`` holds a placeholder (name and help line, no options) for each command until
    :meth:`get_command` replaces it with the real one; help listings (``format_help``) show the placeholders, so
    listing the commands imports none of them. Typo suggestions see every name.
    """

    table: ClassVar[Mapping[str, LazyCommand]] = {}

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self._listing = False
        self._loaded: set[str] = set()
        for name, entry in self.table.items():
            self.commands.setdefault(name, TyperCommand(name, help=entry.help))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The command ``cmd_name`` (its module imported now), or its placeholder while help is being listed."""
        if cmd_name in self.table and cmd_name not in self._loaded and not self._listing:
            self.commands[cmd_name] = self.table[cmd_name].load(cmd_name)
            self._loaded.add(cmd_name)
        return self.commands.get(cmd_name)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


class OpalGroup(LazyGroup):
    """The top level of `opal`: :data:`COMMANDS`."""

    table = COMMANDS


app = typer.Typer(
    cls=OpalGroup, help="OPAL: product photo -> schema-compliant marketplace listing.", no_args_is_help=True, add_completion=False
)


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
