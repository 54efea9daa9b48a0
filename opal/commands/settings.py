"""`opal settings`: every setting with its environment variable and value (secrets masked)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from opal.commands.common import console, resolved_settings


def settings_cmd(markdown: Annotated[bool, typer.Option(help="Print a Markdown table (as in the README).")] = False) -> None:
    """Print every setting, its environment variable and value (secrets masked)."""
    rows = resolved_settings().describe()
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
