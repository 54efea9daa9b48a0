"""The first requests after `opal serve` reports healthy, against the steady state.

    .venv/bin/python bench/bench_cold_start.py [--model models/opal-tiny-abo] [--requests 40] [--no-warm-up]

Starts vLLM the way `opal serve` does (``opal.vllm_server.start_vllm``: healthy only after its
warm-up request unless ``--no-warm-up``), then sends ``--requests`` concurrent listing requests
through the real client (the 40 sample photos, their categories, logprobs, structured output)
as soon as it is healthy, then the same batch again. Prints both wall times and their ratio
(target: the first batch within 2x the second). Also prints how long the start took.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.client import ListingClient  # noqa: E402
from opal.samples import load_samples  # noqa: E402
from opal.vllm_server import start_vllm  # noqa: E402
from schemas.settings import VllmSettings  # noqa: E402


async def batch(url: str, n: int) -> float:
    samples = load_samples()
    async with ListingClient([url], max_concurrency=n) as client:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(client.generate([samples[i % len(samples)].image.read_bytes()], samples[i % len(samples)].product_type) for i in range(n))
        )
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "opal-tiny-abo")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--no-warm-up", action="store_true")
    args = ap.parse_args()
    run_dir = (REPO / ".opal" / "run" / f"bench-cold-start-{time.time_ns()}").resolve()  # a fresh cache folder: a real restart
    t0 = time.perf_counter()
    proc, url = start_vllm(args.model, VllmSettings(), run_dir, timeout_s=900, warm_up=not args.no_warm_up)
    started = time.perf_counter() - t0
    try:
        first = asyncio.run(batch(url, args.requests))
        second = asyncio.run(batch(url, args.requests))
    finally:
        proc.stop()
    print(f"start to healthy: {started:.1f} s ({'with' if not args.no_warm_up else 'without'} the warm-up request)")
    print(f"first {args.requests} requests after healthy: {first:.1f} s; the next {args.requests}: {second:.1f} s")
    print(f"cold start: first/steady {first / second:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
