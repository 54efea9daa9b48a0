"""vLLM's CPU per request with 2-4 MP photos: sent as uploaded, capped at 1024 px a side (the worker before), or
resized on the worker to the served model's pixel budget (the worker now).

    .venv/bin/python bench/bench_image_budget.py [--requests 80] [--rounds 2] [--model models/opal-tiny-abo]

Photos: the 40 sample ABO photos upscaled (bicubic) to 1600, 1800 or 2000 px square (2.6-4.0 MP) and saved as
JPEG quality 90. The shipped ABO set is 256 px; marketplace uploads are this size. Every request carries a photo
of its own (a 24 px corner block coded with the request's number), so vLLM's multimodal input cache never
answers for a photo it has processed before.

vLLM is started as `opal serve` starts it (`start_vllm`, warmed up). For each mode and round, ``--requests``
listing requests go through `inference.client.ListingClient`, 8 at once. The CPU seconds of vLLM's API-server
process (where vLLM v1 decodes and resizes images: the input processor runs in the front end) and of its
engine-core process are read from /proc before and after. The worker's CPU to prepare each photo
(`inference.images.prepare_image`: full decode, checks, resize, re-encode) is timed in this process. Rounds
alternate the order of the modes, so drift in the machine's speed hits all alike.

The last line is ``image budget: vLLM API-server CPU per request <before> ms -> <after> ms (<ratio>x)``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from inference.client import ListingClient  # noqa: E402
from inference.images import PixelBudget, PreparedImage, inspect_image, prepare_image  # noqa: E402
from opal.embedded import ManagedProcess  # noqa: E402
from opal.samples import load_samples  # noqa: E402
from opal.vllm_server import start_vllm  # noqa: E402
from schemas.settings import OpalSettings  # noqa: E402

SIDES = (1600, 1800, 2000)
MODES = ("as uploaded", "1024 px cap (before)", "model budget (now)")


def proc_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def engine_pids(server: ManagedProcess) -> tuple[int, list[int]]:
    """The API-server pid and the other processes of its tree (engine core, its workers)."""
    assert server.pid is not None
    return server.pid, [p for p in proc_tree(server.pid) if p != server.pid]


def upload(base: Image.Image, side: int, code: int) -> bytes:
    """``base`` upscaled to ``side`` px square with a corner block coded by ``code`` (a photo of its own), JPEG q90."""
    img = base.resize((side, side), Image.Resampling.BICUBIC)
    img.paste((code % 251, (code // 251) % 251, 255 - code % 199), (0, 0, 24, 24))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def preparer(mode: str, budget: PixelBudget) -> Callable[[bytes], PreparedImage]:
    if mode == MODES[0]:
        return lambda data: PreparedImage(data, "image/jpeg", *_size(data), inspect_image(data).sha256)
    if mode == MODES[1]:
        return lambda data: prepare_image(data)
    return lambda data: prepare_image(data, budget=budget)


def _size(data: bytes) -> tuple[int, int]:
    h = inspect_image(data)
    return h.width, h.height


async def send(url: str, images: list[PreparedImage], categories: list[str]) -> list[float]:
    """Every image in one listing request, 8 in flight; the latency of each (s)."""
    async with ListingClient([url], max_concurrency=8, timeout_s=300, max_retries=0) as client:
        sem = asyncio.Semaphore(8)

        async def one(img: PreparedImage, cat: str) -> float:
            async with sem:
                t0 = time.perf_counter()
                try:
                    await client.generate([img], cat)
                except Exception as e:  # a random-weight answer that is not a listing still cost the server the same
                    if "Unavailable" in type(e).__name__:
                        raise
                return time.perf_counter() - t0

        return await asyncio.gather(*(one(i, c) for i, c in zip(images, categories, strict=True)))


async def served_budget(url: str) -> PixelBudget:
    async with ListingClient([url], max_retries=2) as client:
        budget = await client.pixel_budget()
    if budget is None:
        raise SystemExit("the served model declares no pixel budget in a readable preprocessor_config.json")
    return budget


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=80, help="Requests per mode and round.")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "opal-tiny-abo")
    args = ap.parse_args()
    samples = load_samples()
    bases = [Image.open(s.image).convert("RGB") for s in samples]
    categories = [s.product_type for s in samples]
    base = OpalSettings()
    run_dir = (REPO / ".opal" / "run" / "bench-image-budget").resolve()
    print(f"starting vLLM ({args.model.name}) ...", flush=True)
    server, url = start_vllm(args.model, base.vllm, run_dir, timeout_s=600)
    results: dict[str, dict[str, list[float]]] = {m: {"api": [], "engine": [], "prep": [], "lat": [], "kb": [], "px": []} for m in MODES}
    try:
        budget = asyncio.run(served_budget(url))
        print(f"served model's budget: {budget.max_pixels:,} px, sides in multiples of {budget.factor} ({budget.source})", flush=True)
        code = 0
        for rnd in range(args.rounds):
            order = MODES if rnd % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                uploads = []
                for i in range(args.requests):
                    code += 1
                    uploads.append(upload(bases[i % len(bases)], SIDES[i % len(SIDES)], code))
                prep = preparer(mode, budget)
                t0 = time.process_time()
                images = [prep(u) for u in uploads]
                prep_ms = (time.process_time() - t0) / len(uploads) * 1000
                api, rest = engine_pids(server)
                api0, eng0 = cpu_s(api), sum(cpu_s(p) for p in rest)
                t0 = time.perf_counter()
                lat = asyncio.run(send(url, images, [categories[i % len(categories)] for i in range(len(images))]))
                wall = time.perf_counter() - t0
                api_ms = (cpu_s(api) - api0) / len(images) * 1000
                eng_ms = (sum(cpu_s(p) for p in rest) - eng0) / len(images) * 1000
                r = results[mode]
                r["api"].append(api_ms)
                r["engine"].append(eng_ms)
                r["prep"].append(prep_ms)
                r["lat"] += lat
                r["kb"].append(statistics.mean(len(im.data) for im in images) / 1024)
                r["px"].append(statistics.mean(im.width * im.height for im in images))
                print(
                    f"round {rnd} {mode:<22} API server {api_ms:6.1f} ms/req, engine {eng_ms:6.1f} ms/req, "
                    f"worker prep {prep_ms:5.1f} ms/photo, {len(images) / wall:5.1f} req/s",
                    flush=True,
                )
    finally:
        server.stop()
    print(
        f"\n{'photo sent':<24}{'px sent':>10}{'KB sent':>9}{'API CPU ms':>12}{'engine ms':>11}{'worker ms':>11}{'p50 ms':>8}{'p99 ms':>8}"
    )
    for mode in MODES:
        r = results[mode]
        lat = sorted(r["lat"])
        p50, p99 = statistics.median(lat) * 1000, lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        cpu = f"{statistics.median(r['api']):>12.1f}{statistics.median(r['engine']):>11.1f}{statistics.median(r['prep']):>11.1f}"
        print(f"{mode:<24}{statistics.mean(r['px']):>10,.0f}{statistics.mean(r['kb']):>9.0f}{cpu}{p50:>8.0f}{p99:>8.0f}")
    before, after = statistics.median(results[MODES[1]]["api"]), statistics.median(results[MODES[2]]["api"])
    uploaded = statistics.median(results[MODES[0]]["api"])
    print(f"\nAPI-server CPU per request, as uploaded / model budget: {uploaded / after:.1f}x")
    print(f"image budget: vLLM API-server CPU per request {before:.1f} ms -> {after:.1f} ms ({before / after:.1f}x)")


if __name__ == "__main__":
    main()
