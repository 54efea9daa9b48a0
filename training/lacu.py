"""LACU: buyer/seller conversations about a refined listing (at least five rounds).

- :func:`conversation_from_listing` builds one deterministically from the refined
  listing and its visual Q&A when no text-LLM endpoint is configured: one round per
  aspect, then Q&A rounds that agree with the listing, padded with listing-level
  questions to the minimum length.
- :func:`contradictions` lists the seller answers that contradict the listing: the
  question asks about an aspect the listing has, and the answer names another value
  of that aspect's closed set but not the listing's value.
- :func:`to_sft_messages` exports a conversation in the chat format SFT uses (the
  image attached to the first buyer turn).
Pure functions; the endpoint variant lives beside the MACE MLLM pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.category import CategorySchema
from training.abo import QA_RULES

MIN_ROUNDS = 5
# listing-level rounds that pad a conversation to MIN_ROUNDS (they say nothing about what the photo shows)
FILLER_QUESTIONS = (
    "Which category is it listed in?",
    "Does the photo show its size?",
    "Is the item shown on its own?",
    "Can you describe it in one line?",
)

QUESTIONS: dict[str, str] = {
    "Color": "What colour is it?",
    "Material": "What is it made of?",
    "Brand": "Which brand is it?",
    "Pattern": "Does it have a pattern?",
    "Shape": "What shape is it?",
    "Heel Type": "What kind of heel does it have?",
    "Toe Shape": "What is the toe like?",
    "Closure": "How does it close?",
    "Metal": "Which metal is it?",
    "Stone": "Which stone does it have?",
    "Finish": "What finish does it have?",
}


@dataclass(frozen=True)
class Turn:
    buyer: str
    seller: str


def _question(name: str) -> str:
    return QUESTIONS.get(name, f"What is the {name.lower()}?")


def _asked_aspect(question: str, category: CategorySchema) -> str | None:
    q = question.lower()
    for keywords, names in QA_RULES:
        if any(k in q for k in keywords):
            for n in names:
                if category.aspect(n) is not None:
                    return n
    return None


def contradictions(turns: list[Turn], aspects: Mapping[str, str], category: CategorySchema) -> list[str]:
    found: list[str] = []
    for t in turns:
        name = _asked_aspect(t.buyer, category)
        spec = category.aspect(name) if name else None
        if name is None or spec is None or spec.values is None or name not in aspects:
            continue
        answer = t.seller.lower()
        want = aspects[name].lower()
        others = [v for v in spec.values if v.lower() != want and re.search(rf"\b{re.escape(v.lower())}\b", answer)]
        if others and not re.search(rf"\b{re.escape(want)}\b", answer):
            found.append(f"{t.buyer!r} answered {t.seller!r} but the listing says {name}={aspects[name]}")
    return found


def conversation_from_listing(
    title: str, aspects: Mapping[str, str], category: CategorySchema, qa: list[tuple[str, str]] = (), min_rounds: int = MIN_ROUNDS
) -> list[Turn]:
    turns = [Turn("What is this item?", f"It is {title}.")]
    turns += [Turn(_question(n), f"{n}: {v}.") for n, v in aspects.items()]
    for q, a in qa:
        candidate = Turn(q.rstrip("?") + "?", a[:1].upper() + a[1:] + ".")
        if not contradictions([candidate], aspects, category):
            turns.append(candidate)
    answers = (
        f"{category.display_name}.",
        "No. Sizes and measurements are not visible in the photo; please check the listing details.",
        "Yes, the photo shows the item itself.",
        f"{title}.",
    )
    fillers = [Turn(q, a) for q, a in zip(FILLER_QUESTIONS, answers, strict=True)]
    for f in fillers:
        if len(turns) >= min_rounds:
            break
        turns.append(f)
    return turns


def visual_rounds(turns: list[Turn]) -> list[Turn]:
    """The rounds about what the photo shows: aspects and catalogue Q&A, without the opening title round and fillers.

    These are the LACU rows SFT adds (:func:`training.sft_format.qa_rows`): the title round repeats the listing
    row's target and the fillers say nothing about the photo.
    """
    return [t for i, t in enumerate(turns) if i > 0 and t.buyer not in FILLER_QUESTIONS]


def to_sft_messages(turns: list[Turn]) -> list[dict[str, Any]]:
    """Alternating user/assistant messages; the image goes with the first buyer question."""
    msgs: list[dict[str, Any]] = []
    for i, t in enumerate(turns):
        content: list[dict[str, Any]] = [{"type": "image"}] if i == 0 else []
        content.append({"type": "text", "text": t.buyer})
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": t.seller}]})
    return msgs
