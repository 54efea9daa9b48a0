"""DPO preference pairs, offline: run a model on the train split, judge it, keep the bottom two verdicts.

The paper's step 4: the SFT model generates a listing for each training item; the judge
(here :func:`training.judge.reference_judge` against the MACE-refined reference) gives
one of five verdicts; *Mostly Incorrectly* and *Incorrectly Generated* outputs become
pairs with the reference as ``chosen`` and the output as ``rejected``
(:func:`training.judge.preference_pair`, deterministic ``pair_id``).

Contract
- :func:`build_pairs` never raises for one bad item: an output the client rejects is
  judged on what could be parsed of it (nothing: the lowest verdict), an endpoint that
  stays down counts the item as failed. Counts per verdict and failures are returned.
- :func:`write_pairs` writes one ``PreferencePair`` JSON per line, the same document the
  streaming judge puts on the preferences topic, so :mod:`training.dpo` reads both.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from inference.client import InferenceRejectedError, InferenceUnavailableError, ListingClient, model_info
from inference.images import ImageRejectedError
from inference.output import InvalidOutputError
from schemas.category import CategoryRegistry
from schemas.events import ImageRef, PreferencePair
from training.abo import ListingRecord
from training.judge import preference_pair, reference_judge, to_outcome
from training.metrics import parse_prediction


@dataclass
class PairsSummary:
    items: int = 0
    failed: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    pairs: list[PreferencePair] = field(default_factory=list)


async def build_pairs(
    items: list[tuple[ListingRecord, str, dict[str, str]]],
    client: ListingClient,
    categories: CategoryRegistry,
    progress: Callable[[int, int], None] | None = None,
) -> PairsSummary:
    """Generate, judge against the reference, and pair the bottom two verdicts (see the module contract)."""
    summary = PairsSummary(items=len(items))
    done = 0

    async def one(r: ListingRecord, ref_title: str, ref_aspects: dict[str, str]) -> None:
        nonlocal done
        cat = categories.resolve(r.category)
        try:
            res = await client.generate([r.image.read_bytes()], cat)
            raw, model = res.raw, res.model
        except InvalidOutputError as e:
            raw, model = e.raw or "", model_info(await client.served_model())
        except (InferenceUnavailableError, InferenceRejectedError, ImageRejectedError, OSError):
            summary.failed += 1
            return
        finally:
            done += 1
            if progress:
                progress(done, len(items))
        title, aspects = parse_prediction(raw) or ("", {})
        judgement = reference_judge(title, aspects, ref_title, ref_aspects)
        summary.verdicts[judgement.verdict.value] += 1
        outcome = to_outcome(judgement, r.item_id, f"offline-{r.item_id}", r.category, title, aspects, model, (ref_title, ref_aspects))
        pair = preference_pair(outcome, cat, ImageRef(uri=r.image.resolve().as_uri()))
        if pair is not None:
            summary.pairs.append(pair)

    await asyncio.gather(*(one(*it) for it in items))
    summary.pairs.sort(key=lambda p: p.pair_id)
    return summary


def write_pairs(pairs: list[PreferencePair], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(p.model_dump_json() + "\n" for p in pairs))
    return out


def read_pairs(path: Path) -> list[PreferencePair]:
    return [PreferencePair.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]
