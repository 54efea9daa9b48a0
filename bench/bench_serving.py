"""Client path vs. vLLM offline: throughput and latency on the same model, prompts and images.

Run in the model environment (it needs vllm for the offline side):

    .venv-model/bin/python bench/bench_serving.py [--requests 512] [--rounds 5] [--max-num-seqs 32]

1. builds (or reuses) the tiny model in .opal/models/,
2. starts a real vLLM OpenAI server (``opal serve``'s flags and CPU placement) and, in
   this process, an offline ``vllm.LLM`` with the same engine settings (vLLM's default
   CPU placement),
3. runs measured rounds alternately through each path (client first on even rounds,
   offline first on odd ones, a pause between), so drift in the machine's speed hits
   both paths alike: the client path is inference.client.ListingClient at saturation,
   ``--concurrency`` requests in flight (default twice the engine batch, so the server
   always has the next requests queued, as a worker's in-flight window does); the
   offline path is one ``LLM.chat`` call over all the requests of the round,
4. prints every round, req/s and p50/p99 latency per path and the throughput ratio
   client/offline (the median of the per-round ratios; target >= 0.90), and writes a
   latency histogram to docs/img/serving_latency.png.

Both paths use guidance-constrained JSON per category, temperature 0, at most
``--max-tokens`` tokens and the sampled token's log-probability (the client needs it for
per-aspect confidence; ``--no-logprobs`` turns it off on both sides). One warm-up batch
per path (grammar compilation) is not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from inference.client import ListingClient  # noqa: E402
from inference.prompt import serving_messages  # noqa: E402
from opal.cpu_affinity import colocate_engine_core  # noqa: E402
from opal.plots import histogram_png  # noqa: E402
from opal.samples import load_samples  # noqa: E402
from opal.vllm_server import OWNER_FILE, scratch_dir, start_vllm, vllm_env  # noqa: E402
from schemas.category import default_categories  # noqa: E402
from schemas.settings import VllmSettings  # noqa: E402

PAUSE_S = 2.0  # between rounds: lets the idle path's busy-polling processes go to sleep


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class OfflinePath:
    """vLLM's offline ``LLM`` in this process, with the server's engine settings."""

    def __init__(self, model_dir: Path, jobs: list[tuple[bytes, str]], settings: VllmSettings, max_tokens: int, logprobs: bool) -> None:
        run_dir = REPO / ".opal" / "run" / "bench"
        self.scratch = scratch_dir(run_dir)  # its IPC sockets: a short folder of its own, removed by close()
        (self.scratch / OWNER_FILE).write_text(str(os.getpid()))  # in use while this process runs
        os.environ.update(vllm_env(settings, run_dir, tmp=self.scratch))  # same KV-cache size and offline env as the server
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        self.llm = LLM(
            model=str(model_dir),
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=True,
            limit_mm_per_prompt={"image": 1, "video": 0},
            structured_outputs_config={"backend": "guidance", "disable_any_whitespace": True},
        )
        cats = default_categories()
        self.messages: list[Any] = []
        self.params: list[Any] = []
        for img, cat in jobs:
            url = "data:image/jpeg;base64," + base64.b64encode(img).decode()
            self.messages.append(serving_messages(cats.resolve(cat), [url]))
            self.params.append(
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=0.0,
                    logprobs=0 if logprobs else None,  # what the server does for `"logprobs": true` (top_logprobs 0)
                    structured_outputs=StructuredOutputsParams(json=cats.resolve(cat).json_schema()),
                )
            )
        warm = min(len(jobs), settings.max_num_seqs)
        self.llm.chat(self.messages[:warm], self.params[:warm], use_tqdm=False)

    def round(self) -> tuple[float, int]:
        """Seconds for all requests, completion tokens."""
        t0 = time.perf_counter()
        outs = self.llm.chat(self.messages, self.params, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()  # do not leave engine processes behind
        shutil.rmtree(self.scratch, ignore_errors=True)


async def client_round(c: ListingClient, jobs: list[tuple[bytes, str]], lat: list[float]) -> tuple[float, int]:
    """Seconds for all requests, completion tokens; appends each request's latency (ms) to ``lat``."""

    async def one(img: bytes, cat: str) -> int:
        r = await c.generate([img], cat)
        lat.append(r.inference_ms)  # request sent -> response parsed; the client's own queue (all jobs start at once) excluded
        return r.completion_tokens

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*[one(img, cat) for img, cat in jobs]))
    return time.perf_counter() - t0, tokens


