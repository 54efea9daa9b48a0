"""The paper's metrics, defined exactly so anyone can reproduce them.

For each example (prediction matched to reference by ``id``):

- **ROUGE-L F1**: ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``
  (default tokenizer) F-measure between the canonical JSON of prediction and reference.
  Canonical JSON is ``json.dumps({"title": t, "aspects": {...}}, sort_keys=True,
  separators=(",", ":"), ensure_ascii=False)``. A prediction that does not parse as a
  listing is scored on its raw text.
- **Aspect F1**: F1 between the sets of normalised (name, value) pairs (lower-case,
  trimmed, inner whitespace collapsed, trailing punctuation ``.,;:!?`` stripped); both
  sets empty scores 1, exactly one empty scores 0. Unparseable predictions have no pairs.
- **Schema-compliance recall**: share of predicted aspect names the category schema
  declares (names compared after the same normalisation); examples with no predicted
  aspects are left out of the average.
- **JSON validity**: the prediction parses as an object with a string ``title`` and an
  object ``aspects`` whose values are strings.
- **Exact match**: canonical JSON of prediction equals that of the reference.
- **Per-aspect-name precision/recall** over all examples: for name *n*, matched pairs
  named *n* / predicted pairs named *n*, and / reference pairs named *n*.
- **Aspect accuracy** for name *n* (:func:`aspect_accuracy`): over the references that
  have *n*, the share whose prediction has *n* with the same normalised value (a missing
  aspect or an unparseable prediction is wrong). **Colour accuracy** is that for ``Color``.
- **Distinct titles per category** (:func:`distinct_titles`): how many different
  normalised titles a system wrote for the items of each category (an unparseable
  output counts with its raw text); a collapsed or looping model writes one.

All averages are plain means over examples. Pure functions; imports only the standard
library, rouge-score and schemas (both environments have them).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rouge_score import rouge_scorer

from schemas.category import CategoryRegistry

_WS = re.compile(r"\s+")
_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def norm(text: str) -> str:
    return _WS.sub(" ", text).strip().lower().rstrip(".,;:!?").strip()


def canonical_json(title: str, aspects: Mapping[str, str]) -> str:
    return json.dumps({"title": title, "aspects": dict(aspects)}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_prediction(raw: str) -> tuple[str, dict[str, str]] | None:
    """(title, aspects) when ``raw`` is a valid listing JSON, else None."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("title"), str) or not isinstance(doc.get("aspects", {}), dict):
        return None
    aspects = doc.get("aspects", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aspects.items()):
        return None
    return doc["title"], aspects


def pairs(aspects: Mapping[str, str]) -> set[tuple[str, str]]:
    return {(norm(k), norm(v)) for k, v in aspects.items()}


def rouge_l_f1(prediction: str, reference: str) -> float:
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def aspect_f1(pred: set[tuple[str, str]], ref: set[tuple[str, str]]) -> float:
    if not pred and not ref:
        return 1.0
    if not pred or not ref:
        return 0.0
    tp = len(pred & ref)
    if tp == 0:
        return 0.0
    p, r = tp / len(pred), tp / len(ref)
    return 2 * p * r / (p + r)


@dataclass
class ExampleScore:
    id: str
    rouge_l_f1: float
    aspect_f1: float
    schema_recall: float | None
    json_valid: bool
    exact_match: bool
    generic: bool = False  # the category had no schema: checked against the generic one


