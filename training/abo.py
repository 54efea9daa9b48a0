"""Listing records from the ABO layout (``listings.jsonl`` + ``images/``).

Each record carries the raw catalogue title, the category (ABO ``product_type``), and
aspects derived from the catalogue colour and the visual Q&A, mapped onto the category
schema: a Q&A answer becomes an aspect only when its question names an aspect the
category declares as visual and the (normalised) answer is a valid value for it.

Splits are deterministic and *grouped*: ABO lists colour/size variants of one product
as separate items with near-identical photos and titles, so a split by item id leaks
them across train and test (the data README measured 37% of test titles in train).
:func:`split_of` hashes a group key (the first words of the MACE-refined title,
digits dropped) instead; ``by="item"`` gives the plain item-id split for comparison.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from inference.output import normalise_value
from schemas.category import CategoryRegistry, CategorySchema, default_categories
from training.induce import product_nouns, question_aspect
from training.mace import refine_title

Split = Literal["train", "validation", "test"]

# question keywords -> aspect names to try, in order (the first the category declares and accepts wins)
QA_RULES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("toe",), ("Toe Shape",)),
    (("heel",), ("Heel Type",)),
    (("closure", "fasten", "laced", "laces", "buckle", "zipper"), ("Closure",)),
    (("stone", "gem"), ("Stone", "Stone Shape")),
    (("setting",), ("Setting",)),
    (("metal",), ("Metal", "Finish", "Hardware Color")),
    (("finish",), ("Finish", "Glass Finish")),
    (("pattern", "print"), ("Pattern",)),
    (("texture",), ("Texture", "Pile")),
    (("material", "made of", "fabric", "upper"), ("Material",)),
    (("shape",), ("Shape", "Rug Shape", "Bulb Shape", "Pendant Shape", "Stone Shape")),
    (
        ("style", "type", "kind"),
        (
            "Shoe Style",
            "Boot Style",
            "Sandal Style",
            "Ring Style",
            "Earring Style",
            "Necklace Style",
            "Bag Style",
            "Chair Type",
            "Sofa Type",
            "Table Type",
            "Accessory Type",
            "Case Type",
            "Handle Type",
            "Jewelry Type",
            "Chain Type",
            "Style",
            "Item Type",
        ),
    ),
    (("colo",), ("Color",)),
]


@dataclass(frozen=True)
class ListingRecord:
    item_id: str
    image: Path
    title: str
    category: str
    aspects: dict[str, str]
    qa: list[tuple[str, str]] = field(default_factory=list)

    def reference(self) -> dict[str, object]:
        """The record as a reference line for ``opal eval score`` (raw title; MACE refines it for training)."""
        return {"id": self.item_id, "category": self.category, "title": self.title, "aspects": self.aspects}


def aspects_from_catalogue(
    color: str | None, qa: list[tuple[str, str]], category: CategorySchema, nouns: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Reference aspects from the catalogue colour and the visual Q&A (module docstring).

    A question about a named part ("What is the shape of the tabletop" -> ``Tabletop Shape``,
    :func:`training.induce.question_aspect` with the category's product ``nouns``) fills that aspect when the
    schema declares it (induced schemas do); otherwise :data:`QA_RULES` decide, as for the hand-written schemas.
    """
    out: dict[str, str] = {}

    def offer(name: str, answer: str) -> bool:
        spec = category.aspect(name)
        if spec is None or not spec.visual or name in out:
            return False
        value = normalise_value(name, answer, category)
        if spec.accepts(value) and (spec.values is not None or len(value.split()) <= 4):
            out[name] = value
            return True
        return False

    if color:
        offer("Color", color)
    for question, answer in qa:
        q = question.lower()
        named = question_aspect(question, nouns)
        if named is not None and " " in named and offer(named, answer):
            continue
        for keywords, names in QA_RULES:
            if any(k in q for k in keywords):
                if any(offer(n, answer) for n in names):
                    break
                if keywords != ("colo",) and "colo" in q:
                    continue  # e.g. "main color of the stones": fall through to the colour rule
                break
    return out


def load_abo(folder: Path, categories: CategoryRegistry | None = None, fallback: bool = True) -> Iterator[ListingRecord]:
    """Records of ``folder/listings.jsonl``. A category without a schema gets the generic one (its record's
    ``category`` is the slug the generic schema stands in for); ``fallback=False`` skips such items instead."""
    reg = categories or default_categories()
    rows = [json.loads(line) for line in (folder / "listings.jsonl").read_text().splitlines() if line.strip()]
    questions: dict[str, list[str]] = {}
    for row in rows:
        questions.setdefault(row["product_type"], []).extend(x["question"] for x in row.get("qa", []))
    nouns = {slug: product_nouns(slug, qs) for slug, qs in questions.items()}
    for row in rows:
        if not fallback and row["product_type"] not in reg:
            continue
        cat = reg.resolve(row["product_type"])
        qa = [(x["question"], x["answer"]) for x in row.get("qa", [])]
        yield ListingRecord(
            item_id=row["item_id"],
            image=(folder / row["image"]).resolve(),
            title=row["title"],
            category=cat.category,
            aspects=aspects_from_catalogue(row.get("color"), qa, cat, nouns[row["product_type"]]),
            qa=qa,
        )


_WORD = re.compile(r"[a-z]+")


def group_key(title: str, words: int = 4) -> str:
    """Variants of one product share it: first words of the refined title, digits and punctuation dropped."""
    refined, _ = refine_title(title)
    return " ".join(_WORD.findall(refined.lower())[:words])


def split_of(record: ListingRecord, by: Literal["group", "item"] = "group", validation: float = 0.1, test: float = 0.1) -> Split:
    """Deterministic split from a hash of the group key (default) or the item id."""
    return key_split(group_key(record.title) if by == "group" else record.item_id, validation, test)


def title_split(title: str) -> Split:
    """The grouped split a listing with this catalogue title falls in (what :func:`split_of` gives its record)."""
    return key_split(group_key(title))


def key_split(key: str, validation: float = 0.1, test: float = 0.1) -> Split:
    """Split of a group key (or item id) by its hash: ``test`` share first, then ``validation``, the rest ``train``."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < test:
        return "test"
    if bucket < test + validation:
        return "validation"
    return "train"
