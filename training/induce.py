"""Schema induction: propose a category schema for every category of a catalogue from its own evidence.

Input is a catalogue folder in OPAL's data layout (``listings.jsonl``: ``product_type``,
``title``, ``color``, optional ``aspects`` and visual ``qa`` pairs; the ABO layout).
Evidence per category:

- **visual Q&A**: each question names an attribute and the part it is about
  (:func:`training.questions.question_aspect`: "What is the shape of the clock" -> ``Shape``, "What color is
  the clock frame" -> ``Frame Color``, "How many wheels does the suitcase have" ->
  ``Number of Wheels``, "What type of handle ..." -> ``Handle Type``); the answers are its
  values. Q&A aspects are visual.
- **catalogue fields**: ``color`` -> ``Color``; any ``aspects`` mapping a row carries
  (visual when its name is one of the broadly visual attributes).
- **titles**: a recurring leading brand -> ``Brand`` (free text, suggestions).

Values of an attribute with a shared vocabulary in the generic schema (Color, Material,
Pattern, Shape, Finish, Texture, also for parts: ``Frame Color``) map onto it and the
aspect is selection-only with that vocabulary; other aspects get a closed set where the
data shows one (few values, each seen at least twice, covering most answers), else free
text with the common values as suggestions. Each aspect carries its evidence (items,
share, sources, top values, the questions behind it) and a confidence; each category a
confidence from its item count; both land in the bulk file and the review table.

Pure and deterministic: the same folder gives the same bytes (no randomness, no clock;
ties are broken alphabetically).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.output import VALUE_SYNONYMS, clean_text
from schemas.bulk import to_bulk
from schemas.category import AspectSpec, CategorySchema, generic_schema
from training.questions import ATTRIBUTES as ATTRIBUTES
from training.questions import product_nouns as product_nouns
from training.questions import question_aspect as question_aspect

OPEN_BY_NATURE = frozenset({"Brand"})  # never a closed set, however few values a catalogue shows
VISUAL_NAMES = frozenset({"Color", "Material", "Pattern", "Shape", "Finish", "Texture", "Style", "Brand"})
_NUMBERS = {
    w: str(i)
    for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"])
}
MAX_VALUE_WORDS = 4


def clean_answer(name: str, answer: str) -> str | None:
    """The value an answer gives ``name`` (lower case, numbers as digits), or None when it is too long to be one."""
    v = clean_text(answer).lower().strip(" .!")
    v = re.sub(r"^(?:a|an|the) ", "", v)
    if name.startswith("Number of "):
        v = _NUMBERS.get(v, v)
        return v if v.isdigit() else None
    if not v or len(v.split()) > MAX_VALUE_WORDS:
        return None
    return VALUE_SYNONYMS.get(v, v)


def vocabulary_for(name: str) -> AspectSpec | None:
    """The generic schema's closed aspect whose attribute ``name`` ends with ("Frame Color" -> Color), if any."""
    spec = generic_schema().aspect(name.split()[-1])
    return spec if spec is not None and spec.values is not None else None


def _to_vocabulary(value: str, vocab: list[str]) -> str | None:
    """A free-text answer onto a vocabulary: exact, else the vocabulary word it contains ("navy blue" -> navy)."""
    low = {v.lower(): v for v in vocab}
    if value in low:
        return low[value]
    words = value.replace("/", " ").replace("-", " ").split()
    for w in words:  # first word that is a vocabulary value: "black nappa" -> black, "light grey" -> grey
        if w in low:
            return low[w]
    return None


@dataclass
class _Evidence:
    items: set[str] = field(default_factory=set)
    values: Counter[str] = field(default_factory=Counter)
    unmapped: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    questions: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class InducedCategory:
    schema: CategorySchema
    items: int
    confidence: float
    evidence: dict[str, dict[str, Any]]  # aspect name -> evidence written to the bulk file

    @property
    def review(self) -> bool:
        """Worth a person's look: few items, or no aspect seen on at least half of them."""
        return self.confidence < 0.5 or not any(e["share"] >= 0.5 for e in self.evidence.values())


@dataclass(frozen=True)
class InductionConfig:
    """Thresholds of :func:`induce`; the defaults were chosen on the ABO catalogue and are recorded in each file."""

    min_share: float = field(default=0.08, metadata={"help": "An aspect needs evidence on this share of a category's items."})
    min_items_for_share: int = field(default=5, metadata={"help": "Below this many items one item of evidence is enough."})
    closed_min_observations: int = field(default=5, metadata={"help": "A closed value set needs this many answers."})
    closed_cover: float = field(default=0.8, metadata={"help": "Values seen twice or more must cover this share of answers."})
    closed_max_values: int = field(default=30, metadata={"help": "A closed set holds at most this many values."})
    recommended_share: float = field(default=0.25, metadata={"help": "An aspect seen on this share of items is RECOMMENDED."})
    required_share: float = field(default=0.5, metadata={"help": "Color is REQUIRED when it maps onto the vocabulary this often."})
    items_for_confidence: int = field(default=20, metadata={"help": "A category with this many items has confidence 1."})
    suggestions: int = field(default=10, metadata={"help": "Free-text aspects keep this many common values as suggestions."})


