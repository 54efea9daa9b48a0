"""The OPAL instruction: one definition for serving, SFT data and judging.

Serving (:func:`serving_messages`) and training (:func:`sft_prompt`) build the same
conversation; the only difference is how the image is attached (an OpenAI
``image_url`` part vs. a TRL ``{"type": "image"}`` part), which the chat template
renders to the same placeholder. ``tests/inference/test_client_vllm.py`` (served vs TRL token ids) proves the texts
are identical, so train and serve prompts cannot drift.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from schemas.category import CategorySchema

SYSTEM_PROMPT = (
    "You are OPAL, a marketplace listing writer. You describe only what the product photo shows "
    "or clearly implies, and you answer with one JSON object."
)

PROMPT_VERSION = "opal-prompt-v1"


def instruction(category: CategorySchema) -> str:
    """The user instruction for a category: task, allowed aspects and output format."""
    parts: list[str] = []
    for a in category.visual_aspects:
        allowed = f"one of: {', '.join(a.values)}" if a.values is not None else "short text"
        parts.append(f"- {a.name}{' (required)' if a.required else ''}: {allowed}")
    return (
        f"Write a marketplace listing for the {category.display_name.lower()} item in the image.\n"
        f"Category: {category.category}\n"
        f'Return JSON: {{"aspects": object, "title": string (at most {category.title_max_chars} characters)}}.\n'
        "Use only these aspects, and only when the image shows or clearly implies them:\n" + "\n".join(parts) + "\n"
        "Leave out sizes, model numbers, prices, shipping and promotional words."
    )


PROMPT_STYLES = ("full", "compact")

# A chat template for models too small to read the whole instruction (the tiny from-scratch model: measured, the
# photo's 16 tokens drown in hundreds of instruction tokens; ../shared/notes/ENVIRONMENT.md). It renders the same
# messages (serving, SFT, DPO, judge all build them here) as: no system message, the image placeholders, and only
# the category from the instruction's "Category: " line. Being part of the model folder, it travels with the model:
# vLLM and TRL both render through it, so train and serve stay identical without any client setting.
COMPACT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}"
    "{% if message['role'] == 'user' and 'Category: ' in content['text'] %}"
    "{{ content['text'].split('Category: ')[1].split('\\n')[0] }}"
    "{% else %}{{ content['text'] }}{% endif %}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(style: str) -> str | None:
    """The chat template a model trained with ``style`` carries: the compact one, or None (keep the model's own)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {', '.join(PROMPT_STYLES)}")
    return COMPACT_CHAT_TEMPLATE if style == "compact" else None


def serving_messages(category: CategorySchema, image_urls: list[str]) -> list[dict[str, Any]]:
    """OpenAI chat messages for a vLLM request (images as URLs or data: URLs)."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    content.append({"type": "text", "text": instruction(category)})
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}, {"role": "user", "content": content}]


def sft_prompt(category: CategorySchema, n_images: int = 1) -> list[dict[str, Any]]:
    """The same conversation in TRL's conversational prompt format (images in an ``images`` column)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": instruction(category)})
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}, {"role": "user", "content": content}]


def completion_json(title: str, aspects: Mapping[str, str], category: CategorySchema) -> str:
    """The target completion: aspects first (in schema order), then the title, compact (what decoding emits).

    Aspects come first so the model names what it sees (colour, material...) right after the photo, and then
    writes a title that can use them; a title first would put tens of tokens between the image and every aspect.
    """
    order = {name: i for i, name in enumerate(category.names)}
    ordered = dict(sorted(aspects.items(), key=lambda kv: order.get(kv[0], len(order))))
    return json.dumps({"aspects": ordered, "title": title}, ensure_ascii=False, separators=(",", ":"))


def sft_completion(title: str, aspects: Mapping[str, str], category: CategorySchema) -> list[dict[str, Any]]:
    """TRL conversational completion for one example."""
    return [{"role": "assistant", "content": [{"type": "text", "text": completion_json(title, aspects, category)}]}]


# -- the judge (the paper's five-level rubric) -------------------------------------------
JUDGE_LEVELS = (
    "Correctly Generated",
    "Mostly Correctly Generated",
    "Partially Correctly Generated",
    "Mostly Incorrectly Generated",
    "Incorrectly Generated",
)

