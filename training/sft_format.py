"""SFT rows in TRL's conversational prompt/completion format, built from the one
prompt module (``inference.prompt``), and the exact token ids TRL's collator feeds
the model for a row's prompt (used to prove train/serve prompt identity)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from inference.prompt import sft_completion, sft_prompt
from schemas.category import CategorySchema


def sft_row(title: str, aspects: Mapping[str, str], category: CategorySchema, image: Any) -> dict[str, Any]:
    """One training row: ``prompt`` and ``completion`` messages plus an ``images`` column (PIL images)."""
    return {"prompt": sft_prompt(category, 1), "completion": sft_completion(title, aspects, category), "images": [image]}


def qa_rows(turns: Sequence[tuple[str, str]], image: Any) -> list[dict[str, Any]]:
    """LACU rows: one per (buyer question, seller answer) round, the photo attached to the question.

    Short targets the photo can answer ("What colour is it?" -> "Color: black."): beside the listing rows they
    teach a small model to read the image tokens (the paper's LACU adds such conversations to SFT).
    """
    return [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": a}]}],
            "images": [image],
        }
        for q, a in turns
    ]


def trl_prompt_ids(row: dict[str, Any], processor: Any) -> list[int]:
    """Prompt token ids exactly as TRL 1.16's vision prompt/completion collator builds them."""
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    example = {
        "prompt": prepare_multimodal_messages(row["prompt"], images=row["images"]),
        "completion": prepare_multimodal_messages(row["completion"]),
    }
    rendered = apply_chat_template(example, processor)
    out = processor(images=[row["images"]], text=[rendered["prompt"]], add_special_tokens=False)
    return [int(i) for i in out["input_ids"][0]]
