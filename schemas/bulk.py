"""The bulk category-schema format: every category of a taxonomy in one JSON file.

Marketplaces publish their taxonomy as one download of all leaf categories with the
aspects of each (eBay's Taxonomy API ``fetchItemAspects``: per aspect a usage, a
cardinality, a mode and the allowed values). OPAL's bulk format keeps those words, so an
export from a marketplace maps onto it field by field (``docs/SCHEMAS.md``)::

    {
      "format": "opal.category-schemas/1",
      "tree_version": "2026-11-30",
      "categories": [
        {"category_id": "suitcase", "category_name": "Suitcase", "version": 1, "title_max_chars": 120,
         "aspects": [
           {"name": "Color", "usage": "REQUIRED", "cardinality": "SINGLE", "mode": "SELECTION_ONLY",
            "values": ["black", "blue"], "visual": true},
           {"name": "Brand", "usage": "OPTIONAL", "cardinality": "SINGLE", "mode": "FREE_TEXT",
            "values": ["amazonbasics"], "visual": true}
         ]}
      ]
    }

- ``usage``: ``REQUIRED`` (a generated listing must carry it), ``RECOMMENDED``, ``OPTIONAL``.
- ``cardinality``: ``SINGLE`` or ``MULTI`` (seller data may list several, comma-separated).
- ``mode``: ``SELECTION_ONLY`` (``values`` is the closed set the JSON Schema enforces) or
  ``FREE_TEXT`` (``values``, if any, are suggestions).
- ``visual``: OPAL's addition: whether a photo can show it; only visual aspects are
  generated. Absent means true.
- ``evidence`` (optional, per aspect): what an induced schema was inferred from; kept
  in the file for reviewers, ignored on load.

:func:`read_bulk` validates a document and returns the schemas; :func:`to_bulk` writes
one. ``read_bulk(to_bulk(s)) == s`` for every valid set (the round trip is tested).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.category_schema import AspectSpec, CategorySchema

BULK_FORMAT = "opal.category-schemas/1"


class BulkAspect(BaseModel):
    """One aspect of one category, in the marketplace's words."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Aspect name, exactly as listings spell it.")
    usage: Literal["REQUIRED", "RECOMMENDED", "OPTIONAL"] = "OPTIONAL"
    cardinality: Literal["SINGLE", "MULTI"] = "SINGLE"
    mode: Literal["SELECTION_ONLY", "FREE_TEXT"] = "FREE_TEXT"
    values: list[str] = Field(default_factory=list, description="The closed set (SELECTION_ONLY) or suggestions (FREE_TEXT).")
    visual: bool = Field(True, description="OPAL: a photo can show it; only visual aspects are generated.")
    description: str = ""
    evidence: dict[str, Any] | None = Field(None, description="Induction evidence for reviewers; ignored on load.")

    def spec(self) -> AspectSpec:
        if self.mode == "SELECTION_ONLY" and not self.values:
            raise ValueError(f"aspect {self.name!r} is SELECTION_ONLY without values")
        return AspectSpec(
            name=self.name,
            visual=self.visual,
            required=self.usage == "REQUIRED",
            recommended=self.usage == "RECOMMENDED",
            multi=self.cardinality == "MULTI",
            description=self.description,
            values=list(self.values) if self.mode == "SELECTION_ONLY" else None,
            suggested=list(self.values) if self.mode == "FREE_TEXT" and self.values else None,
        )

    @classmethod
    def of(cls, a: AspectSpec, evidence: dict[str, Any] | None = None) -> BulkAspect:
        return cls(
            name=a.name,
            usage="REQUIRED" if a.required else "RECOMMENDED" if a.recommended else "OPTIONAL",
            cardinality="MULTI" if a.multi else "SINGLE",
            mode="SELECTION_ONLY" if a.values is not None else "FREE_TEXT",
            values=list(a.values if a.values is not None else a.suggested or []),
            visual=a.visual,
            description=a.description,
            evidence=evidence,
        )


class BulkCategory(BaseModel):
    """One leaf category and its aspects."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    category_id: str = Field(pattern=r"^[a-z0-9_]+$", description="The slug listings carry in ``category``.")
    category_name: str = ""
    version: int = Field(1, ge=1)
    title_max_chars: int = Field(120, ge=10)
    aspects: list[BulkAspect] = Field(min_length=1)
    evidence: dict[str, Any] | None = Field(None, description="Induction evidence for reviewers; ignored on load.")

    def schema(self) -> CategorySchema:
        return CategorySchema(
            category=self.category_id,
            display_name=self.category_name or self.category_id.replace("_", " "),
            version=self.version,
            title_max_chars=self.title_max_chars,
            aspects=[a.spec() for a in self.aspects],
        )


class BulkFile(BaseModel):
    """A whole taxonomy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["opal.category-schemas/1"] = BULK_FORMAT
    tree_version: str = Field("", description="The taxonomy's own version label (free text, e.g. a date).")
    source: str = Field("", description="Where the file came from (a marketplace export, `opal schemas induce`, ...).")
    categories: list[BulkCategory]


def read_bulk(doc: Mapping[str, Any] | Path) -> dict[str, CategorySchema]:
    """The schemas of a bulk document (or file), by slug. Raises ``ValueError`` naming the first bad category."""
    where = ""
    if isinstance(doc, Path):
        where = f"{doc}: "
        try:
            doc = json.loads(doc.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}not JSON ({e})") from None
    try:
        bulk = BulkFile.model_validate(doc)
    except ValidationError as e:
        raise ValueError(f"{where}not an {BULK_FORMAT} document: {e}") from None
    out: dict[str, CategorySchema] = {}
    for c in bulk.categories:
        if c.category_id in out:
            raise ValueError(f"{where}category {c.category_id!r} appears twice")
        try:
            out[c.category_id] = c.schema()
        except ValueError as e:
            raise ValueError(f"{where}category {c.category_id!r}: {e}") from None
    return out


def to_bulk(
    schemas: Iterable[CategorySchema],
    tree_version: str = "",
    source: str = "",
    evidence: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A bulk document for ``schemas`` (sorted by slug). ``evidence`` maps a slug to ``{"category": {...},
    "aspects": {name: {...}}}`` and is written beside the fields it explains."""
    ev = evidence or {}
    cats = []
    for s in sorted(schemas, key=lambda s: s.category):
        e = ev.get(s.category, {})
        cats.append(
            BulkCategory(
                category_id=s.category,
                category_name=s.display_name,
                version=s.version,
                title_max_chars=s.title_max_chars,
                aspects=[BulkAspect.of(a, e.get("aspects", {}).get(a.name)) for a in s.aspects],
                evidence=e.get("category"),
            )
        )
    return BulkFile(tree_version=tree_version, source=source, categories=cats).model_dump(mode="json", exclude_none=True)


def is_bulk_file(path: Path) -> bool:
    """True for a ``.json`` file whose top-level ``format`` names the bulk format (whatever the key order)."""
    if not path.is_file() or path.suffix != ".json":
        return False
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # not JSON: the per-category loader names the file and the error
    return isinstance(doc, dict) and doc.get("format") == BULK_FORMAT


def dump_bulk(doc: Mapping[str, Any]) -> str:
    """A bulk document as text: the header fields first, then one category per line (a change to a category is a
    one-line diff in review)."""
    head = {k: v for k, v in doc.items() if k != "categories"}
    lines = [json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in doc.get("categories", [])]
    header = json.dumps(head, ensure_ascii=False, indent=1)[:-2]  # drop the closing "\n}"
    return header + ',\n "categories": [\n' + ",\n".join(lines) + "\n ]\n}\n"
