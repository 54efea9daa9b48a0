"""Category aspect schemas: which aspects a category allows, their closed value sets,
and which of them a photo can show.

Data lives in ``schemas/categories/<slug>.json`` (one file per category; format in
``schemas/categories/README.md``). From a :class:`CategorySchema` come

- :meth:`CategorySchema.json_schema`: the JSON Schema vLLM's structured output
  enforces, so a generated listing is schema-compliant by construction;
- :meth:`CategorySchema.check`: a report of unknown keys, values outside a closed
  set and missing required aspects, for any listing (generated or from a seller).

Loading is pure and cached; look-ups of an unknown slug raise
:class:`~schemas.errors.UnknownCategoryError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.errors import UnknownCategoryError
from schemas.events import SchemaCheck

CATEGORY_DIR = Path(__file__).parent / "categories"
OPEN_VALUE_MAX_CHARS = 60


class AspectSpec(BaseModel):
    """One aspect a category allows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, description="Display name, e.g. 'Color'; keys in listings use it verbatim.")
    visual: bool = Field(description="True when a photo can show or reasonably imply it; False aspects are never generated.")
    required: bool = Field(False, description="Generated listings must carry it (forced by the JSON Schema).")
    description: str = ""
    values: list[str] | None = Field(None, description="Closed value set; None means any short text.")

    def accepts(self, value: str) -> bool:
        """True when ``value`` is in the closed set, or is short non-empty text for an open aspect."""
        if self.values is not None:
            return value in self.values
        return 0 < len(value.strip()) <= OPEN_VALUE_MAX_CHARS

    @model_validator(mode="after")
    def _sane(self) -> AspectSpec:
        if self.values is not None and len(set(self.values)) != len(self.values):
            raise ValueError(f"aspect {self.name!r} lists a value twice")
        if self.required and not self.visual:
            raise ValueError(f"aspect {self.name!r} cannot be required and not visual")
        return self


class CategorySchema(BaseModel):
    """The aspect schema of one category."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    category: str = Field(min_length=1, pattern=r"^[a-z0-9_]+$")
    display_name: str
    title_max_chars: int = Field(120, ge=10)
    aspects: list[AspectSpec] = Field(min_length=1)

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


class CategoryRegistry:
    """All category schemas of a folder, by slug."""

    def __init__(self, schemas: Mapping[str, CategorySchema]) -> None:
        self._schemas = dict(schemas)

    @classmethod
    def load(cls, directory: Path = CATEGORY_DIR) -> CategoryRegistry:
        """Read every ``*.json`` in ``directory``; raises ``ValueError`` naming the bad file."""
        found: dict[str, CategorySchema] = {}
        for f in sorted(directory.glob("*.json")):
            try:
                schema = CategorySchema.model_validate(json.loads(f.read_text()))
            except (ValueError, json.JSONDecodeError) as e:
                raise ValueError(f"bad category schema {f}: {e}") from e
            if schema.category != f.stem:
                raise ValueError(f"{f} declares category {schema.category!r}; the file must be named after it")
            found[schema.category] = schema
        if not found:
            raise ValueError(f"no category schemas in {directory}")
        return cls(found)

    def get(self, category: str) -> CategorySchema:
        try:
            return self._schemas[category]
        except KeyError:
            raise UnknownCategoryError(category, list(self._schemas)) from None

    def __contains__(self, category: object) -> bool:
        return category in self._schemas

    def __len__(self) -> int:
        return len(self._schemas)

    @property
    def names(self) -> list[str]:
        return sorted(self._schemas)


@cache
def default_categories() -> CategoryRegistry:
    """The category schemas shipped with OPAL (loaded once per process)."""
    return CategoryRegistry.load()
