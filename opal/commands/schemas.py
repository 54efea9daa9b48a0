"""`opal schemas ...`: list, export, import and induce category schemas (registered by ``opal.cli``).

Every command reads the schema locations from ``OPAL_SCHEMAS_PATHS`` (default: the packaged
set, :mod:`schemas.schema_source`). Nothing here writes into a schema location unless
asked to with ``--write``/``--out``; a running worker picks a written file up by itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from opal.commands.common import console, current_categories, exits_on, fail
from schemas.bulk import dump_bulk, read_bulk, to_bulk
from schemas.errors import UnknownCategoryError
from schemas.schema_diff import SchemaDiff, bump_versions, diff_schemas
from schemas.schema_source import load_location
from schemas.settings import OpalSettings

app = typer.Typer(help="Category schemas: list, export, import, induce from a catalogue.", no_args_is_help=True)


@app.command("categories")
def schemas_categories() -> None:
    """List the category aspect schemas of the configured locations."""
    reg = current_categories()
    t = Table("category", "version", "name", "aspects", "visual", "required", "closed sets", title=f"{len(reg)} category schemas")
    for name in reg.names:
        c = reg.get(name)
        t.add_row(
            name,
            str(c.version),
            c.display_name,
            str(len(c.aspects)),
            str(len(c.visual_aspects)),
            ", ".join(a.name for a in c.aspects if a.required),
            str(sum(1 for a in c.aspects if a.values is not None)),
        )
    console.print(t)
    console.print(f"from {', '.join(map(str, OpalSettings().schemas.paths))}; any other category gets the generic schema")


@app.command("json-schema")
def schemas_json_schema(
    category: str, all_aspects: Annotated[bool, typer.Option("--all", help="Include non-visual aspects.")] = False
) -> None:
    """Print the JSON Schema that constrained decoding uses for CATEGORY (the generic one for an unknown category)."""
    reg = current_categories()
    if category not in reg:
        hint = UnknownCategoryError(category, reg.names)
        Console(stderr=True).print(f"[yellow]{hint}[/]: listings of it get the generic schema", highlight=False)
    print(json.dumps(reg.resolve(category).json_schema(all_aspects), indent=2))


@app.command("export")
def schemas_export(
    out: Annotated[Path, typer.Option(help="Bulk file to write (opal.category-schemas/1, docs/SCHEMAS.md).")],
    tree_version: Annotated[str, typer.Option(help="Version label written into the file.")] = "",
) -> None:
    """Write the configured schema set as one bulk file (what `opal schemas import` reads)."""
    reg = current_categories()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_bulk(to_bulk(reg.schemas.values(), tree_version, "opal schemas export")))
    console.print(f"wrote {len(reg)} category schemas to {out}")


def print_diff(d: SchemaDiff, title: str) -> None:
    t = Table("change", "category", "details", title=title)
    for c in d.added:
        t.add_row("[green]added[/]", c, "")
    for c in d.removed:
        t.add_row("[red]removed[/]", c, "")
    for ch in d.changed:
        t.add_row("[yellow]changed[/]", ch.category, f"v{ch.old_version} -> v{ch.new_version}: {ch.summary()}")
    console.print(t)
    console.print(f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed, {d.unchanged} unchanged")


@app.command("import")
def schemas_import(
    file: Annotated[Path, typer.Argument(help="A bulk file (opal.category-schemas/1) or a folder of per-category files.")],
    write: Annotated[Path | None, typer.Option(help="Write the accepted set as a bulk file here (a file in OPAL_SCHEMAS_PATHS).")] = None,
    merge: Annotated[bool, typer.Option(help="Keep current categories the file does not mention (default: it is the whole set).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the change report as one JSON object.")] = False,
) -> None:
    """Validate FILE, report what it changes against the configured set, and with --write accept it.

    Categories whose aspects changed get a version above the current one when FILE did not raise it,
    so cached results and AspectEvents name the schema they were really checked against.
    """
    try:
        incoming = load_location(file)
    except (ValueError, OSError) as e:
        raise fail(f"not imported: {e}") from None
    current = current_categories().schemas
    proposed = {**current, **incoming} if merge else incoming
    accepted = bump_versions(current, proposed)
    d = diff_schemas(current, accepted)
    if as_json:
        print(
            json.dumps(
                {
                    "added": d.added,
                    "removed": d.removed,
                    "changed": {c.category: {"version": [c.old_version, c.new_version], "summary": c.summary()} for c in d.changed},
                    "unchanged": d.unchanged,
                }
            )
        )
    else:
        print_diff(d, f"{file} against the configured set ({len(current)} categories)")
    if write is None:
        console.print("dry run: nothing written (pass --write PATH to accept)")
        return
    write.parent.mkdir(parents=True, exist_ok=True)
    tmp = write.with_suffix(write.suffix + ".tmp")
    tmp.write_text(dump_bulk(to_bulk(accepted.values(), "", f"opal schemas import {file.name}")))
    tmp.replace(write)  # atomic: a worker watching the file never reads half of it
    console.print(f"wrote {len(accepted)} category schemas to {write}")


@app.command("induce")
def schemas_induce(
    data: Annotated[Path, typer.Option(help="Catalogue folder with listings.jsonl (product_type, title, color, qa; the ABO layout).")],
    out: Annotated[Path, typer.Option(help="Bulk file to write; the review table goes beside it (.review.md).")] = Path(
        "induced-schemas.json"
    ),
) -> None:
    """Propose a schema for every category of a catalogue from its own evidence (training/induce.py).

    Deterministic: the same catalogue gives the same file. Accept it with `opal schemas import OUT --write PATH`
    or list OUT in OPAL_SCHEMAS_PATHS.
    """
    from training.induce import bulk_document, induce, read_catalogue, review_markdown

    with exits_on(ValueError, OSError):
        rows = read_catalogue(data)
    console.print(f"read {len(rows)} listings from {data}")
    induced = induce(rows)
    source = f"opal schemas induce on {data.resolve().name}/ ({len(rows)} listings)"
    doc = bulk_document(induced, source)
    read_bulk(doc)  # what we write must load
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_bulk(doc))
    review = out.with_suffix(".review.md")
    review.write_text(review_markdown(induced, source))
    t = Table("category", "items", "confidence", "aspects", "required", "review", title=f"{len(induced)} induced schemas (largest 15)")
    for c in sorted(induced, key=lambda c: (-c.items, c.schema.category))[:15]:
        t.add_row(
            c.schema.category,
            str(c.items),
            f"{c.confidence:.2f}",
            str(len(c.schema.aspects)),
            ", ".join(a.name for a in c.schema.aspects if a.required),
            "yes" if c.review else "",
        )
    console.print(t)
    console.print(
        f"wrote {len(induced)} schemas to {out} and the review table to {review} ({sum(c.review for c in induced)} marked for review)"
    )