@dataclass
class Report:
    n: int
    rouge_l_f1: float
    aspect_f1: float
    schema_recall: float
    json_valid: float
    exact_match: float
    per_aspect: dict[str, tuple[float, float, int, int]] = field(default_factory=dict)  # name -> (precision, recall, n_pred, n_ref)
    missing_predictions: int = 0
    examples: list[ExampleScore] = field(default_factory=list)
    generic_items: int = 0  # references whose category has no schema: scored against the generic one
    generic_schema_recall: float | None = None  # schema recall over those, reported apart

    @property
    def schema_coverage(self) -> float:
        """Share of references whose category has its own schema (what :attr:`schema_recall` is computed over)."""
        return (self.n - self.generic_items) / self.n if self.n else 0.0

    def summary(self) -> dict[str, float | int]:
        return {
            "rouge_l_f1": self.rouge_l_f1,
            "aspect_f1": self.aspect_f1,
            "schema_recall": self.schema_recall,
            "json_valid": self.json_valid,
            "exact_match": self.exact_match,
            "n": self.n,
            "schema_coverage": self.schema_coverage,
            "generic_items": self.generic_items,
        }


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def score(predictions: Mapping[str, str], references: Iterable[Mapping[str, Any]], categories: CategoryRegistry) -> Report:
    """Score raw predictions (``id -> generated string``) against reference records.

    A reference record has ``id``, ``category``, ``title`` and ``aspects``. A reference
    without a prediction is scored as an empty (invalid) output and counted in
    ``missing_predictions``. Every category is scored: one without a schema is checked
    against the generic schema, counted in ``generic_items``, and its schema recall is
    reported apart (``generic_schema_recall``), so ``schema_recall`` measures compliance
    with real category schemas over ``schema_coverage`` of the references.
    """
    examples: list[ExampleScore] = []
    tp: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    n_ref: Counter[str] = Counter()
    missing = 0
    generic_recall: list[float] = []
    for ref in references:
        rid = str(ref["id"])
        if rid not in predictions:
            missing += 1
        raw = predictions.get(rid, "")
        schema = categories.resolve(str(ref["category"]))
        allowed = {norm(n) for n in schema.names}
        ref_pairs = pairs(ref["aspects"])
        ref_json = canonical_json(ref["title"], ref["aspects"])
        parsed = parse_prediction(raw)
        if parsed is None:
            pred_pairs: set[tuple[str, str]] = set()
            pred_json = raw
        else:
            pred_pairs = pairs(parsed[1])
            pred_json = canonical_json(*parsed)
        names = [norm(k) for k in (parsed[1] if parsed else {})]
        recall = (sum(n in allowed for n in names) / len(names)) if names else None
        if schema.generic and recall is not None:
            generic_recall.append(recall)
        examples.append(
            ExampleScore(
                id=rid,
                rouge_l_f1=rouge_l_f1(pred_json, ref_json),
                aspect_f1=aspect_f1(pred_pairs, ref_pairs),
                schema_recall=None if schema.generic else recall,
                generic=schema.generic,
                json_valid=parsed is not None,
                exact_match=parsed is not None and pred_json == ref_json,
            )
        )
        for name, _ in pred_pairs:
            n_pred[name] += 1
        for name, _ in ref_pairs:
            n_ref[name] += 1
        for name, _ in pred_pairs & ref_pairs:
            tp[name] += 1
    per_aspect = {
        name: (tp[name] / n_pred[name] if n_pred[name] else 0.0, tp[name] / n_ref[name] if n_ref[name] else 0.0, n_pred[name], n_ref[name])
        for name in sorted(set(n_pred) | set(n_ref))
    }
    return Report(
        n=len(examples),
        rouge_l_f1=_mean(e.rouge_l_f1 for e in examples),
        aspect_f1=_mean(e.aspect_f1 for e in examples),
        schema_recall=_mean(e.schema_recall for e in examples if e.schema_recall is not None),
        json_valid=_mean(float(e.json_valid) for e in examples),
        exact_match=_mean(float(e.exact_match) for e in examples),
        per_aspect=per_aspect,
        missing_predictions=missing,
        examples=examples,
        generic_items=sum(e.generic for e in examples),
        generic_schema_recall=_mean(generic_recall) if generic_recall else None,
    )


@dataclass(frozen=True)
class AspectAccuracy:
    """Correct predictions of one aspect name over the ``n`` references that have it."""

    correct: int
    n: int

    @property
    def accuracy(self) -> float | None:
        """``correct / n``; None when no reference has the aspect."""
        return self.correct / self.n if self.n else None


def _named(aspects: Mapping[str, str]) -> dict[str, str]:
    return {norm(k): norm(v) for k, v in aspects.items()}


def aspect_accuracy(
    predictions: Mapping[str, str], references: Iterable[Mapping[str, Any]], names: Iterable[str]
) -> dict[str, AspectAccuracy]:
    """Per name in ``names`` (matched after normalisation): accuracy where the reference has it (module docstring)."""
    wanted = {name: norm(name) for name in names}
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for ref in references:
        ref_vals = _named(ref["aspects"])
        parsed = parse_prediction(predictions.get(str(ref["id"]), ""))
        pred_vals = _named(parsed[1]) if parsed else {}
        for name, key in wanted.items():
            if key in ref_vals:
                total[name] += 1
                correct[name] += pred_vals.get(key) == ref_vals[key]
    return {name: AspectAccuracy(correct[name], total[name]) for name in wanted}


def report_aspects(
    references: Iterable[Mapping[str, Any]], always: Iterable[str] = ("Color", "Material"), min_share: float = 0.05
) -> list[str]:
    """``always`` first, then every other aspect name present in at least ``min_share`` of the references, commonest first.

    Names keep the spelling of their first occurrence; ties are broken alphabetically.
    """
    refs = list(references)
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    for ref in refs:
        for k in ref["aspects"]:
            counts[norm(k)] += 1
            spelling.setdefault(norm(k), k)
    fixed = list(always)
    seen = {norm(n) for n in fixed}
    frequent = sorted((k for k, c in counts.items() if k not in seen and c >= min_share * len(refs)), key=lambda k: (-counts[k], k))
    return fixed + [spelling[k] for k in frequent]


def title_of(raw: str) -> str:
    """The normalised title of a raw output; the normalised raw text when it does not parse."""
    parsed = parse_prediction(raw)
    return norm(parsed[0] if parsed else raw)


def distinct_titles(predictions: Mapping[str, str], references: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """Category -> (distinct normalised titles, items) over the referenced items (a missing prediction counts as "")."""
    titles: dict[str, set[str]] = {}
    items: Counter[str] = Counter()
    for ref in references:
        cat = str(ref["category"])
        titles.setdefault(cat, set()).add(title_of(predictions.get(str(ref["id"]), "")))
        items[cat] += 1
    return {cat: (len(titles[cat]), items[cat]) for cat in sorted(titles)}
