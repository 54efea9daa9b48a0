"""Evaluation run: a served model vs. baselines and an image-swap control, scored with the paper's metrics.

:func:`run_eval` generates one listing per item of the chosen split through an
OpenAI-compatible endpoint (the serving prompt, schema-constrained) and scores it with
:func:`training.metrics.score` against the catalogue reference, beside:

- a **majority baseline**: per category, the commonest value of each aspect that most
  fitting items of the category have, and the fitting title with the highest mean
  ROUGE-L F1 to the category's other fitting titles;
- a **retrieval baseline** (:mod:`training.retrieval`): the listing (title + aspects) of
  the fitting item of the same category whose photo is nearest by a cheap embedding;
- an **image-swap control** ("model, photos swapped"): the same items generated again
  with their photos permuted within category (:func:`derangement`). A model that reads
  the photo scores lower with swapped photos; the report gives the deltas (true minus
  swapped) and how many outputs did not change at all.

Honesty rules
- The baselines are fitted on the *train* split of ``train_data`` (default: of ``data``;
  the split is grouped, so test/validation items never share a group with it). If any
  scored item is in the fitting set (same item id), :func:`run_eval` raises
  :class:`InSampleError` before any request unless ``allow_in_sample`` is set; the report
  then says "baseline fitted in-sample". Scored items whose title group occurs in the
  fitting set are counted too (``group_overlap``).
- JSON validity and schema recall are reported but marked "guaranteed by constrained
  decoding": under json_schema structured output they are 1.0 for any weights.
- Per-aspect accuracy (Color, Material and every aspect in >= 5% of the references) and
  distinct titles per category are reported for every system (definitions in
  :mod:`training.metrics`).

Contract
- Model failures are outputs, not crashes: a listing the client rejects is scored on its
  raw text (invalid JSON scores 0 on aspects); an endpoint that stays down counts the
  item as ``failed`` with an empty prediction. Nothing is skipped silently: the report
  says how many items failed, for the true and the swapped photos separately.
- Deterministic for a given data folder, fitting folder, split, seed and model
  (temperature 0; the split is a hash of the item's title group, see
  :func:`training.abo.split_of`; the swap is seeded per category).
- :func:`training.eval_report.write_eval` writes ``predictions.jsonl``, ``references.jsonl``, ``report.json``
  and ``report.md`` under the output folder (overwriting them: re-running is safe).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from inference.client import InferenceRejectedError, InferenceUnavailableError, ListingClient
from inference.images import ImageRejectedError
from inference.output import InvalidOutputError
from schemas.category import CategoryRegistry, default_categories
from training.abo import ListingRecord, group_key, load_abo, split_of
from training.metrics import (
    AspectAccuracy,
    Report,
    aspect_accuracy,
    canonical_json,
    distinct_titles,
    report_aspects,
    rouge_l_f1,
    score,
)
from training.retrieval import RetrievalBaseline

SplitName = Literal["train", "validation", "test", "all"]
MEDOID_SAMPLE = 300  # train titles per category compared pairwise for the baseline title
MODEL = "model"
SWAPPED = "model, photos swapped"
MAJORITY = "majority baseline"
RETRIEVAL = "retrieval baseline"
REFERENCE = "reference"
# headline columns, systems x metrics; colour_accuracy is aspect accuracy for Color
METRICS = ("rouge_l_f1", "aspect_f1", "colour_accuracy", "exact_match", "json_valid", "schema_recall")
GUARANTEED = ("json_valid", "schema_recall")  # hold by construction under json_schema structured output
PLOT_NOTE = "* guaranteed by constrained decoding"
GUARANTEED_NOTE = "guaranteed by constrained decoding (json_schema structured output): 1.0 for any weights, proves nothing about the model"

Value = float | int | None


class InSampleError(ValueError):
    """Scored items are in the baselines' fitting set and in-sample fitting was not allowed."""


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; every field documents itself."""

    data: Path = field(metadata={"help": "Folder with listings.jsonl and images/ in the ABO format (the items to score)."})
    endpoint: str = field(metadata={"help": "OpenAI-compatible base URL ending in /v1 serving the model under test."})
    split: SplitName = field(default="test", metadata={"help": "Which split to score; `all` includes train items (not held out)."})
    limit: int | None = field(default=None, metadata={"help": "Score at most this many items of the split (first by item id)."})
    concurrency: int = field(default=16, metadata={"help": "Requests in flight."})
    max_tokens: int = field(default=256, metadata={"help": "Most generated tokens per listing."})
    timeout_s: float = field(default=120.0, metadata={"help": "Per-request timeout."})
    train_data: Path | None = field(default=None, metadata={"help": "ABO folder whose train split fits the baselines (default: data)."})
    allow_in_sample: bool = field(default=False, metadata={"help": "Allow scored items inside the baselines' fitting set."})
    swap_control: bool = field(default=True, metadata={"help": "Also generate with photos swapped within category (2x requests)."})
    seed: int = field(default=0, metadata={"help": "Seed of the within-category photo swap."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "vLLM repetition_penalty (1.0 = off), as the deployment sets it."})
    frequency_penalty: float = field(default=0.0, metadata={"help": "OpenAI frequency_penalty (0 = off), as the deployment sets it."})


@dataclass
class EvalResult:
    """Everything a run measured; :mod:`training.eval_report` renders it (``tables``, ``markdown``, ``write_eval``)."""

    config: EvalConfig
    model: str
    n_train: int  # fitting items (train split of the fitting folder)
    references: list[dict[str, object]]
    predictions: dict[str, dict[str, str]]  # system -> item id -> raw output
    reports: dict[str, Report]
    failed: int = 0  # model, true photos
    rejected: int = 0
    swapped_failed: int = 0
    swapped_rejected: int = 0
    in_sample: int = 0  # scored items that are in the fitting set
    group_overlap: int = 0  # scored items whose title group occurs in the fitting set
    swap: dict[str, str] = field(default_factory=dict)  # item id -> id of the item whose photo it got
    neighbours: dict[str, str] = field(default_factory=dict)  # item id -> retrieved training item id
    retrieval_skipped: int = 0  # unreadable training photos
    aspect_names: list[str] = field(default_factory=list)
    accuracy: dict[str, dict[str, AspectAccuracy]] = field(default_factory=dict)  # system -> aspect -> accuracy
    titles: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # system or "reference" -> category -> (distinct, n)

    @property
    def fit_source(self) -> Path:
        return self.config.train_data or self.config.data

    @property
    def identical_under_swap(self) -> int:
        """Swapped items whose output with another item's photo is byte-identical to the one with their own."""
        swapped = self.predictions.get(SWAPPED, {})
        return sum(swapped.get(i) == self.predictions[MODEL].get(i) for i in self.swap)

    def table(self) -> list[tuple[str, dict[str, Value]]]:
        """(system, summary) per system: :meth:`Report.summary` plus colour accuracy and distinct titles."""
        out = []
        for system, r in self.reports.items():
            colour = self.accuracy.get(system, {}).get("Color")
            extra: dict[str, Value] = {
                "colour_accuracy": colour.accuracy if colour else None,
                "distinct_titles": sum(d for d, _ in self.titles.get(system, {}).values()),
            }
            out.append((system, {**r.summary(), **extra}))
        return out

    def deltas(self) -> dict[str, float | None]:
        """Metric -> model with true photos minus model with swapped photos.

        Empty without the control; all None when no item could be swapped (the control measured nothing).
        """
        if SWAPPED not in self.reports:
            return {}
        if not self.swap:
            return dict.fromkeys(METRICS)
        rows = dict(self.table())
        return {m: _minus(rows[MODEL][m], rows[SWAPPED][m]) for m in METRICS}


