"""Model output -> a validated, normalised listing, or a typed error.

:func:`parse_listing` never raises anything but :class:`InvalidOutputError` for bad
model output (not JSON, wrong shape, values outside the category schema). The error
carries the raw text, so a worker can dead-letter it with the evidence.

Normalisation, applied before validation:
- aspect names: case- and space-insensitive match to the category's names, then the
  :data:`NAME_SYNONYMS` table (``colour`` -> ``Color``);
- values: trimmed, inner whitespace collapsed; for closed sets matched
  case-insensitively, then through :data:`VALUE_SYNONYMS` (``gray`` -> ``grey``);
- title: trimmed and whitespace-collapsed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from schemas.category import CategorySchema
from schemas.errors import ErrorKind, InvalidListingError
from schemas.events import SchemaCheck

NAME_SYNONYMS: dict[str, str] = {
    "colour": "Color",
    "main color": "Color",
    "main colour": "Color",
    "primary color": "Color",
    "materials": "Material",
    "fabric": "Material",
    "maker": "Brand",
    "brand name": "Brand",
    "heel": "Heel Type",
    "toe": "Toe Shape",
    "closure type": "Closure",
}

VALUE_SYNONYMS: dict[str, str] = {
    "gray": "grey",
    "multi": "multicolor",
    "multicolour": "multicolor",
    "multi-color": "multicolor",
    "multi-colour": "multicolor",
    "off-white": "ivory",
    "cream": "ivory",
    "transparent": "clear",
    "rose-gold": "rose gold",
    "rosegold": "rose gold",
    "laces": "lace-up",
    "lace up": "lace-up",
    "slip on": "slip-on",
    "velcro": "hook and loop",
    "faux-leather": "faux leather",
    "pleather": "faux leather",
    "stainless": "stainless steel",
    "sneakers": "sneaker",
    "loafers": "loafer",
    "studs": "stud",
    "hoops": "hoop",
}

_WS = re.compile(r"\s+")


class InvalidOutputError(InvalidListingError):
    """The model's output is not a valid listing for its category. ``raw`` holds it."""

    reason = ErrorKind.INVALID_OUTPUT

    def __init__(self, message: str, raw: str, check: SchemaCheck | None = None) -> None:
        shown = raw if len(raw) <= 300 else raw[:300] + "..."
        super().__init__(f"{message}; raw output: {shown!r}", raw)
        self.check = check


@dataclass(frozen=True)
class Listing:
    title: str
    aspects: dict[str, str] = field(default_factory=dict)


def clean_text(s: str) -> str:
    return _WS.sub(" ", s).strip()


def _key(s: str) -> str:
    return clean_text(s).lower().replace("_", " ")


def normalise_name(name: str, category: CategorySchema) -> str:
    k = _key(name)
    for n in category.names:
        if _key(n) == k:
            return n
    syn = NAME_SYNONYMS.get(k)
    return syn if syn is not None and syn in category.names else clean_text(name)


def normalise_value(name: str, value: Any, category: CategorySchema) -> str:
    text = clean_text(value if isinstance(value, str) else json.dumps(value) if not isinstance(value, (int, float)) else str(value))
    spec = category.aspect(name)
    if spec is None or spec.values is None:
        return text
    k = text.lower()
    k = VALUE_SYNONYMS.get(k, k)
    for v in spec.values:
        if v.lower() == k:
            return v
    return text


def parse_listing(raw: str, category: CategorySchema, strict: bool = True) -> tuple[Listing, SchemaCheck]:
    """Parse, normalise and validate one generated listing.

    ``strict`` (default): any unknown key, invalid value or missing required aspect
    raises. ``strict=False``: offending pairs are dropped and reported in the
    returned :class:`SchemaCheck` (``valid`` False); only unparseable output, a
    missing title or a missing required aspect still raise.
    """
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise InvalidOutputError(f"not valid JSON ({e})", raw or "") from None
    if not isinstance(doc, dict):
        raise InvalidOutputError(f"expected a JSON object, got {type(doc).__name__}", raw)
    title = doc.get("title")
    if not isinstance(title, str) or not clean_text(title):
        raise InvalidOutputError("missing or empty title", raw)
    title = clean_text(title)[: category.title_max_chars]
    aspects_in = doc.get("aspects", {})
    if not isinstance(aspects_in, dict):
        raise InvalidOutputError("aspects is not an object", raw)
    aspects: dict[str, str] = {}
    for name, value in aspects_in.items():
        n = normalise_name(str(name), category)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # an empty value means "not shown"; nothing to keep
        aspects[n] = normalise_value(n, value, category)
    check = category.check(aspects)
    if check.valid:
        return Listing(title, aspects), check
    if strict or check.missing_required:
        raise InvalidOutputError(
            f"listing breaks the {category.category} schema (unknown {check.unknown_keys}, invalid {check.invalid_values}, "
            f"missing {check.missing_required})",
            raw,
            check,
        )
    bad = set(check.unknown_keys) | {iv.split("=", 1)[0] for iv in check.invalid_values}
    return Listing(title, {k: v for k, v in aspects.items() if k not in bad}), check
