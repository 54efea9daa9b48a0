"""MACE, deterministic pass: keep only what a photo can show.

:func:`refine_title` removes, with a reason for each removal, text an image cannot
confirm: condition notes, promotional and shipping phrases, emojis, pack counts, sizes,
measurements and wattages, metal purity, carat weights and stone grades, and
model/style codes. :func:`refine_aspects` drops aspect pairs the category schema does
not declare, marks as not visually inferable, or whose value falls outside a closed
set. Pure functions: the same input always gives the same output.

The MLLM pass (rewrite against the image through an endpoint) builds on this output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from inference.output import normalise_name, normalise_value
from schemas.category import CategorySchema

_NUM = r"\d+(?:[.,]\d+)?"
_UNITS = r"mm|cm|m|in|inch|inches|ft|feet|oz|ml|l|ltr|litre|liter|kg|g|lb|lbs|w|watt|watts|v|volt|volts|mah|gb|tb|mp|qt|gal"

# (reason, pattern); applied in order, case-insensitively
RULES: list[tuple[str, re.Pattern[str]]] = [
    ("condition", re.compile(r"\(?\b(?:renewed|refurbished|pre-owned|used)\b\)?", re.I)),
    (
        "promotional",
        re.compile(
            r"\b(?:ships? fast|fast shipping|free shipping|ships? free|\d+\s?% off|on sale|hot deal|best ?seller|limited time offer"
            r"|new arrival|brand new|amazon exclusive|top rated|great gift|gift idea)\b",
            re.I,
        ),
    ),
    ("emoji", re.compile("[\U0001f300-\U0001faff\U00002600-\U000027bf\U0001f000-\U0001f2ff\u2b50\u2b55\u2705\u274c\ufe0f]+")),
    (
        "pack count",
        re.compile(rf"\b(?:pack of {_NUM}|set of {_NUM}|{_NUM}[- ]?(?:pack|pk|pcs|pieces|piece|count)|{_NUM} ?x ?pack)\b", re.I),
    ),
    ("carat weight", re.compile(rf"\(?\b(?:{_NUM}/{_NUM}|{_NUM}) ?(?:cttw|ct\. ?t\. ?w\.|carats?|ct)\b[^)]*\)?", re.I)),
    ("stone grade", re.compile(r"\b(?:[a-z]{1,2}(?:-[a-z]{1,2})? colou?r|[a-z]\d(?:-[a-z]\d)? clarity)\b", re.I)),
    ("metal purity", re.compile(r"\b(?:\d{1,2} ?k(?:t|arat)?|925|\.925)\b(?! ?(?:gold|white|rose|yellow)? ?tone)", re.I)),
    ("wattage", re.compile(rf"\(?\b(?:equivalent to {_NUM} ?w(?:att)?s?|{_NUM} ?-?w(?:att)?s? equivalent|{_NUM} ?-?watts?)\b\)?", re.I)),
    (
        "measurement",
        re.compile(
            rf"(?:\(?\b{_NUM}'\s?{_NUM}?\"?\s?x\s?{_NUM}'\s?{_NUM}?\"?\)?|\b{_NUM}\s?(?:x\s?{_NUM}\s?){{1,2}}(?:{_UNITS})?\b"
            rf"|\b{_NUM}\s?\"\s?[whld]?\b|\b{_NUM}\s?\"|\b{_NUM}\s?-?(?:{_UNITS})\b|\b{_NUM}'\s?{_NUM}\")",
            re.I,
        ),
    ),
    (
        "size",
        re.compile(
            rf"\b(?:size {_NUM}|(?:us|uk|eu|eur) ?{_NUM}|{_NUM} ?(?:us|uk|eu)\b|{_NUM} (?:medium|wide|narrow) us(?: (?:big|little) kid)?"
            r"|(?:big|little) kid|one size(?: fits all)?|x{1,3}l|x{0,3}s(?=\b,)|twin xl|king size|queen size)\b",
            re.I,
        ),
    ),
    ("model code", re.compile(r"\(?\b(?=[a-z]*\d)(?=\d*[a-z])[a-z\d]{2,}(?:-[a-z\d]+)*\b\)?", re.I)),
]

_KEEP_CODES = {"3d", "4k", "2d", "usb", "e26"}  # codes that describe something visible


@dataclass(frozen=True)
class Removal:
    text: str
    reason: str


@dataclass(frozen=True)
class RefinedListing:
    item_id: str
    category: str
    original_title: str
    title: str
    original_aspects: dict[str, str]
    aspects: dict[str, str]
    removed: list[Removal] = field(default_factory=list)
    dropped_aspects: list[Removal] = field(default_factory=list)


def _tidy(text: str) -> str:
    text = re.sub(r"\(\s*[,;:|/-]*\s*\)", " ", text)  # emptied parentheses
    text = re.sub(r"\s+([,;:|)])", r"\1", text)
    text = re.sub(r"([(])\s+", r"\1", text)
    text = re.sub(r"(?:\s*[,;|/-]\s*){2,}", ", ", text)  # separators left next to each other
    text = re.sub(r"\s{2,}", " ", text)
    return text.strip(" ,;:|/-")


def refine_title(title: str, category: CategorySchema | None = None) -> tuple[str, list[Removal]]:
    """Remove non-visual text from ``title``; returns (refined title, removals with reasons)."""
    keep = set(_KEEP_CODES)
    if category is not None:
        keep |= {v.lower() for a in category.aspects for v in (a.values or [])}
    removed: list[Removal] = []
    text = title
    for reason, pattern in RULES:

        def cut(m: re.Match[str], reason: str = reason) -> str:
            span = m.group(0)
            if reason == "model code" and span.strip("()").lower() in keep:
                return span
            removed.append(Removal(span.strip(), reason))
            return " "

        text = pattern.sub(cut, text)
    return _tidy(text), removed


def refine_aspects(aspects: Mapping[str, str], category: CategorySchema) -> tuple[dict[str, str], list[Removal]]:
    """Keep declared, visually inferable aspects with valid values (normalised)."""
    kept: dict[str, str] = {}
    dropped: list[Removal] = []
    for raw_name, raw_value in aspects.items():
        name = normalise_name(raw_name, category)
        spec = category.aspect(name)
        if spec is None:
            dropped.append(Removal(f"{raw_name}={raw_value}", "not in the category schema"))
        elif not spec.visual:
            dropped.append(Removal(f"{raw_name}={raw_value}", "not visually inferable"))
        else:
            value = normalise_value(name, raw_value, category)
            if spec.accepts(value):
                kept[name] = value
            else:
                dropped.append(Removal(f"{raw_name}={raw_value}", "value outside the schema"))
    return kept, dropped


def refine(item_id: str, title: str, aspects: Mapping[str, str], category: CategorySchema) -> RefinedListing:
    new_title, removed = refine_title(title, category)
    new_aspects, dropped = refine_aspects(aspects, category)
    return RefinedListing(item_id, category.category, title, new_title, dict(aspects), new_aspects, removed, dropped)
