"""Vision stage: teach a from-scratch vision tower to see before SFT asks the language model to read it.

A from-scratch tiny Qwen2-VL has a random vision tower. Frozen (the paper's setting, meant for a
*pretrained* encoder) it gives the language model nothing to read; unfrozen inside SFT it gets
almost no gradient, because the loss is dominated by title tokens (measured: colour accuracy
0.149 with true and with swapped photos; ``../shared/notes/ENVIRONMENT.md``). This stage gives
the tower an objective the photo can answer: linear heads on the mean of its output tokens (the
very embeddings the language model receives) predict the item's category and every closed-
vocabulary aspect the training items carry often enough (Color, Material, Pattern, ...). The
heads are thrown away; the tower (patch embedding, blocks and merger) keeps what it learned.

Contract
- :func:`label_heads` builds the heads from the training items only: a head per label with at
  least ``min_items`` labelled items, its classes the values seen at least ``min_count`` times
  (rarer values and missing aspects are ignored in the loss, never guessed).
- :func:`run_vision_stage` trains ``model.model.visual`` (every parameter) and the heads with
  AdamW for ``steps`` steps of ``batch_size`` images, in place, deterministic for a seed on CPU;
  nothing else of the model changes (the language model's parameters get no gradient). Images
  are preprocessed once by the model's own image processor, so the tower learns on exactly the
  pixels serving gives it. Progress through the :class:`training.progress.Reporter`. Returns a
  :class:`VisionStageResult` with per-head accuracy on the last quarter of the steps (training
  batches) and on held-out items when given (the caller's validation split), beside the share of
  the commonest class (what a blind guess scores).
- torch is imported only when called: the stream environment imports this module's config.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.progress import Reporter, fmt_duration


@dataclass(frozen=True)
class VisionStageConfig:
    """How long and how hard the vision tower trains before SFT (every field documents itself)."""

    steps: int = field(default=400, metadata={"help": "Optimiser steps; 0 skips the stage."})
    batch_size: int = field(default=32, metadata={"help": "Images per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant after a 10% linear warm-up)."})
    min_items: int = field(default=50, metadata={"help": "A label gets a head only if at least this many training items carry it."})
    min_count: int = field(default=10, metadata={"help": "A value becomes a class only if at least this many items have it."})
    seed: int = field(default=0, metadata={"help": "Seed for head initialisation and batch order."})


@dataclass(frozen=True)
class LabelledImage:
    """One training image and its labels (``category`` plus aspect name -> value)."""

    image: Path
    labels: dict[str, str]


@dataclass(frozen=True)
class Head:
    """A classification head: label name and its classes (index = class id)."""

    name: str
    classes: tuple[str, ...]

    def target(self, labels: dict[str, str]) -> int:
        """Class id of ``labels[name]``, or -100 (ignored) when absent or rare."""
        v = labels.get(self.name)
        return self.classes.index(v) if v in self.classes else -100


@dataclass(frozen=True)
class HeadScore:
    name: str
    classes: int
    train_accuracy: float
    heldout_accuracy: float | None
    heldout_majority: float | None
    heldout_items: int


@dataclass(frozen=True)
class VisionStageResult:
    steps: int
    seconds: float
    heads: list[HeadScore]
    first_loss: float
    last_loss: float


def label_heads(items: Sequence[LabelledImage], min_items: int = 50, min_count: int = 10) -> list[Head]:
    """Heads for the labels ``items`` carry often enough (see the module contract), ``category`` first."""
    counts: dict[str, Counter[str]] = {}
    for it in items:
        for k, v in it.labels.items():
            counts.setdefault(k, Counter())[v] += 1
    heads: list[Head] = []
    for name in sorted(counts, key=lambda n: (n != "category", n)):
        classes = tuple(sorted(v for v, c in counts[name].items() if c >= min_count))
        if len(classes) >= 2 and sum(counts[name][c] for c in classes) >= min_items:
            heads.append(Head(name, classes))
    return heads


def _pixels(processor: Any, paths: Sequence[Path], reporter: Reporter) -> list[tuple[Any, Any]]:
    """(pixel_values, grid_thw) per image, by the model's own image processor."""
    from PIL import Image

    out = []
    for p in reporter.track(paths, len(paths), "preprocessing images for the vision stage"):
        with Image.open(p) as im:
            enc = processor.image_processor(images=[im.convert("RGB")], return_tensors="pt")
        out.append((enc["pixel_values"], enc["image_grid_thw"]))
    return out


def _pooled(model: Any, batch: Sequence[tuple[Any, Any]]) -> Any:
    import torch

    pixel_values = torch.cat([b[0] for b in batch]).to(model.model.visual.dtype)
    grid = torch.cat([b[1] for b in batch])
    feats = model.model.get_image_features(pixel_values, image_grid_thw=grid).pooler_output
    return torch.stack([f.mean(0) for f in feats])


