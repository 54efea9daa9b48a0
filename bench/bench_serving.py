"""Client path vs. vLLM offline: throughput and latency on the same model, prompts and images.

Run in the model environment (it needs vllm for the offline side):

    .venv-model/bin/python bench/bench_serving.py [--requests 256] [--concurrency 32]

1. builds (or reuses) the tiny model in .opal/models/,
2. starts a real vLLM OpenAI server and drives it through inference.client.ListingClient
   at saturation (``--concurrency`` in flight), recording each request's latency,
3. stops it and runs the same requests through offline ``vllm.LLM.chat``,
4. prints req/s, p50/p99 latency and the ratio client/offline (target >= 0.90), and
   writes a latency histogram to docs/img/serving_latency.png.
Both sides use guidance-constrained JSON per category and temperature 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.plot import histogram_png  # noqa: E402
from inference.client import ListingClient  # noqa: E402
from inference.prompt import serving_messages  # noqa: E402
from opal.samples import load_samples  # noqa: E402
from opal.vllm_server import start_vllm, vllm_env  # noqa: E402
from schemas.category import default_categories  # noqa: E402
from schemas.settings import VllmSettings  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def client_run(
    url: str, jobs: list[tuple[bytes, str]], concurrency: int, max_tokens: int, rounds: int
) -> tuple[list[float], list[float], int]:
    """Seconds per round, every request's latency (ms), completion tokens of one round."""
    lat: list[float] = []
    elapsed: list[float] = []
    tokens = 0
    async with ListingClient([url], max_concurrency=concurrency, timeout_s=300, max_tokens=max_tokens) as c:
        await asyncio.gather(*[c.generate([img], cat) for img, cat in jobs[:concurrency]])  # warm-up (grammar compile)

        async def one(img: bytes, cat: str) -> int:
            t = time.perf_counter()
            r = await c.generate([img], cat)
            lat.append((time.perf_counter() - t) * 1000)
            return r.completion_tokens

        for _ in range(rounds):
            t0 = time.perf_counter()
            tokens = sum(await asyncio.gather(*[one(img, cat) for img, cat in jobs]))
            elapsed.append(time.perf_counter() - t0)
            print(f"  client round: {len(jobs) / elapsed[-1]:.1f} req/s", flush=True)
        return elapsed, lat, tokens


def offline_run(
    model_dir: Path, jobs: list[tuple[bytes, str]], settings: VllmSettings, max_tokens: int, rounds: int
) -> tuple[list[float], int]:
    """Seconds per round and completion tokens of one round, through offline ``LLM.chat``."""
    os.environ.update(vllm_env(settings, REPO / ".opal" / "run" / "bench"))  # same KV-cache size and offline env as the server
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = LLM(
        model=str(model_dir),
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=True,
        limit_mm_per_prompt={"image": 1, "video": 0},
        structured_outputs_config={"backend": "guidance", "disable_any_whitespace": True},
    )
    cats = default_categories()
    messages = []
    params = []
    for img, cat in jobs:
        url = "data:image/jpeg;base64," + base64.b64encode(img).decode()
        messages.append(serving_messages(cats.get(cat), [url]))
        params.append(
            SamplingParams(
                max_tokens=max_tokens, temperature=0.0, structured_outputs=StructuredOutputsParams(json=cats.get(cat).json_schema())
            )
        )
    warm = min(len(jobs), settings.max_num_seqs)
    llm.chat(messages[:warm], params[:warm], use_tqdm=False)
    elapsed: list[float] = []
    tokens = 0
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            outs = llm.chat(messages, params, use_tqdm=False)
            elapsed.append(time.perf_counter() - t0)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            print(f"  offline round: {len(jobs) / elapsed[-1]:.1f} req/s", flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()  # do not leave engine processes behind
    return elapsed, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="Measured rounds per path; medians are compared.")
    ap.add_argument("--model", type=Path, default=REPO / ".opal" / "models" / "tiny-seed0")
    args = ap.parse_args()

    if not (args.model / "config.json").exists():
        from training.tiny_model import build_tiny_model

        build_tiny_model(args.model)
    samples = load_samples()
    jobs = [(samples[i % len(samples)].image.read_bytes(), samples[i % len(samples)].product_type) for i in range(args.requests)]
    settings = VllmSettings(max_num_seqs=args.concurrency)

    proc, url = start_vllm(args.model, settings, REPO / ".opal" / "run" / "bench")
    try:
        c_el, lat, c_tokens = asyncio.run(client_run(url, jobs, args.concurrency, args.max_tokens, args.rounds))
    finally:
        proc.stop()
    o_el, o_tokens = offline_run(args.model, jobs, settings, args.max_tokens, args.rounds)

    c_rps = [args.requests / e for e in c_el]
    o_rps = [args.requests / e for e in o_el]
    cm, om = statistics.median(c_rps), statistics.median(o_rps)
    print(
        f"\n{args.requests} requests x {args.rounds} rounds, {args.concurrency} in flight, max {args.max_tokens} tokens, "
        f"model {args.model.name}, {os.cpu_count()} CPUs"
    )
    print(f"{'path':<24}{'req/s med':>10}{'min':>7}{'max':>7}{'tok/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    print(
        f"{'client -> vLLM server':<24}{cm:>10.1f}{min(c_rps):>7.1f}{max(c_rps):>7.1f}{c_tokens * cm / args.requests:>8.0f}"
        f"{statistics.median(lat):>9.0f}{pct(lat, 0.99):>9.0f}"
    )
    print(f"{'offline LLM.chat':<24}{om:>10.1f}{min(o_rps):>7.1f}{max(o_rps):>7.1f}{o_tokens * om / args.requests:>8.0f}{'-':>9}{'-':>9}")
    print(f"ratio client/offline throughput (medians): {cm / om:.2f} (target >= 0.90)")
    c_rps_m, o_rps_m = cm, om
    png = histogram_png(
        {"client latency": lat},
        REPO / "docs" / "img" / "serving_latency.png",
        f"OPAL client -> vLLM (CPU), {args.requests} req @ {args.concurrency} in flight",
    )
    print(f"latency histogram: {png.relative_to(REPO)}")
    print(
        json.dumps(
            {
                "client_rps": c_rps_m,
                "offline_rps": o_rps_m,
                "ratio": c_rps_m / o_rps_m,
                "p50_ms": statistics.median(lat),
                "p99_ms": pct(lat, 0.99),
            }
        )
    )


if __name__ == "__main__":
    main()
