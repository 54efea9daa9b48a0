"""The category aspect schema model: which aspects a category allows, their closed value
sets, and which of them a photo can show.

Data lives in ``schemas/categories/<slug>.json`` (one file per category; format in
``schemas/categories/README.md``) and in bulk files (:mod:`schemas.bulk`); which
locations a process reads, and the packaged default set, are :mod:`schemas.schema_source`'s
business. Other modules import all of it from :mod:`schemas.category`. From a
:class:`CategorySchema` come

- :meth:`CategorySchema.json_schema`: the JSON Schema vLLM's structured output
  enforces, so a generated listing is schema-compliant by construction;
- :meth:`CategorySchema.check`: a report of unknown keys, values outside a closed
  set and missing required aspects, for any listing (generated or from a seller).

Loading is pure and cached; :meth:`CategoryRegistry.get` of an unknown slug raises
:class:`~schemas.errors.UnknownCategoryError`. :meth:`CategoryRegistry.resolve` falls
back to the generic visual schema (``schemas/generic.json``: Color, Brand, Material,
Pattern, Shape, Finish, Texture, Style) for a category without a schema, renamed to that
category and marked ``generic``, so a listing outside the known categories is still
enriched; callers that must refuse pass ``fallback=False``.

This module imports no other category module: :mod:`schemas.bulk` and
:mod:`schemas.schema_source` build on it, and :mod:`schemas.category` on them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.errors import UnknownCategoryError
from schemas.events import SchemaCheck

CATEGORY_DIR = Path(__file__).parent / "categories"
GENERIC_FILE = Path(__file__).parent / "generic.json"
_SLUG_CHARS = re.compile(r"[^a-z0-9_]+")
OPEN_VALUE_MAX_CHARS = 60


class AspectSpec(BaseModel):
    """One aspect a category allows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Display name, e.g. 'Color'; keys in listings use it verbatim.")
    visual: bool = Field(description="True when a photo can show or reasonably imply it; False aspects are never generated.")
    required: bool = Field(False, description="Generated listings must carry it (forced by the JSON Schema).")
    recommended: bool = Field(False, description="Buyers filter on it: worth filling when the photo shows it (not enforced).")
    multi: bool = Field(
        False, description="Seller data may hold several values, comma-separated; a generated listing carries one (the commonest)."
    )
    description: str = ""
    values: list[str] | None = Field(None, description="Closed value set (selection only); None means any short text.")
    suggested: list[str] | None = Field(
        None, description="Free-text aspects only: common values offered to sellers and reviewers, not enforced."
    )

    def accepts(self, value: str) -> bool:
        """True when ``value`` is in the closed set, or is short non-empty text for an open aspect; for a
        :attr:`multi` aspect every comma-separated part must be."""
        parts = [p.strip() for p in value.split(",")] if self.multi and "," in value else [value]
        if self.values is not None:
            return all(p in self.values for p in parts)
        return all(0 < len(p.strip()) <= OPEN_VALUE_MAX_CHARS for p in parts)

    @model_validator(mode="after")
    def _sane(self) -> AspectSpec:
        if self.values is not None and len(set(self.values)) != len(self.values):
            raise ValueError(f"aspect {self.name!r} lists a value twice")
        if self.required and not self.visual:
            raise ValueError(f"aspect {self.name!r} cannot be required and not visual")
        if self.values is not None and not self.values:
            raise ValueError(f"aspect {self.name!r} has an empty closed value set")
        if self.values is not None and self.suggested is not None:
            raise ValueError(f"aspect {self.name!r}: suggested values are for free-text aspects; a closed set lists its values")
        return self


