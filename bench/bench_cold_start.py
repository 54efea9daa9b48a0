"""The first requests after `opal serve` reports healthy, against the steady state.

    .venv/bin/python bench/bench_cold_start.py [--model models/opal-tiny-abo] [--requests 40] [--no-warm-up]

Starts vLLM the way `opal serve` does (``opal.vllm_server.start_vllm``: healthy only after its
warm-up request unless ``--no-warm-up``), then sends ``--requests`` concurrent listing requests
through the real client (the 40 sample photos, their categories, logprobs, structured output)
as soon as it is healthy, then the same batch again. Prints both wall times and their ratio
(target: the first batch within 2x the second). Also prints how long the start took.

It does that twice: with an empty compile cache (a new machine), then again in a new run dir with the
compile cache the first start filled (a restart, or another replica on a shared cache volume).
"""

from __future__ import annotations

import argparse
import asyncio
import re
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


def warm_up_seconds(log: Path) -> float | None:
    """The warm-up request's time as start_vllm wrote it into the server's log."""
    found = re.findall(r"warm-up request answered in ([0-9.]+) s", log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "opal-tiny-abo")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--no-warm-up", action="store_true")
    args = ap.parse_args()
    root = (REPO / ".opal" / "run" / f"bench-cold-start-{time.time_ns()}").resolve()
    settings = VllmSettings(compile_cache_dir=root / "compile-cache")  # nothing compiled yet: a new machine
    rows = []
    for start in ("fresh (new machine)", "restart (cache kept)"):
        t0 = time.perf_counter()
        proc, url = start_vllm(args.model, settings, root / f"run-{len(rows)}", timeout_s=900, warm_up=not args.no_warm_up)
        started = time.perf_counter() - t0
        try:
            first = asyncio.run(batch(url, args.requests))
            second = asyncio.run(batch(url, args.requests))
        finally:
            proc.stop()
        rows.append((start, started, warm_up_seconds(proc.log_path), first, second))
        print(f"{start}: healthy after {started:.1f} s; first {args.requests} requests {first:.1f} s, next {second:.1f} s", flush=True)
    print(
        f"\n{'start':<22}{'to healthy s':>13}{'warm-up req s':>15}{'first ' + str(args.requests) + ' s':>11}{'next s':>8}{'first/next':>12}"
    )
    for start, started, warm, first, second in rows:
        shown = "-" if warm is None else f"{warm:.1f}"
        print(f"{start:<22}{started:>13.1f}{shown:>15}{first:>11.1f}{second:>8.1f}{first / second:>12.2f}")
    (_, fresh, _, first, second), (_, again, *_) = rows
    print(f"restart with the compile cache: healthy after {again:.1f} s (fresh {fresh:.1f} s)")
    print(f"cold start: first/steady {first / second:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
