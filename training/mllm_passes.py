"""MACE and LACU through OpenAI-compatible endpoints, for whole datasets.

Contract of :func:`run_mace` / :func:`run_lacu`
- Output is JSONL, one record per item, appended and flushed as items finish; a
  rerun skips ids already in the file (resumable, and the file is the cache).
- At most ``concurrency`` requests are in flight (the client's bound).
- Bad model output (invalid JSON, empty strings, schema breaks, contradictions) and
  unavailable endpoints never stop the run: the item is counted under its failure
  reason in the returned :class:`PassSummary`, nothing is written for it, and a
  rerun tries it again.
- A progress bar shows done/failed/skipped while it runs.

Without an endpoint, :func:`run_mace_rules` / :func:`run_lacu_rules` run the deterministic
passes instead (MACE's rules; conversations built from the listing and its Q&A): they
rewrite ``out`` from the start, in input order, and save the summary beside it.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from inference.client import ListingClient
from inference.images import prepare_image
from inference.output import InvalidOutputError, parse_listing
from inference.prompt import lacu_messages, lacu_schema, mace_messages
from schemas.category import CategoryRegistry
from schemas.errors import OpalError
from training.abo import ListingRecord
from training.lacu import MIN_ROUNDS, Turn, contradictions, conversation_from_listing, to_sft_messages
from training.mace import RefinedListing, refine


@dataclass
class PassSummary:
    name: str
    total: int = 0
    done: int = 0
    skipped: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    removed_by_reason: Counter[str] = field(default_factory=Counter)
    title_chars_before: int = 0
    title_chars_after: int = 0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def save(self, out: Path) -> Path:
        """Write the summary beside ``out`` as ``<out stem>.summary.json``; returns its path."""
        path = out.with_suffix(".summary.json")
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path

    def as_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs and counts the pairs
        return {
            "name": self.name,
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "failures": dict(self.failures),
            "removed_by_reason": dict(self.removed_by_reason),
            "title_chars_before": self.title_chars_before,
            "title_chars_after": self.title_chars_after,
        }


def _done_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(str(json.loads(line)["item_id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn last line from a crash: that item is redone
    return ids


async def _run(
    name: str, items: list[ListingRecord], out: Path, worker: Any, concurrency: int, summary: PassSummary, progress: bool
) -> PassSummary:
    done = _done_ids(out)
    todo = [r for r in items if r.item_id not in done]
    summary.total, summary.skipped = len(items), len(items) - len(todo)
    out.parent.mkdir(parents=True, exist_ok=True)
    sem = asyncio.Semaphore(concurrency)
    with (
        out.open("a") as f,
        Progress(
            TextColumn(f"[bold]{name}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            disable=not progress,
        ) as bar,
    ):
        task = bar.add_task(name, total=len(todo), status="")

        async def one(r: ListingRecord) -> None:
            async with sem:
                try:
                    record = await worker(r)
                except (OpalError, InvalidOutputError) as e:
                    summary.failures[str(e.reason)] += 1
                else:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    f.flush()
                    summary.done += 1
                bar.update(task, advance=1, status=f"done {summary.done} failed {summary.failed}")

        await asyncio.gather(*[one(r) for r in todo])
    summary.save(out)
    return summary


async def run_mace(
    records: Iterable[ListingRecord],
    client: ListingClient,
    out: Path,
    categories: CategoryRegistry,
    concurrency: int = 8,
    progress: bool = True,
) -> PassSummary:
    """Deterministic MACE, then the MLLM rewrite against the image; provenance of both in every line."""
    summary = PassSummary("mace")

    async def work(r: ListingRecord) -> dict[str, Any]:
        cat = categories.resolve(r.category)
        det = refine(r.item_id, r.title, r.aspects, cat)
        url = prepare_image(r.image.read_bytes()).data_url()
        resp, *_ = await client.complete_json(mace_messages(cat, [url], det.title, det.aspects), cat.json_schema(), f"mace_{cat.category}")
        raw = resp["choices"][0]["message"].get("content") or ""
        listing, check = parse_listing(raw, cat, strict=False)
        for rem in det.removed:
            summary.removed_by_reason[rem.reason] += 1
        summary.title_chars_before += len(r.title)
        summary.title_chars_after += len(listing.title)
        return {
            "item_id": r.item_id,
            "category": r.category,
            "image": str(r.image),
            "original": {"title": r.title, "aspects": r.aspects},
            "deterministic": {"title": det.title, "aspects": det.aspects, **_removals(det)},
            "refined": {"title": listing.title, "aspects": listing.aspects},
            "qa": r.qa,
            "mllm_dropped": check.unknown_keys + check.invalid_values,
            "model": resp.get("model", ""),
        }

    return await _run("mace", list(records), out, work, concurrency, summary, progress)


def _removals(det: RefinedListing) -> dict[str, list[dict[str, Any]]]:
    """What MACE's rules removed from a listing (the provenance every MACE line carries)."""
    return {"removed": [asdict(x) for x in det.removed], "dropped_aspects": [asdict(x) for x in det.dropped_aspects]}