class CategorySchema(BaseModel):
    """The aspect schema of one category."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    category: str = Field(min_length=1, pattern=r"^[a-z0-9_]+$")
    display_name: str
    version: int = Field(1, ge=1, description="Bumped whenever the aspects change; AspectEvents and cache keys carry it.")
    title_max_chars: int = Field(120, ge=10)
    aspects: list[AspectSpec] = Field(min_length=1)
    generic: bool = Field(False, description="The generic visual schema standing in for a category without its own.")

    @model_validator(mode="after")
    def _unique_names(self) -> CategorySchema:
        names = [a.name for a in self.aspects]
        if len(set(names)) != len(names):
            raise ValueError(f"category {self.category!r} declares an aspect twice")
        return self

    def aspect(self, name: str) -> AspectSpec | None:
        return next((a for a in self.aspects if a.name == name), None)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.aspects]

    @property
    def visual_aspects(self) -> list[AspectSpec]:
        return [a for a in self.aspects if a.visual]

    def json_schema(self, include_non_visual: bool = False) -> dict[str, Any]:
        """JSON Schema of a listing ``{"title": str, "aspects": {name: value}}``.

        Only visual aspects by default (what a model may infer from a photo); closed
        sets become ``enum``; open values are short non-empty strings; no other key
        is allowed anywhere.
        """
        props: dict[str, Any] = {}
        required: list[str] = []
        for a in self.aspects:
            if not (a.visual or include_non_visual):
                continue
            if a.values is not None:
                props[a.name] = {"type": "string", "enum": list(a.values)}
            else:
                props[a.name] = {"type": "string", "minLength": 1, "maxLength": OPEN_VALUE_MAX_CHARS}
            if a.required:
                required.append(a.name)
        aspects: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            aspects["required"] = required
        return {
            "title": f"OPAL listing: {self.display_name}",
            "type": "object",
            "properties": {  # aspects first: constrained decoding emits keys in this order (inference/prompt.py)
                "aspects": aspects,
                "title": {"type": "string", "minLength": 1, "maxLength": self.title_max_chars},
            },
            "required": ["aspects", "title"],
            "additionalProperties": False,
        }

    def check(self, aspects: Mapping[str, str], generated: bool = True) -> SchemaCheck:
        """Validate aspect pairs against this schema.

        ``generated=True`` applies the generation contract (non-visual aspects count
        as unknown keys, required aspects must be present); ``False`` checks seller
        data, where every declared aspect is allowed and none is required.
        """
        unknown: list[str] = []
        invalid: list[str] = []
        for key, value in aspects.items():
            spec = self.aspect(key)
            if spec is None or (generated and not spec.visual):
                unknown.append(key)
            elif not spec.accepts(value):
                invalid.append(f"{key}={value}")
        missing = [a.name for a in self.aspects if a.required and a.name not in aspects] if generated else []
        return SchemaCheck(
            valid=not (unknown or invalid or missing),
            unknown_keys=unknown,
            invalid_values=invalid,
            missing_required=missing,
        )

    @property
    def ref(self) -> str:
        """``<category>@v<version>``, ``generic@v<version>`` for the fallback: the schema a listing was checked against."""
        return f"{'generic' if self.generic else self.category}@v{self.version}"

    @cached_property
    def digest(self) -> str:
        """12 hex digits of a hash over everything that shapes a generated listing (aspects, title bound, name):
        an edit that forgot to bump :attr:`version` still changes it. Computed once per (frozen) schema."""
        body = self.model_dump(mode="json", exclude={"version", "generic"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]

    @cached_property
    def key(self) -> str:
        """What a generated listing depends on besides model and image: :attr:`ref` and :attr:`digest`, and for the
        generic schema also the category it stands in for (the prompt names it). Part of the result-cache key, so a
        schema update misses the cache."""
        return f"{self.category}~{self.ref}#{self.digest}" if self.generic else f"{self.ref}#{self.digest}"

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> CategorySchema:
        """A copy (with ``update`` applied); its :attr:`digest` and :attr:`key` are computed afresh, not copied."""
        copied = super().model_copy(update=update, deep=deep)
        for cached in ("digest", "key"):
            copied.__dict__.pop(cached, None)
        return copied

    def standing_in_for(self, category: str) -> CategorySchema:
        """This (generic) schema renamed for ``category`` (made slug-safe, at most 64 characters), marked generic."""
        slug = _SLUG_CHARS.sub("_", category.casefold()).strip("_")[:64] or "item"
        return self.model_copy(update={"category": slug, "display_name": slug.replace("_", " "), "generic": True})


@cache
def generic_schema() -> CategorySchema:
    """The generic visual schema shipped with OPAL (``schemas/generic.json``)."""
    return CategorySchema.model_validate(json.loads(GENERIC_FILE.read_text()))


STAND_INS_KEPT = 4096
"""Generic stand-ins a registry keeps made (one per category without a schema; a category name is input)."""


class CategoryRegistry:
    """All category schemas of a folder, by slug, and the generic schema for the rest."""

    def __init__(self, schemas: Mapping[str, CategorySchema], generic: CategorySchema | None = None) -> None:
        self._schemas = dict(schemas)
        self._generic = generic or generic_schema()
        self._standing: dict[str, CategorySchema] = {}  # generic stand-ins made so far (their keys computed once)

    @classmethod
    def load(cls, directory: Path = CATEGORY_DIR) -> CategoryRegistry:
        """Read every ``*.json`` in ``directory`` (one category each); raises ``ValueError`` naming the bad file."""
        files = sorted(directory.glob("*.json"))
        if not files:
            raise ValueError(f"no category schemas in {directory}")
        return cls.load_files(files)

    @classmethod
    def load_files(cls, files: list[Path]) -> CategoryRegistry:
        """Per-category files, each named after its slug; raises ``ValueError`` naming the bad file."""
        found: dict[str, CategorySchema] = {}
        for f in files:
            try:
                schema = CategorySchema.model_validate(json.loads(f.read_text()))
            except (ValueError, json.JSONDecodeError) as e:
                raise ValueError(f"bad category schema {f}: {e}") from e
            if schema.category != f.stem:
                raise ValueError(f"{f} declares category {schema.category!r}; the file must be named after it")
            found[schema.category] = schema
        return cls(found)

    @property
    def schemas(self) -> dict[str, CategorySchema]:
        """Every category schema by slug (a copy)."""
        return dict(self._schemas)

    def get(self, category: str) -> CategorySchema:
        try:
            return self._schemas[category]
        except KeyError:
            raise UnknownCategoryError(category, list(self._schemas)) from None

    def resolve(self, category: str, fallback: bool = True) -> CategorySchema:
        """The category's schema; without one, the generic schema standing in for it (or, with
        ``fallback=False``, :class:`~schemas.errors.UnknownCategoryError`)."""
        found = self._schemas.get(category)
        if found is not None:
            return found
        if not fallback:
            raise UnknownCategoryError(category, list(self._schemas))
        stand_in = self._standing.get(category)
        if stand_in is None:
            if len(self._standing) >= STAND_INS_KEPT:  # categories are open-ended input: keep a bounded set
                self._standing.clear()
            stand_in = self._standing[category] = self._generic.standing_in_for(category)
        return stand_in

    def __contains__(self, category: object) -> bool:
        return category in self._schemas

    def __len__(self) -> int:
        return len(self._schemas)

    @property
    def names(self) -> list[str]:
        return sorted(self._schemas)