async def interleaved(url: str, offline: OfflinePath, jobs: list[tuple[bytes, str]], args: argparse.Namespace) -> dict[str, Any]:
    lat: list[float] = []
    rows: list[tuple[float, float, int, int]] = []
    async with ListingClient(
        [url], max_concurrency=args.concurrency, timeout_s=300, max_tokens=args.max_tokens, logprobs=args.logprobs
    ) as c:
        await asyncio.gather(*[c.generate([img], cat) for img, cat in jobs[: args.concurrency]])  # warm-up (grammar compile)
        print(f"{'round':>5}{'order':>18}{'client req/s':>14}{'offline req/s':>15}{'ratio':>7}", flush=True)
        for r in range(args.rounds):
            await asyncio.sleep(PAUSE_S)
            if r % 2 == 0:
                c_s, c_tok = await client_round(c, jobs, lat)
                await asyncio.sleep(PAUSE_S)
                o_s, o_tok = offline.round()
            else:
                o_s, o_tok = offline.round()
                await asyncio.sleep(PAUSE_S)
                c_s, c_tok = await client_round(c, jobs, lat)
            rows.append((len(jobs) / c_s, len(jobs) / o_s, c_tok, o_tok))
            order = "client, offline" if r % 2 == 0 else "offline, client"
            print(f"{r:>5}{order:>18}{rows[-1][0]:>14.1f}{rows[-1][1]:>15.1f}{rows[-1][0] / rows[-1][1]:>7.2f}", flush=True)
    return {"rows": rows, "lat": lat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=512, help="Requests per round and path.")
    ap.add_argument("--rounds", type=int, default=5, help="Measured rounds per path, alternating; the median ratio is reported.")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="Engine batch size, the same for both paths.")
    ap.add_argument("--concurrency", type=int, default=None, help="Client requests in flight (default 2 x --max-num-seqs).")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--no-colocate", action="store_true", help="Leave the server's engine core unpinned (cpu_colocate_engine=False).")
    ap.add_argument(
        "--pin-offline",
        action="store_true",
        help="Also pin the offline engine core to its worker (slower there: by default offline runs as vLLM ships it).",
    )
    ap.add_argument("--no-logprobs", dest="logprobs", action="store_false", help="Neither path asks for token log-probabilities.")
    ap.add_argument("--model", type=Path, default=REPO / ".opal" / "models" / "tiny-seed0")
    args = ap.parse_args()
    args.concurrency = args.concurrency or 2 * args.max_num_seqs

    if not (args.model / "config.json").exists():
        from training.tiny_model import build_tiny_model

        build_tiny_model(args.model)
    samples = load_samples()
    jobs = [(samples[i % len(samples)].image.read_bytes(), samples[i % len(samples)].product_type) for i in range(args.requests)]
    settings = VllmSettings(max_num_seqs=args.max_num_seqs, cpu_colocate_engine=not args.no_colocate)

    proc, url = start_vllm(args.model, settings, REPO / ".opal" / "run" / "bench")
    try:
        print(f"server: {proc.log_tail(1)}", flush=True)
        offline = OfflinePath(args.model, jobs, settings, args.max_tokens, args.logprobs)
        try:
            if args.pin_offline:
                print(f"offline: {colocate_engine_core(os.getpid()).describe()}", flush=True)
            res = asyncio.run(interleaved(url, offline, jobs, args))
        finally:
            offline.close()
    finally:
        proc.stop()

    rows, lat = res["rows"], res["lat"]
    c_rps, o_rps = [r[0] for r in rows], [r[1] for r in rows]
    ratio = statistics.median(r[0] / r[1] for r in rows)
    cm, om = statistics.median(c_rps), statistics.median(o_rps)
    print(
        f"\n{args.requests} requests x {args.rounds} rounds per path, engine batch {args.max_num_seqs}, "
        f"client {args.concurrency} in flight, max {args.max_tokens} tokens, logprobs {'on' if args.logprobs else 'off'}, "
        f"server engine core {'colocated' if settings.cpu_colocate_engine else 'unpinned'}, "
        f"offline engine core {'colocated' if args.pin_offline else 'unpinned'}, model {args.model.name}, {os.cpu_count()} CPUs"
    )
    print(f"{'path':<24}{'req/s med':>10}{'min':>7}{'max':>7}{'tok/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    print(
        f"{'client -> vLLM server':<24}{cm:>10.1f}{min(c_rps):>7.1f}{max(c_rps):>7.1f}{rows[-1][2] * cm / args.requests:>8.0f}"
        f"{statistics.median(lat):>9.0f}{pct(lat, 0.99):>9.0f}"
    )
    print(
        f"{'offline LLM.chat':<24}{om:>10.1f}{min(o_rps):>7.1f}{max(o_rps):>7.1f}{rows[-1][3] * om / args.requests:>8.0f}{'-':>9}{'-':>9}"
    )
    print(f"ratio client/offline throughput (median of the per-round ratios): {ratio:.2f} (target >= 0.90)")
    png = histogram_png(
        {"client latency": lat},
        REPO / "docs" / "img" / "serving_latency.png",
        f"OPAL client -> vLLM (CPU), {args.requests} req @ {args.concurrency} in flight, batch {args.max_num_seqs}",
    )
    print(f"latency histogram: {png.relative_to(REPO)}")
    print(json.dumps({"client_rps": cm, "offline_rps": om, "ratio": ratio, "p50_ms": statistics.median(lat), "p99_ms": pct(lat, 0.99)}))


if __name__ == "__main__":
    main()
