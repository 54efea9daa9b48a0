"""Quick in-process evaluation of a model folder for a search over recipes (seconds instead of ~10 minutes).

Greedy, *unconstrained* generation with transformers on the grouped test split of an ABO-format
folder, with the true photos and with photos permuted within category (the same derangement as
``opal eval run``), scored with the project's metrics. It is a development tool: the numbers a
model is judged by come from ``opal eval run`` (vLLM, constrained decoding), which agreed with
this to within 0.003 on every headline metric where both were run (docs/MODEL.md).

Run in the model environment, from the repository root::

    .venv-model/bin/python bench/quick_eval.py MODEL_DIR [--data ../shared/data/abo] [--threads 2]

Prints one JSON line: ROUGE-L F1, aspect F1 and colour accuracy with true and swapped photos,
how many outputs are byte-identical under the swap, and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.prompt import serving_messages
from schemas.category import default_categories
from training.abo import ListingRecord, load_abo, split_of
from training.evaluate import derangement
from training.metrics import aspect_accuracy, score


def generate(model: object, processor: object, records: list[ListingRecord], photo: dict[str, Path], batch: int = 32) -> dict[str, str]:
    """Item id -> raw greedy output for ``records``, each shown the photo ``photo[item_id]``."""
    import torch
    from PIL import Image

    cats = default_categories()
    out: dict[str, str] = {}
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        texts = [
            processor.apply_chat_template(serving_messages(cats.resolve(r.category), ["x"]), add_generation_prompt=True, tokenize=False)  # type: ignore[attr-defined]
            for r in chunk
        ]
        images = [Image.open(photo[r.item_id]).convert("RGB") for r in chunk]
        enc = processor(text=texts, images=images, return_tensors="pt", padding=True)  # type: ignore[operator]
        with torch.no_grad():
            seqs = model.generate(**enc, max_new_tokens=128, do_sample=False)  # type: ignore[attr-defined]
        for r, seq in zip(chunk, seqs[:, enc["input_ids"].shape[1] :], strict=True):
            out[r.item_id] = processor.tokenizer.decode(seq, skip_special_tokens=True)  # type: ignore[attr-defined]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/abo"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    cats = default_categories()
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.model).eval()
    records = sorted((r for r in load_abo(args.data, cats) if split_of(r) == "test"), key=lambda r: r.item_id)
    by_id = {r.item_id: r for r in records}
    swap = derangement(records)
    refs = [{"id": r.item_id, "category": r.category, "title": r.title, "aspects": r.aspects} for r in records]
    true = generate(model, processor, records, {r.item_id: r.image for r in records})
    swapped = generate(model, processor, records, {r.item_id: by_id[swap.get(r.item_id, r.item_id)].image for r in records})
    row: dict[str, object] = {"model": str(args.model), "items": len(records)}
    for tag, preds in (("", true), ("_swapped", swapped)):
        rep = score(preds, refs, cats)
        row |= {
            f"rouge_l_f1{tag}": round(rep.rouge_l_f1, 3),
            f"aspect_f1{tag}": round(rep.aspect_f1, 3),
            f"colour_accuracy{tag}": round(aspect_accuracy(preds, refs, ["Color"])["Color"].accuracy, 3),
        }
    row["identical_under_swap"] = sum(true[k] == swapped[k] for k in true)
    row["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
