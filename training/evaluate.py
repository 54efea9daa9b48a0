"""Evaluation run: a served model vs. baselines on a split of ABO-format data, scored with the paper's metrics.

:func:`run_eval` generates one listing per item of the chosen split through an
OpenAI-compatible endpoint (the serving prompt, schema-constrained) and scores it with
:func:`training.metrics.score` against the catalogue reference. Beside the model it
scores a **majority baseline** fitted on the *train* split only: per category, the
commonest value of each aspect that most train items of the category have, and the
train title with the highest mean ROUGE-L F1 to the category's other train titles. A
model that does not beat it has learnt nothing from the image.

Contract
- Model failures are outputs, not crashes: a listing the client rejects is scored on its
  raw text (invalid JSON scores 0 on aspects); an endpoint that stays down counts the
  item as ``failed`` with an empty prediction. Nothing is skipped silently: the report
  says how many items failed.
- Deterministic for a given data folder, split and model (temperature 0; the split is a
  hash of the item's title group, see :func:`training.abo.split_of`).
- :func:`write_eval` writes ``predictions.jsonl``, ``references.jsonl``, ``report.json``
  and ``report.md`` under the output folder (overwriting them: re-running is safe).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from inference.client import InferenceRejectedError, InferenceUnavailableError, ListingClient
from inference.images import ImageRejectedError
from inference.output import InvalidOutputError
from schemas.category import CategoryRegistry, default_categories
from training.abo import ListingRecord, load_abo, split_of
from training.metrics import Report, canonical_json, rouge_l_f1, score

SplitName = Literal["train", "validation", "test", "all"]
MEDOID_SAMPLE = 300  # train titles per category compared pairwise for the baseline title
METRICS = ("rouge_l_f1", "aspect_f1", "schema_recall", "json_valid", "exact_match")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; every field documents itself."""

    data: Path = field(metadata={"help": "Folder with listings.jsonl and images/ in the ABO format (e.g. data/sample)."})
    endpoint: str = field(metadata={"help": "OpenAI-compatible base URL ending in /v1 serving the model under test."})
    split: SplitName = field(default="test", metadata={"help": "Which split to score; `all` includes train items (not held out)."})
    limit: int | None = field(default=None, metadata={"help": "Score at most this many items of the split (first by item id)."})
    concurrency: int = field(default=16, metadata={"help": "Requests in flight."})
    max_tokens: int = field(default=256, metadata={"help": "Most generated tokens per listing."})
    timeout_s: float = field(default=120.0, metadata={"help": "Per-request timeout."})


@dataclass
class EvalResult:
    config: EvalConfig
    model: str
    n_train: int
    references: list[dict[str, object]]
    predictions: dict[str, dict[str, str]]  # system -> item id -> raw output
    reports: dict[str, Report]
    failed: int = 0
    rejected: int = 0

    def table(self) -> list[tuple[str, dict[str, float | int]]]:
        return [(system, r.summary()) for system, r in self.reports.items()]


def select(records: Sequence[ListingRecord], split: SplitName, limit: int | None) -> list[ListingRecord]:
    chosen = sorted((r for r in records if split == "all" or split_of(r) == split), key=lambda r: r.item_id)
    return chosen[:limit] if limit is not None else chosen


def majority_baseline(train: Sequence[ListingRecord]) -> Callable[[ListingRecord], str]:
    """Per-category constant listing from the train split (see the module docstring)."""
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


async def _generate(client: ListingClient, record: ListingRecord) -> tuple[str, str]:
    """(raw output, outcome) where outcome is ok, rejected (client refused the output) or failed."""
    try:
        res = await client.generate([record.image.read_bytes()], record.category)
    except InvalidOutputError as e:
        return e.raw or "", "rejected"
    except (InferenceUnavailableError, InferenceRejectedError, ImageRejectedError, OSError):
        return "", "failed"
    return res.raw, "ok"


async def run_eval(
    config: EvalConfig, categories: CategoryRegistry | None = None, progress: Callable[[int, int], None] | None = None
) -> EvalResult:
    cats = categories or default_categories()
    records = list(load_abo(config.data, cats))
    train = [r for r in records if split_of(r) == "train"]
    items = select(records, config.split, config.limit)
    if not items:
        raise ValueError(f"no items in split {config.split!r} of {config.data}")
    refs = [r.reference() for r in items]
    baseline = majority_baseline(train)
    outputs: dict[str, str] = {}
    outcomes: Counter[str] = Counter()
    async with ListingClient(
        [config.endpoint], max_concurrency=config.concurrency, timeout_s=config.timeout_s, max_tokens=config.max_tokens
    ) as c:
        model = await c.served_model()

        async def one(r: ListingRecord) -> None:
            outputs[r.item_id], outcome = await _generate(c, r)
            outcomes[outcome] += 1
            if progress:
                progress(len(outputs), len(items))

        await asyncio.gather(*(one(r) for r in items))
    predictions = {"model": outputs, "majority baseline": {r.item_id: baseline(r) for r in items}}
    reports = {system: score(p, refs, cats) for system, p in predictions.items()}
    return EvalResult(config, model, len(train), refs, predictions, reports, failed=outcomes["failed"], rejected=outcomes["rejected"])


def markdown(result: EvalResult) -> str:
    c = result.config
    lines = [
        f"# Evaluation: {result.model}",
        "",
        f"Data `{c.data}`, split `{c.split}` ({len(result.references)} items; baseline fitted on {result.n_train} train items). "
        f"Model outputs rejected by the client: {result.rejected}; failed requests: {result.failed}.",
        "",
        "| system | " + " | ".join(METRICS) + " |",
        "| --- | " + " | ".join("---:" for _ in METRICS) + " |",
    ]
    for system, s in result.table():
        lines.append(f"| {system} | " + " | ".join(f"{float(s[m]):.3f}" for m in METRICS) + " |")
    lines += ["", "Per aspect name (model): precision / recall (predicted, reference)", ""]
    for name, (p, r, n_p, n_r) in sorted(result.reports["model"].per_aspect.items(), key=lambda kv: -kv[1][3]):
        lines.append(f"- {name}: {p:.2f} / {r:.2f} ({n_p}, {n_r})")
    return "\n".join(lines) + "\n"


def write_eval(result: EvalResult, out_dir: Path) -> list[Path]:
    """Write the run's files (see the module contract); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in ("predictions.jsonl", "references.jsonl", "report.json", "report.md")]
    with paths[0].open("w") as f:
        for system, preds in result.predictions.items():
            for item_id, output in preds.items():
                f.write(json.dumps({"system": system, "id": item_id, "output": output}, ensure_ascii=False) + "\n")
    paths[1].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.references))
    report = {
        "model": result.model,
        "data": str(result.config.data),
        "split": result.config.split,
        "items": len(result.references),
        "train_items": result.n_train,
        "failed": result.failed,
        "rejected": result.rejected,
        "systems": dict(result.table()),
    }
    paths[2].write_text(json.dumps(report, indent=2) + "\n")
    paths[3].write_text(markdown(result))
    return paths
