"""A model card for a trained OPAL model folder: what it was trained on, how, and what it scores.

:func:`write_card` reads the folder's ``opal_model.json`` (written by training: base, recipe,
every effective setting, the vision stage's head accuracies) and an ``opal eval run`` output
folder (``report.json``, ``report.md``) for that model, then

- adds ``test_metrics`` to ``opal_model.json`` (the evaluated model's headline numbers, the
  image-swap deltas, the baselines' numbers, the data and split they were measured on), and
- writes ``README.md`` in the model folder: data and attribution, recipe, vision stage,
  the evaluation report, how to reproduce it, limits.

Contract: refuses (``ValueError``) an evaluation of another model version than the folder's,
so a card never shows numbers of different weights. Idempotent: rerunning rewrites both files
from the same inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ABO_CREDIT = (
    "Trained on the Amazon Berkeley Objects (ABO) dataset by Amazon.com, CC BY 4.0 "
    "(https://amazon-berkeley-objects.s3.amazonaws.com/index.html); Collins et al., "
    '"ABO: Dataset and Benchmarks for Real-World 3D Object Understanding", CVPR 2022. '
    "Visual Q&A pairs from the public repository mohit065/VR_Project2_MohitNaik_IMT2022076."
)
HEADLINE = ("rouge_l_f1", "aspect_f1", "colour_accuracy", "json_valid", "schema_recall")


def _headline(system: dict[str, Any]) -> dict[str, float | None]:
    return {k: system.get(k) for k in HEADLINE}


def write_card(model_dir: Path, eval_dir: Path, reproduce: str) -> dict[str, Any]:
    """Add ``test_metrics`` to the card and write ``README.md`` (see the module contract); returns the card."""
    card_path = model_dir / "opal_model.json"
    card = json.loads(card_path.read_text())
    report = json.loads((eval_dir / "report.json").read_text())
    served = f"{card['name']}@{card['version']}"
    if report["model"] != served:
        raise ValueError(f"{eval_dir} evaluated {report['model']}, not this folder's {served}: evaluate this model first")
    systems = report["systems"]
    metrics = {
        "data": report["data"],
        "split": report["split"],
        "items": report["items"],
        "train_items": report["train_items"],
        "model": _headline(systems["model"]),
        "photos_swapped": _headline(systems.get("model, photos swapped", {})),
        "swap_deltas": report["swap_control"]["deltas"],
        "majority_baseline": _headline(systems["majority baseline"]),
        "retrieval_baseline": _headline(systems["retrieval baseline"]),
        "guaranteed_by_constrained_decoding": report["guaranteed_by_constrained_decoding"],
    }
    card["test_metrics"] = json.dumps(metrics, sort_keys=True)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    (model_dir / "README.md").write_text(readme(model_dir, card, metrics, (eval_dir / "report.md").read_text(), reproduce))
    return card


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def parameters(model_dir: Path) -> int:
    """Parameter count from the safetensors headers (shapes only; no tensor is loaded)."""
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                total += n
    return total


def readme(model_dir: Path, card: dict[str, Any], metrics: dict[str, Any], eval_md: str, reproduce: str) -> str:
    """The model card's Markdown."""
    settings = json.loads(card.get("sft_settings", "{}"))
    vision = json.loads(card["vision_stage"]) if "vision_stage" in card else None
    m, sw, maj = metrics["model"], metrics["photos_swapped"], metrics["majority_baseline"]
    lines = [
        f"# {card['name']} {card['version']}",
        "",
        f"A {parameters(model_dir) / 1e6:.1f}M-parameter Qwen2-VL trained from scratch on the {card.get('items', '?')} "
        f"train-split photos of `{card.get('data', 'ABO')}` (grouped split) to write OPAL listings: aspects, then a title. "
        "It is small enough to ship in the repository and to serve on a 2-core CPU with "
        "vLLM, so `make demo` shows a model that reads the photo. It is weak: it knows 24 categories' common colours, "
        "materials and title words, nothing else.",
        "",
        f"On the grouped test split ({metrics['items']} items whose products never occur in training): colour accuracy "
        f"{_fmt(m['colour_accuracy'])} with the true photos, {_fmt(sw.get('colour_accuracy'))} with photos swapped within "
        f"category (the per-category majority guess: {_fmt(maj['colour_accuracy'])}); aspect F1 {_fmt(m['aspect_f1'])} "
        f"(majority {_fmt(maj['aspect_f1'])}); ROUGE-L F1 {_fmt(m['rouge_l_f1'])} (majority {_fmt(maj['rouge_l_f1'])}).",
        "",
        "## Data and attribution",
        "",
        ABO_CREDIT,
        "",
        "## Reproduce",
        "",
        "```",
        reproduce,
        "```",
        "",
        "## Recipe",
        "",
        f"`{card.get('sft_recipe', '?')}`, prompt style `{card.get('prompt_style', 'full')}` (the folder's chat template "
        "renders only the image and the category), trained by `opal train sft`; base `"
        f"{card.get('base_version', '?')}`; {card.get('steps', '?')} steps.",
        "",
        "| setting | value | from |",
        "| --- | --- | --- |",
        *(f"| {k} | {v['value']} | {v['source']} |" for k, v in sorted(settings.items())),
        "",
    ]
    if vision:
        lines += [
            f"## Vision stage ({vision['steps']} steps, {vision['seconds']:.0f} s)",
            "",
            "Linear heads on the mean of the vision tower's output tokens, thrown away afterwards; accuracy on the "
            "validation split beside the commonest class there.",
            "",
            "| head | classes | train batches | validation | commonest class | n |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *(
                f"| {h['name']} | {h['classes']} | {h['train_accuracy']:.3f} | {_fmt(h['heldout_accuracy'])} | "
                f"{_fmt(h['heldout_majority'])} | {h['heldout_items']} |"
                for h in vision["heads"]
            ),
            "",
        ]
    body = eval_md.split("\n", 1)[1] if eval_md.startswith("# ") else eval_md
    lines += ["## Evaluation (`opal eval run`)", "", body.replace("\n## ", "\n### ").strip(), ""]
    return "\n".join(lines)