def leading_brand(title: str) -> str | None:
    """The brand a catalogue title starts with: "amazon brand - solimo ..." -> solimo, else the first word."""
    t = clean_text(title).lower()
    if m := re.match(r"amazon brand\s*-\s*([a-z0-9&' ]+?)(?:\s+-|\s{2}|$|\s(?=\d))", t):
        words = m.group(1).split()
        return " ".join(words[:3]) if words else None
    first = t.split(" ", 1)[0].strip(",.-:") if t else ""
    return first if len(first) > 2 and not first[0].isdigit() else None


def _aspect(name: str, ev: _Evidence, n: int, cfg: InductionConfig, visual: bool) -> tuple[AspectSpec, dict[str, Any]]:
    share = len(ev.items) / n
    support = len(ev.items)
    observations = sum(ev.values.values())
    vocab = vocabulary_for(name)
    values: list[str] | None = None
    suggested: list[str] | None = None
    ranked = sorted(ev.values.items(), key=lambda kv: (-kv[1], kv[0]))
    if vocab is not None:
        values = list(vocab.values or [])
    elif name in OPEN_BY_NATURE:
        suggested = [v for v, _ in ranked[: cfg.suggestions]] or None
    else:
        repeated = [v for v, c in ranked if c >= 2]
        covered = sum(ev.values[v] for v in repeated)
        if (
            observations >= cfg.closed_min_observations
            and repeated
            and len(repeated) <= cfg.closed_max_values
            and covered >= cfg.closed_cover * observations
        ):
            values = sorted(repeated)
        elif ranked:
            suggested = [v for v, _ in ranked[: cfg.suggestions]]
    mapped_share = (sum(ev.values.values()) / (observations + sum(ev.unmapped.values()))) if observations else 0.0
    required = name == "Color" and visual and vocab is not None and share * mapped_share >= cfg.required_share
    confidence = round(share * min(1.0, support / 10), 2)
    spec = AspectSpec(
        name=name,
        visual=visual,
        required=required,
        recommended=not required and share >= cfg.recommended_share,
        description=f"Induced from {support} of {n} listings",
        values=values,
        suggested=suggested,
    )
    evidence = {
        "items": support,
        "share": round(share, 3),
        "confidence": confidence,
        "sources": dict(sorted(ev.sources.items())),
        "top_values": [[v, c] for v, c in ranked[:5]],
        "unmapped": [[v, c] for v, c in sorted(ev.unmapped.items(), key=lambda kv: (-kv[1], kv[0]))[:5]],
        "questions": [q for q, _ in sorted(ev.questions.items(), key=lambda kv: (-kv[1], kv[0]))[:3]],
    }
    return spec, evidence


def _collect(items: list[Mapping[str, Any]], nouns: frozenset[str], brands: Counter[str]) -> tuple[dict[str, _Evidence], dict[str, bool]]:
    """Evidence per aspect name over one category's items, and whether each name is visual."""
    evidence: dict[str, _Evidence] = defaultdict(_Evidence)
    visual: dict[str, bool] = {}

    def offer(name: str, value: str | None, item: str, source: str, is_visual: bool, question: str | None = None) -> None:
        if value is None:
            return
        ev = evidence[name]
        vocab = vocabulary_for(name)
        if vocab is not None:
            mapped = _to_vocabulary(value, list(vocab.values or []))
            if mapped is None:
                ev.unmapped[value] += 1
                return
            value = mapped
        ev.items.add(item)
        ev.values[value] += 1
        ev.sources[source] += 1
        if question:
            ev.questions[question] += 1
        visual[name] = visual.get(name, False) or is_visual

    for r in items:
        iid = str(r.get("item_id", ""))
        if r.get("color"):
            offer("Color", clean_answer("Color", str(r["color"])), iid, "catalogue", True)
        for k, v in (r.get("aspects") or {}).items():
            name = clean_text(str(k)).title()
            offer(name, clean_answer(name, str(v)), iid, "catalogue", name in VISUAL_NAMES)
        for x in r.get("qa", []):
            name = question_aspect(x["question"], nouns)
            if name is not None:
                offer(name, clean_answer(name, x["answer"]), iid, "qa", True, clean_text(x["question"]).rstrip("?"))
        brand = leading_brand(str(r.get("title", "")))
        if brand and brands[brand] >= 3:
            offer("Brand", brand, iid, "title", True)
    return evidence, visual