def _minus(a: Value, b: Value) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


def select(records: Sequence[ListingRecord], split: SplitName, limit: int | None) -> list[ListingRecord]:
    chosen = sorted((r for r in records if split == "all" or split_of(r) == split), key=lambda r: r.item_id)
    return chosen[:limit] if limit is not None else chosen


def majority_baseline(train: Sequence[ListingRecord]) -> Callable[[ListingRecord], str]:
    """Per-category constant listing from the fitting records (see the module docstring)."""
    by_cat: dict[str, list[ListingRecord]] = defaultdict(list)
    for r in train:
        by_cat[r.category].append(r)
    listing: dict[str, str] = {}
    for cat, rs in by_cat.items():
        names = Counter(n for r in rs for n in r.aspects)
        aspects = {}
        for name, count in names.items():
            if count * 2 >= len(rs):
                aspects[name] = Counter(r.aspects[name] for r in rs if name in r.aspects).most_common(1)[0][0]
        titles = [r.title for r in sorted(rs, key=lambda r: r.item_id)[:MEDOID_SAMPLE]]  # pairwise ROUGE-L: bounded
        best = max(titles, key=lambda t: sum(rouge_l_f1(t, o) for o in titles) / len(titles))
        listing[cat] = canonical_json(best, aspects)
    empty = canonical_json("", {})
    return lambda r: listing.get(r.category, empty)