JUDGE_SYSTEM_PROMPT = (
    "You are a strict marketplace listing judge. You compare a generated listing with the product photo and, when given, "
    "the reference listing, and you answer with one JSON object."
)


def judge_instruction(category: CategorySchema, generated: str, reference: str | None) -> str:
    ref = f"Reference listing (ground truth): {reference}\n" if reference else "No reference listing: judge against the image only.\n"
    return (
        f"Category: {category.category}\n{ref}Generated listing: {generated}\n"
        "For every aspect of the generated listing, say whether it is Correctly Identified. Say whether the generated title "
        "matches the product. Then grade the whole listing: Correctly Generated (at least 95% correct), Mostly Correctly "
        "Generated (80-94%), Partially Correctly Generated (50-79%), Mostly Incorrectly Generated (30-49%) or Incorrectly "
        "Generated (below 30%)."
    )


def judge_messages(category: CategorySchema, image_urls: list[str], generated: str, reference: str | None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    content.append({"type": "text", "text": judge_instruction(category, generated, reference)})
    return [{"role": "system", "content": [{"type": "text", "text": JUDGE_SYSTEM_PROMPT}]}, {"role": "user", "content": content}]


def judge_schema(aspect_names: list[str]) -> dict[str, Any]:
    """Structured output of the judge: one label per generated aspect, title match, verdict."""
    name: dict[str, Any] = {"type": "string", "enum": aspect_names} if aspect_names else {"type": "string"}
    return {
        "type": "object",
        "properties": {
            "aspects": {
                "type": "array",
                "maxItems": max(1, len(aspect_names)),
                "items": {
                    "type": "object",
                    "properties": {"name": name, "correctly_identified": {"type": "boolean"}},
                    "required": ["name", "correctly_identified"],
                    "additionalProperties": False,
                },
            },
            "title_matched": {"type": "boolean"},
            "verdict": {"type": "string", "enum": list(JUDGE_LEVELS)},
        },
        "required": ["aspects", "title_matched", "verdict"],
        "additionalProperties": False,
    }


# -- MACE (refine seller data against the image) and LACU (buyer/seller conversations) ---
MACE_SYSTEM_PROMPT = (
    "You clean marketplace listings. You keep only what the product photo shows or clearly implies, and you answer with one JSON object."
)


def mace_messages(
    category: CategorySchema, image_urls: list[str], seller_title: str, seller_aspects: Mapping[str, str]
) -> list[dict[str, Any]]:
    text = (
        f"Category: {category.category}\nSeller title: {seller_title}\n"
        f"Seller aspects: {json.dumps(dict(seller_aspects), ensure_ascii=False)}\n"
        "Rewrite the title keeping only words grounded in the image (no sizes, measurements, pack counts, model or style "
        "codes, prices, shipping or promotional words, emojis). Keep only the aspects the image confirms or reasonably implies."
    )
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    content.append({"type": "text", "text": text})
    return [{"role": "system", "content": [{"type": "text", "text": MACE_SYSTEM_PROMPT}]}, {"role": "user", "content": content}]


LACU_SYSTEM_PROMPT = "You write realistic, helpful conversations between a marketplace buyer and the seller."


def lacu_messages(title: str, aspects: Mapping[str, str], rounds: int) -> list[dict[str, Any]]:
    text = (
        f"Listing title: {title}\nAspects: {json.dumps(dict(aspects), ensure_ascii=False)}\n"
        f"Write a conversation of at least {rounds} rounds: the buyer asks about the item, the seller answers truthfully from "
        "the listing only, covering as many aspects as possible. Never contradict the listing."
    )
    return [{"role": "system", "content": LACU_SYSTEM_PROMPT}, {"role": "user", "content": text}]


def lacu_schema(rounds: int) -> dict[str, Any]:
    turn = {
        "type": "object",
        "properties": {
            "buyer": {"type": "string", "minLength": 1, "maxLength": 200},
            "seller": {"type": "string", "minLength": 1, "maxLength": 300},
        },
        "required": ["buyer", "seller"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"turns": {"type": "array", "items": turn, "minItems": rounds, "maxItems": rounds + 5}},
        "required": ["turns"],
        "additionalProperties": False,
    }
