"""Launch a real vLLM OpenAI-compatible server for an OPAL model folder.

:func:`vllm_argv` renders the server flags from :class:`~schemas.settings.VllmSettings`
(the same settings render the GPU flag set for production manifests);
:func:`start_vllm` runs it as a :class:`~opal.processes.ManagedProcess` (log file,
no orphans, idempotent stop) and returns once ``/health`` answers.

The model is served as ``<name>@<version>`` from the folder's ``opal_model.json``, so
every response names the exact model version that wrote it.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from opal.cpu_affinity import colocate_engine_core
from opal.process_tree import pid_alive
from opal.processes import ManagedProcess, ServiceStartError, free_port
from schemas.settings import VllmSettings

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def model_python(explicit: Path | None = None) -> Path:
    """Interpreter of the model-side environment: explicit, this one if it has vLLM, else .venv-model."""
    if explicit is not None:
        return explicit
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    candidate = REPO / ".venv-model" / "bin" / "python"
    if candidate.exists():
        return candidate
    raise ServiceStartError("no model-side environment: run `make install-model` or set OPAL_VLLM_PYTHON")


def served_name(model_dir: Path) -> str:
    card = model_dir / "opal_model.json"
    if card.exists():
        c = json.loads(card.read_text())
        return f"{c['name']}@{c['version']}"
    return model_dir.name


def vllm_argv(settings: VllmSettings, model_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """Arguments after ``python -m vllm.entrypoints.openai.api_server``."""
    argv = [
        "--model", str(model_dir),
        "--served-model-name", served_name(model_dir),
        "--host", host,
        "--port", str(port),
        "--dtype", settings.dtype,
        "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs),
        "--limit-mm-per-prompt", json.dumps({"image": settings.images_per_prompt, "video": 0}),
        "--structured-outputs-config", json.dumps({"backend": "guidance", "disable_any_whitespace": True}),
        "--max-logprobs", "5",
        "--disable-log-stats",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if settings.device == "cpu":
        argv += ["--enforce-eager"]
    else:
        argv += [
            "--tensor-parallel-size", str(settings.tensor_parallel_size),
            "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
        ]  # fmt: skip
    return argv


def compile_cache(settings: VllmSettings, model_dir: Path) -> Path:
    """The served model's compile-cache folder: ``<vllm.compile_cache_dir>/<served name>``.

    It outlives the server and its run dir, so a restart (or another server of the same model) loads the kernels
    the first requests compiled instead of compiling them again. Inductor and Triton key their entries by graph,
    shapes and versions, so a stale entry is never used; one folder per model keeps them easy to prune."""
    return settings.compile_cache_dir.resolve() / served_name(model_dir)


def link_inductor_temp(env: dict[str, str]) -> Path | None:
    """Point ``<TMPDIR>/torchinductor_<user>`` at the compile cache's inductor folder; returns the link (None if left).

    TorchInductor keeps its precompiled C++ headers (~150 MB, most of a CPU compile: the first request with logprobs
    took 11.6 s without them, 1.4 s with them) under that temp folder whatever ``TORCHINDUCTOR_CACHE_DIR`` says, and
    OPAL gives every server a temp folder of its own (:func:`scratch_dir`). Idempotent; a real folder already there is left as it is."""
    cache, tmp = env.get("TORCHINDUCTOR_CACHE_DIR"), env.get("TMPDIR")
    if not cache or not tmp:
        return None
    try:
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
        link, target = Path(tmp) / f"torchinductor_{user}", Path(cache)
        target.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and link.resolve() == target.resolve():
            return link
        if link.exists() and not link.is_symlink():
            log.info("%s is a folder of its own: compiled headers there are not shared", link)
            return None
        # made under a name of its own, then renamed over: servers starting at once never see half a link
        staged = link.with_name(f"{link.name}.{os.getpid()}")
        staged.unlink(missing_ok=True)
        staged.symlink_to(target, target_is_directory=True)
        os.replace(staged, link)
        return link
    except (KeyError, OSError) as e:  # only a speed-up: the server starts all the same
        log.warning("could not link inductor's temp folder to the compile cache (%s); a restart will compile again", e)
        return None


SCRATCH_PARENT_MAX = 48  # parent + "/opal-vllm-XXXXXXXX/" + a 36-character socket name stays under 107 bytes
OWNER_FILE = ".opal-owner"  # in a scratch folder: the pid of the server using it
OWNERLESS_MAX_AGE_S = 3600.0  # a scratch folder with no owner file this old was left by a caller that died starting


def scratch_dir(run_dir: Path, temp_root: Path | None = None) -> Path:
    """A new, empty temp folder for one server (its ``TMPDIR``: vLLM's IPC sockets, inductor's header link).

    Under ``run_dir`` when that path is short enough, else under ``temp_root`` (the system temp folder; ``/tmp``
    when that too is long): vLLM binds zmq IPC sockets there, and unix socket paths must stay under 107 bytes.
    Each call makes a folder of its own (mode 0700), so two servers in one run dir never share sockets;
    :func:`start_vllm` hands it to the server's :class:`~opal.processes.ManagedProcess`, whose ``stop`` removes
    it. Folders beside it whose server is gone without a stop (SIGKILLed callers) are removed here."""
    import tempfile

    run_dir.mkdir(parents=True, exist_ok=True)
    candidates = [(run_dir.resolve(), "vllm-tmp-"), (Path(temp_root or tempfile.gettempdir()).resolve(), "opal-vllm-")]
    parent, prefix = next(((d, p) for d, p in candidates if len(str(d)) <= SCRATCH_PARENT_MAX), (Path("/tmp"), "opal-vllm-"))
    _sweep_orphans(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def _sweep_orphans(parent: Path, prefix: str) -> None:
    """Remove ``prefix*`` scratch folders in ``parent`` whose recorded server pid no longer runs. Best effort; a
    folder without an owner file is a server still starting (the file is written right after its process starts)
    unless it is older than :data:`OWNERLESS_MAX_AGE_S` (its caller died in between)."""
    for d in parent.glob(f"{prefix}*"):
        try:
            pid = int((d / OWNER_FILE).read_text())
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                if time.time() - d.stat().st_mtime > OWNERLESS_MAX_AGE_S:
                    shutil.rmtree(d, ignore_errors=True)
            continue
        except (OSError, ValueError):  # not one of ours, or unreadable
            continue
        if not pid_alive(pid):  # gone, or a zombie nobody reaped yet (its parent was SIGKILLed)
            shutil.rmtree(d, ignore_errors=True)


def vllm_env(settings: VllmSettings, run_dir: Path, model_dir: Path | None = None, tmp: Path | None = None) -> dict[str, str]:
    """The server's environment; pure (creates nothing). ``tmp`` is its temp folder (see :func:`scratch_dir`;
    callers that only want the flags' environment may leave it out). With ``model_dir``, compiled kernels go to
    the model's :func:`compile_cache`; without it they stay under ``run_dir``."""
    tmp = tmp or run_dir / "vllm-tmp"
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TMPDIR": str(tmp),
        "VLLM_CACHE_ROOT": str(run_dir / "vllm-cache"),
        "VLLM_RPC_BASE_PATH": str(tmp),
    }
    if model_dir is not None:
        cache = compile_cache(settings, model_dir)
        env |= {
            "VLLM_CACHE_ROOT": str(cache / "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),  # else under TMPDIR: per run dir, or /tmp
            "TRITON_CACHE_DIR": str(cache / "triton"),  # else under HOME
        }
    if settings.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kv_cache_gib)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    return env


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _warm_up(url: str, settings: VllmSettings, timeout_s: float, proc: ManagedProcess) -> None:
    """One listing request through the real client (a photo made here, the generic schema, logprobs, the
    configured penalties). Raises :class:`ServiceStartError` when the server cannot answer it (refused,
    unreachable, timed out); an answer that is not a valid listing (a random-weight model) only logs a warning:
    the kernels were compiled all the same."""
    import asyncio
    import io

    from PIL import Image

    from inference.client import InferenceRejectedError, InferenceUnavailableError, ListingClient

    buf = io.BytesIO()
    Image.new("RGB", (224, 224), (200, 40, 40)).save(buf, format="JPEG")

    async def once() -> float:
        async with ListingClient(
            [url],
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
            max_concurrency=1,
            timeout_s=timeout_s,
            max_retries=0,
            repetition_penalty=settings.repetition_penalty,
            frequency_penalty=settings.frequency_penalty,
        ) as client:
            t0 = time.perf_counter()
            try:
                await client.generate([buf.getvalue()], "opal-warm-up")  # no schema of its own: the generic one
            except (InferenceUnavailableError, InferenceRejectedError):
                raise
            except Exception as e:  # answered, but not a usable listing: the server itself works
                log.warning("vLLM warm-up answer unusable (%s: %s); the server is up", type(e).__name__, e)
            return time.perf_counter() - t0

    try:
        took = asyncio.run(once())
    except Exception as e:
        raise ServiceStartError(f"vLLM's warm-up request failed: {type(e).__name__}: {e}. Log tail:\n{proc.log_tail(40)}") from None
    with proc.log_path.open("a") as f:
        f.write(f"[opal] warm-up request answered in {took:.1f} s\n")
    log.info("vLLM warm-up request answered in %.1f s", took)