def retrieval_predictions(baseline: RetrievalBaseline, items: Sequence[ListingRecord]) -> tuple[dict[str, str], dict[str, str]]:
    """(item id -> copied listing JSON, item id -> retrieved item id); no neighbour: the empty listing, no id."""
    outputs: dict[str, str] = {}
    neighbours: dict[str, str] = {}
    for r in items:
        hit = baseline.nearest(r.category, r.image)
        outputs[r.item_id] = canonical_json(hit.title, hit.aspects) if hit else canonical_json("", {})
        if hit:
            neighbours[r.item_id] = hit.item_id
    return outputs, neighbours


def derangement(items: Sequence[ListingRecord], seed: int = 0) -> dict[str, str]:
    """Item id -> id of the item (same category) whose photo it gets in the swap control.

    Within each category with >= 2 items the ids (sorted) are shuffled by
    ``Random(f"{seed}:{category}")`` and each takes the next one's photo (one cycle), so no
    item keeps its own and the result does not depend on the input order. Items alone in
    their category are absent (they keep their photo). Item ids must be unique.
    """
    by_cat: dict[str, list[str]] = defaultdict(list)
    for r in items:
        by_cat[r.category].append(r.item_id)
    out: dict[str, str] = {}
    for cat in sorted(by_cat):
        ids = sorted(by_cat[cat])
        if len(ids) < 2:
            continue
        random.Random(f"{seed}:{cat}").shuffle(ids)
        out.update({ids[i]: ids[(i + 1) % len(ids)] for i in range(len(ids))})
    return out


def fitting_records(config: EvalConfig, scored_folder_records: Sequence[ListingRecord], cats: CategoryRegistry) -> list[ListingRecord]:
    """The train split of ``config.train_data`` (loaded) or, without it, of the scored folder's records."""
    pool = scored_folder_records if config.train_data is None else list(load_abo(config.train_data, cats))
    return [r for r in pool if split_of(r) == "train"]


def check_in_sample(fit: Sequence[ListingRecord], items: Sequence[ListingRecord], allow: bool, source: Path) -> int:
    """How many scored ``items`` are in ``fit`` (by item id); raises :class:`InSampleError` if any and not ``allow``."""
    fit_ids = {r.item_id for r in fit}
    n = sum(r.item_id in fit_ids for r in items)
    if n and not allow:
        raise InSampleError(
            f"{n} of the {len(items)} scored items are in the baselines' training data (train split of {source}): "
            "the baselines would be fitted in-sample. Score the test or validation split, give separate training data "
            "(--train-data FOLDER), or pass --allow-in-sample to accept it (the report then says so)."
        )
    return n


def group_overlap(fit: Sequence[ListingRecord], items: Sequence[ListingRecord]) -> int:
    """Scored items whose title group (:func:`training.abo.group_key`) occurs in the fitting set."""
    groups = {group_key(r.title) for r in fit}
    return sum(group_key(r.title) in groups for r in items)


async def _generate(client: ListingClient, record: ListingRecord, image: Path | None = None) -> tuple[str, str]:
    """(raw output, outcome) for ``record`` with ``image`` (default its own photo); outcome: ok, rejected or failed."""
    try:
        res = await client.generate([(image or record.image).read_bytes()], record.category)
    except InvalidOutputError as e:
        return e.raw or "", "rejected"
    except (InferenceUnavailableError, InferenceRejectedError, ImageRejectedError, OSError):
        return "", "failed"
    return res.raw, "ok"


