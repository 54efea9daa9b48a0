"""`opal search`: query the Redis search index that `opal worker index` keeps."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from opal.commands.common import console, fail, require_redis, resolved_settings


def search(
    aspect: Annotated[list[str] | None, typer.Option("--aspect", "-a", help="NAME=VALUE; repeat to AND several.")] = None,
    category: Annotated[str | None, typer.Option(help="Only this category.")] = None,
    text: Annotated[str, typer.Option(help="Words that must all be in the title.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="Most hits printed.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
) -> None:
    """Query the search index the indexer keeps (exact aspect values, case-insensitive)."""
    from workers.search_index import SearchIndex, parse_aspect_filters

    s = resolved_settings()
    require_redis(s)
    import redis

    try:
        filters = parse_aspect_filters(aspect or [])
        index = SearchIndex.from_url(s.redis.url_value(), s.redis.key_prefix)
        total, hits = index.search(filters, category, text, limit)
        indexed = index.count()
    except ValueError as e:
        raise fail(str(e)) from None
    except redis.RedisError as e:
        raise fail(f"Redis unavailable: {e}") from None
    if as_json:
        for h in hits:
            print(json.dumps({"listing_id": h.listing_id, "title": h.title, "category": h.category, "aspects": h.aspects}))
        return
    table = Table("listing", "category", "title", "aspects", title=f"{total} match(es) in {indexed} indexed listings")
    for h in hits:
        table.add_row(h.listing_id, h.category, h.title, ", ".join(f"{k}: {v}" for k, v in h.aspects.items()))
    console.print(table)