def run_vision_stage(
    model: Any,
    processor: Any,
    items: Sequence[LabelledImage],
    config: VisionStageConfig,
    reporter: Reporter,
    heldout: Sequence[LabelledImage] = (),
) -> VisionStageResult:
    """Train the vision tower in place (see the module contract)."""
    import torch

    heads = label_heads(items, config.min_items, config.min_count)
    if not heads or config.steps <= 0:
        reporter.note("vision stage: nothing to learn (no label with enough items)" if not heads else "vision stage: skipped (0 steps)")
        return VisionStageResult(0, 0.0, [], float("nan"), float("nan"))
    reporter.note("vision stage heads: " + ", ".join(f"{h.name} ({len(h.classes)} classes)" for h in heads))
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    hidden = int(model.config.text_config.hidden_size if hasattr(model.config, "text_config") else model.config.hidden_size)
    linears = torch.nn.ModuleList([torch.nn.Linear(hidden, len(h.classes)) for h in heads])
    norm = torch.nn.LayerNorm(hidden)
    visual = model.model.visual
    requires = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad = False
    for p in visual.parameters():
        p.requires_grad = True
    params = [*visual.parameters(), *linears.parameters(), *norm.parameters()]
    optim = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01)
    warm = max(1, config.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warm))
    pixels = _pixels(processor, [it.image for it in items], reporter)
    targets = torch.tensor([[h.target(it.labels) for h in heads] for it in items])
    order: list[int] = []
    hits = [[0, 0] for _ in heads]
    losses: list[float] = []
    visual.train()
    t0 = last = time.monotonic()
    tail = config.steps - max(1, config.steps // 4)
    try:
        for step in range(config.steps):
            if len(order) < config.batch_size:
                extra = list(range(len(items)))
                rng.shuffle(extra)
                order += extra
            idx, order = order[: config.batch_size], order[config.batch_size :]
            pooled = norm(_pooled(model, [pixels[i] for i in idx]))
            y = targets[idx]
            loss = torch.zeros(())
            for k, lin in enumerate(linears):
                logits = lin(pooled)
                if (y[:, k] >= 0).any():
                    loss = loss + torch.nn.functional.cross_entropy(logits, y[:, k], ignore_index=-100)
                if step >= tail:
                    known = y[:, k] >= 0
                    hits[k][0] += int((logits.argmax(-1)[known] == y[known, k]).sum())
                    hits[k][1] += int(known.sum())
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            losses.append(float(loss))
            now = time.monotonic()
            if now - last >= 5 or step in (0, config.steps - 1):
                last = now
                pace = (now - t0) / (step + 1)
                reporter.note(
                    f"vision stage step {step + 1}/{config.steps} · loss {losses[-1]:.3f} · "
                    f"{fmt_duration(now - t0)} elapsed · ETA {fmt_duration(pace * (config.steps - step - 1))}"
                )
        scores = _heldout(model, processor, heads, linears, norm, heldout, reporter) if heldout else {}
    finally:
        visual.eval()
        for p in model.parameters():
            p.requires_grad = requires[id(p)]
    result = VisionStageResult(
        steps=config.steps,
        seconds=time.monotonic() - t0,
        heads=[
            HeadScore(
                h.name,
                len(h.classes),
                hits[k][0] / hits[k][1] if hits[k][1] else 0.0,
                *scores.get(h.name, (None, None, 0)),
            )
            for k, h in enumerate(heads)
        ],
        first_loss=losses[0],
        last_loss=sum(losses[-20:]) / len(losses[-20:]),
    )
    return result


def _heldout(
    model: Any, processor: Any, heads: Sequence[Head], linears: Any, norm: Any, items: Sequence[LabelledImage], reporter: Reporter
) -> dict[str, tuple[float | None, float | None, int]]:
    """Per head: (accuracy, commonest-class share, items) on held-out images carrying that head's label."""
    import torch

    pixels = _pixels(processor, [it.image for it in items], reporter)
    preds: list[list[int]] = [[] for _ in heads]
    model.model.visual.eval()
    with torch.no_grad():
        for i in range(0, len(items), 64):
            pooled = norm(_pooled(model, pixels[i : i + 64]))
            for k, lin in enumerate(linears):
                preds[k] += lin(pooled).argmax(-1).tolist()
    out: dict[str, tuple[float | None, float | None, int]] = {}
    for k, h in enumerate(heads):
        pairs = [(p, h.target(it.labels)) for p, it in zip(preds[k], items, strict=True) if h.target(it.labels) >= 0]
        if not pairs:
            out[h.name] = (None, None, 0)
            continue
        common = Counter(t for _, t in pairs).most_common(1)[0][1]
        out[h.name] = (sum(p == t for p, t in pairs) / len(pairs), common / len(pairs), len(pairs))
    return out