@dataclass
class _Generated:
    model: str
    outputs: dict[str, dict[str, str]]  # MODEL / SWAPPED -> item id -> raw
    outcomes: dict[str, Counter[str]]


async def _generate_all(
    config: EvalConfig, items: Sequence[ListingRecord], swap: Mapping[str, str], progress: Callable[[int, int], None] | None
) -> _Generated:
    """Model outputs with true photos and, for the items in ``swap``, with the donor's photo."""
    photo = {r.item_id: r.image for r in items}
    jobs = [(MODEL, r, r.image) for r in items] + [(SWAPPED, r, photo[swap[r.item_id]]) for r in items if r.item_id in swap]
    gen = _Generated("", {MODEL: {}, SWAPPED: {}}, {MODEL: Counter(), SWAPPED: Counter()})
    done = 0
    async with ListingClient(
        [config.endpoint],
        max_concurrency=config.concurrency,
        timeout_s=config.timeout_s,
        max_tokens=config.max_tokens,
        repetition_penalty=config.repetition_penalty,
        frequency_penalty=config.frequency_penalty,
    ) as c:
        gen.model = await c.served_model()

        async def one(system: str, r: ListingRecord, image: Path) -> None:
            nonlocal done
            gen.outputs[system][r.item_id], outcome = await _generate(c, r, image)
            gen.outcomes[system][outcome] += 1
            done += 1
            if progress:
                progress(done, len(jobs))

        await asyncio.gather(*(one(*job) for job in jobs))
    return gen


def _ordered(outputs: Mapping[str, str], items: Sequence[ListingRecord]) -> dict[str, str]:
    return {r.item_id: outputs[r.item_id] for r in items}


async def run_eval(
    config: EvalConfig, categories: CategoryRegistry | None = None, progress: Callable[[int, int], None] | None = None
) -> EvalResult:
    """Score the served model, the swap control and both baselines on the chosen items (module contract).

    Raises ``ValueError`` when the split has no items, :class:`InSampleError` (a ValueError)
    before any request when the fitting set holds scored items and that is not allowed,
    ``OSError`` for unreadable data and ``InferenceUnavailableError`` when the endpoint
    never names its model.
    """
    cats = categories or default_categories()
    records = list(load_abo(config.data, cats))
    items = select(records, config.split, config.limit)
    if not items:
        raise ValueError(f"no items in split {config.split!r} of {config.data}")
    fit = fitting_records(config, records, cats)
    in_sample = check_in_sample(fit, items, config.allow_in_sample, config.train_data or config.data)
    swap = derangement(items, config.seed) if config.swap_control else {}
    retrieval = RetrievalBaseline(fit)
    retrieved, neighbours = retrieval_predictions(retrieval, items)
    majority = majority_baseline(fit)
    gen = await _generate_all(config, items, swap, progress)
    predictions = {MODEL: _ordered(gen.outputs[MODEL], items)}
    if config.swap_control:  # items alone in their category keep their photo and their output
        predictions[SWAPPED] = _ordered({**gen.outputs[MODEL], **gen.outputs[SWAPPED]}, items)
    predictions[MAJORITY] = {r.item_id: majority(r) for r in items}
    predictions[RETRIEVAL] = retrieved
    refs = [r.reference() for r in items]
    names = report_aspects(refs)
    ref_outputs = {r.item_id: canonical_json(r.title, r.aspects) for r in items}
    return EvalResult(
        config=config,
        model=gen.model,
        n_train=len(fit),
        references=refs,
        predictions=predictions,
        reports={system: score(p, refs, cats) for system, p in predictions.items()},
        failed=gen.outcomes[MODEL]["failed"],
        rejected=gen.outcomes[MODEL]["rejected"],
        swapped_failed=gen.outcomes[SWAPPED]["failed"],
        swapped_rejected=gen.outcomes[SWAPPED]["rejected"],
        in_sample=in_sample,
        group_overlap=group_overlap(fit, items),
        swap=swap,
        neighbours=neighbours,
        retrieval_skipped=retrieval.skipped,
        aspect_names=names,
        accuracy={system: aspect_accuracy(p, refs, names) for system, p in predictions.items()},
        titles={REFERENCE: distinct_titles(ref_outputs, refs)} | {s: distinct_titles(p, refs) for s, p in predictions.items()},
    )