def run_mace_rules(records: Iterable[ListingRecord], out: Path, categories: CategoryRegistry) -> PassSummary:
    """MACE's deterministic pass alone (no endpoint): one line per record, ``out`` rewritten, summary saved beside it."""
    items = list(records)
    summary = PassSummary("mace (deterministic)", total=len(items))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for r in items:
            d = refine(r.item_id, r.title, r.aspects, categories.resolve(r.category))
            for rem in d.removed:
                summary.removed_by_reason[rem.reason] += 1
            record = {
                "item_id": r.item_id,
                "category": r.category,
                "image": str(r.image),
                "original": {"title": r.title, "aspects": r.aspects},
                "deterministic": _removals(d),
                "refined": {"title": d.title, "aspects": d.aspects},
                "qa": r.qa,
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            summary.done += 1
    summary.save(out)
    return summary


async def lacu_conversation(
    client: ListingClient, title: str, aspects: dict[str, str], category: Any, rounds: int = MIN_ROUNDS
) -> list[Turn]:
    """One conversation from a text LLM; raises InvalidOutputError if short, unparseable or contradicting the listing."""
    resp, *_ = await client.complete_json(lacu_messages(title, aspects, rounds), lacu_schema(rounds), "lacu", max_tokens=1024)
    raw = resp["choices"][0]["message"].get("content") or ""
    try:
        turns = [Turn(str(t["buyer"]).strip(), str(t["seller"]).strip()) for t in json.loads(raw)["turns"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InvalidOutputError(f"unusable conversation ({type(e).__name__}: {e})", raw) from None
    turns = [t for t in turns if t.buyer and t.seller]
    if len(turns) < rounds:
        raise InvalidOutputError(f"only {len(turns)} usable rounds, need {rounds}", raw)
    bad = contradictions(turns, aspects, category)
    if bad:
        raise InvalidOutputError(f"conversation contradicts the listing: {bad[0]}", raw)
    return turns


async def run_lacu(
    refined: Iterable[dict[str, Any]],
    client: ListingClient,
    out: Path,
    categories: CategoryRegistry,
    concurrency: int = 8,
    progress: bool = True,
) -> PassSummary:
    """Conversations for MACE output lines (``item_id``, ``category``, ``refined``)."""
    summary = PassSummary("lacu")
    rows = list(refined)
    by_id = {str(r["item_id"]): r for r in rows}
    records = [
        ListingRecord(str(r["item_id"]), Path(r.get("image", "")), r["refined"]["title"], r["category"], r["refined"]["aspects"])
        for r in rows
    ]

    async def work(r: ListingRecord) -> dict[str, Any]:
        turns = await lacu_conversation(client, r.title, r.aspects, categories.resolve(r.category))
        return {
            "item_id": r.item_id,
            "image": by_id[r.item_id].get("image"),
            "turns": [asdict(t) for t in turns],
            "messages": to_sft_messages(turns),
        }

    return await _run("lacu", records, out, work, concurrency, summary, progress)


def run_lacu_rules(refined: Iterable[dict[str, Any]], out: Path, categories: CategoryRegistry) -> PassSummary:
    """Conversations built from each MACE line's refined listing and Q&A (no endpoint); ``out`` rewritten, summary saved.

    A conversation that contradicts its listing is counted as a ``contradiction`` failure and not written.
    """
    rows = list(refined)
    summary = PassSummary("lacu (from the listing)", total=len(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row in rows:
            cat = categories.resolve(row["category"])
            qa = [(q, a) for q, a in row.get("qa", [])]
            turns = conversation_from_listing(row["refined"]["title"], row["refined"]["aspects"], cat, qa)
            if contradictions(turns, row["refined"]["aspects"], cat):
                summary.failures["contradiction"] += 1
                continue
            record = {
                "item_id": row["item_id"],
                "image": row.get("image"),
                "turns": [asdict(t) for t in turns],
                "messages": to_sft_messages(turns),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            summary.done += 1
    summary.save(out)
    return summary