def start_vllm(
    model_dir: Path,
    settings: VllmSettings,
    run_dir: Path,
    port: int | None = None,
    python: Path | None = None,
    timeout_s: float = 300.0,
    attached: bool = True,
    stop_grace_s: float = 5.0,
    warm_up: bool = True,
) -> tuple[ManagedProcess, str]:
    """Start the server; returns (process, base URL ending in /v1) once /health is 200 and, with ``warm_up``, once
    it answered one listing request with the options the client always uses (an image, structured output,
    logprobs): the first such request compiles kernels (it made the first 40 requests 17x slower than the
    next 40 on 2 CPU cores; it adds ~12 s to the start), and it should not be a user's.

    The returned process's ``stop()`` ends the API server and every process it started
    (engine core, workers, resource tracker), SIGKILLing what ignores SIGTERM, and
    waits for the port. With ``attached`` (the default) they all die with the calling
    process even when it is SIGKILLed (see :mod:`opal.lifeline`). If start-up fails or
    is interrupted the server is stopped (grace ``stop_grace_s``) before the error
    propagates. Not idempotent: each call starts a new server. The server's temp folder (:func:`scratch_dir`) is
    removed by ``stop()``; one left by a SIGKILLed caller is removed by the next start that uses the same parent.
    """
    model_dir = model_dir.resolve()
    if not (model_dir / "config.json").exists():
        raise ServiceStartError(f"{model_dir} is not a model folder (no config.json); build one with `opal model init-tiny`")
    port = port or free_port()
    py = model_python(python or settings.python)
    argv = [str(py), "-m", "vllm.entrypoints.openai.api_server", *vllm_argv(settings, model_dir, port)]
    scratch = scratch_dir(run_dir)
    env = vllm_env(settings, run_dir, model_dir, tmp=scratch)
    link_inductor_temp(env)
    proc = ManagedProcess(f"vllm-{port}", argv, run_dir / f"vllm-{port}.log", env=env, attached=attached, port=port, scratch=scratch)
    try:
        proc.start()
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    (scratch / OWNER_FILE).write_text(str(proc.pid))  # lets a later start sweep it if this caller is SIGKILLed
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ServiceStartError(f"vLLM exited during start-up. Log tail:\n{proc.log_tail(40)}")
            if _health(base + "/health"):
                if settings.device == "cpu" and settings.cpu_colocate_engine and proc.pid is not None:
                    placement = colocate_engine_core(proc.pid)
                    log.info("%s", placement.describe())
                    with proc.log_path.open("a") as f:  # O_APPEND: interleaves safely with the server's own lines
                        f.write(f"[opal] {placement.describe()}\n")
                if warm_up:
                    _warm_up(base + "/v1", settings, max(1.0, deadline - time.monotonic()), proc)
                return proc, base + "/v1"
            time.sleep(0.5)
        raise ServiceStartError(f"vLLM not healthy after {timeout_s:.0f} s. Log tail:\n{proc.log_tail(40)}")
    except BaseException:  # also Ctrl-C / SIGTERM during start-up: never leave a half-started server behind
        proc.stop(timeout_s=stop_grace_s)
        raise


if __name__ == "__main__":  # pragma: no cover - manual use: python -m opal.vllm_server MODEL_DIR
    p, url = start_vllm(Path(sys.argv[1]), VllmSettings(), Path(os.environ.get("TMPDIR", "/tmp")) / "opal-vllm")
    print(url, flush=True)
    try:
        p.proc.wait() if p.proc else None
    finally:
        p.stop()