def induce(rows: Iterable[Mapping[str, Any]], config: InductionConfig | None = None) -> list[InducedCategory]:
    """One proposed schema per ``product_type`` in ``rows`` (sorted by slug); see the module docstring."""
    cfg = config or InductionConfig()
    by_cat: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cat[str(r["product_type"])].append(r)
    brands: Counter[str] = Counter()
    for rs in by_cat.values():
        brands.update(b for r in rs if (b := leading_brand(str(r.get("title", "")))))
    out: list[InducedCategory] = []
    for slug in sorted(by_cat):
        items = sorted(by_cat[slug], key=lambda r: str(r.get("item_id", "")))
        n = len(items)
        nouns = product_nouns(slug, (x["question"] for r in items for x in r.get("qa", [])))
        evidence, visual = _collect(items, nouns, brands)
        min_support = 1 if n < cfg.min_items_for_share else max(2, math.ceil(cfg.min_share * n))
        names = sorted(evidence, key=lambda a: (a != "Color", -len(evidence[a].items), a))
        aspects: list[AspectSpec] = []
        ev_out: dict[str, dict[str, Any]] = {}
        for name in names:
            if len(evidence[name].items) < min_support and name != "Color":
                continue
            if not evidence[name].items:
                continue
            spec, e = _aspect(name, evidence[name], n, cfg, visual.get(name, True))
            aspects.append(spec)
            ev_out[name] = e
        if not aspects:  # nothing recognisable: the generic Color, optional
            color = generic_schema().aspect("Color")
            assert color is not None
            aspects = [color.model_copy(update={"required": False, "description": "No evidence; the generic colour vocabulary"})]
            ev_out["Color"] = {"items": 0, "share": 0.0, "confidence": 0.0, "sources": {}, "top_values": [], "unmapped": []}
        schema = CategorySchema(category=slug, display_name=slug.replace("_", " ").capitalize(), aspects=aspects)
        out.append(InducedCategory(schema, n, round(min(1.0, n / cfg.items_for_confidence), 2), ev_out))
    return out


def read_catalogue(folder: Path) -> list[dict[str, Any]]:
    """Rows of ``folder/listings.jsonl`` (or ``folder`` itself when it is a JSONL file)."""
    path = folder / "listings.jsonl" if folder.is_dir() else folder
    if not path.is_file():
        raise FileNotFoundError(f"no catalogue at {path} (expected listings.jsonl with product_type, title, color, qa)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e})") from None
        if not isinstance(row, dict) or not row.get("product_type"):
            raise ValueError(f"{path}:{i}: a row needs a product_type")
        rows.append(row)
    return rows


def bulk_document(induced: list[InducedCategory], source: str, config: InductionConfig | None = None) -> dict[str, Any]:
    """The bulk file for ``induced`` with the evidence beside each aspect (``schemas.bulk``)."""
    cfg = config or InductionConfig()
    evidence = {
        c.schema.category: {
            "category": {"items": c.items, "confidence": c.confidence, "review": c.review},
            "aspects": c.evidence,
        }
        for c in induced
    }
    doc = to_bulk([c.schema for c in induced], tree_version="induced", source=source, evidence=evidence)
    doc["source"] = f"{source}; thresholds {json.dumps(cfg.__dict__, sort_keys=True)}"
    return doc


def review_markdown(induced: list[InducedCategory], source: str) -> str:
    """The review table: one row per category, weakest first, with what to check."""
    lines = [
        f"# Induced category schemas: review ({source})",
        "",
        f"{len(induced)} categories, {sum(c.items for c in induced)} listings; "
        f"{sum(c.review for c in induced)} marked for review (fewer than 10 listings, or no aspect seen on half of them).",
        "Accept as is with `opal schemas import FILE --write PATH`; edit the JSON to change an aspect.",
        "",
        "| category | items | confidence | review | aspects (usage, values, share of items) |",
        "|---|---:|---:|---|---|",
    ]
    for c in sorted(induced, key=lambda c: (c.confidence, c.schema.category)):
        parts = []
        for a in c.schema.aspects:
            e = c.evidence.get(a.name, {})
            usage = "req" if a.required else "rec" if a.recommended else "opt"
            vals = f"{len(a.values)} closed" if a.values is not None else "free"
            parts.append(f"{a.name} ({usage}, {vals}, {e.get('share', 0):.0%})")
        lines.append(f"| {c.schema.category} | {c.items} | {c.confidence:.2f} | {'yes' if c.review else ''} | {'; '.join(parts)} |")
    return "\n".join(lines) + "\n"
