"""`opal serve` flag rendering: the same settings give the CPU set here and the GPU set in production."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from opal.vllm_server import OWNER_FILE, link_inductor_temp, scratch_dir, served_name, vllm_argv, vllm_env
from schemas.settings import VllmSettings


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cpu_flags(tmp_path: Path) -> None:
    (tmp_path / "opal_model.json").write_text(json.dumps({"name": "opal", "version": "v9"}))
    argv = vllm_argv(VllmSettings(), tmp_path, 8000)
    assert "--enforce-eager" in argv and "--tensor-parallel-size" not in argv
    assert _flag(argv, "--served-model-name") == "opal@v9" == served_name(tmp_path)
    assert json.loads(_flag(argv, "--structured-outputs-config")) == {"backend": "guidance", "disable_any_whitespace": True}
    assert json.loads(_flag(argv, "--limit-mm-per-prompt")) == {"image": 1, "video": 0}
    env = vllm_env(VllmSettings(cpu_kv_cache_gib=2), tmp_path)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    assert not Path(env["TMPDIR"]).exists()  # rendering the environment creates nothing
    # compiled kernels: one folder per served model, the same whatever the run dir (a restart loads them)
    s = VllmSettings(compile_cache_dir=tmp_path / "cc")
    made = [scratch_dir(tmp_path / r) for r in ("run-1", "run-2")]
    try:
        first, again = (vllm_env(s, tmp_path / r, tmp_path, tmp=m) for r, m in zip(("run-1", "run-2"), made, strict=True))
        assert first["TORCHINDUCTOR_CACHE_DIR"] == again["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc" / "opal@v9" / "inductor")
        assert first["VLLM_CACHE_ROOT"] == str(tmp_path / "cc" / "opal@v9" / "vllm") and "TRITON_CACHE_DIR" in first
        # inductor's precompiled headers go to <TMPDIR>/torchinductor_<user> whatever its cache dir says: linked to the cache
        for each in (first, again, first):  # idempotent
            link = link_inductor_temp(each)
            assert link is not None and link.is_symlink() and link.resolve() == Path(first["TORCHINDUCTOR_CACHE_DIR"]).resolve()
        assert [p.name for p in Path(first["TMPDIR"]).iterdir()] == [link.name]  # no staged link left behind
    finally:
        for m in made:  # long run dirs get a temp folder under /tmp: leave none behind
            shutil.rmtree(m, ignore_errors=True)


def test_each_server_gets_a_short_temp_folder_of_its_own(tmp_path: Path) -> None:
    made: list[Path] = []
    short = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    try:
        for run_dir in (short, tmp_path / ("long-" * 20)):
            made += [scratch_dir(run_dir), scratch_dir(run_dir)]
            assert made[-1] != made[-2] and made[-1].is_dir() and not any(made[-1].iterdir())
            assert len(str(made[-1] / "0123456789abcdef0123456789abcdef0123")) < 107  # vLLM's IPC socket names
        assert made[0].parent == short and made[2].parent != tmp_path / ("long-" * 20)
        assert all(m.stat().st_mode & 0o777 == 0o700 for m in made)
    finally:
        for m in made:
            shutil.rmtree(m, ignore_errors=True)
        shutil.rmtree(short, ignore_errors=True)


def test_gpu_flags(tmp_path: Path) -> None:
    s = VllmSettings(device="cuda", tensor_parallel_size=4, gpu_memory_utilization=0.85, max_num_seqs=256, images_per_prompt=3)
    argv = vllm_argv(s, tmp_path, 8000, host="0.0.0.0")
    assert "--enforce-eager" not in argv
    assert _flag(argv, "--tensor-parallel-size") == "4"
    assert _flag(argv, "--gpu-memory-utilization") == "0.85"
    assert _flag(argv, "--max-num-seqs") == "256"
    assert _flag(argv, "--host") == "0.0.0.0"
    assert json.loads(_flag(argv, "--limit-mm-per-prompt"))["image"] == 3
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_env(s, tmp_path)
    assert _flag(argv, "--served-model-name") == tmp_path.name


def test_a_start_sweeps_the_temp_folders_of_servers_gone_without_a_stop() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: the folders are made inside it
    try:
        orphan, live, starting, stale = (scratch_dir(run_dir) for _ in range(4))
        assert orphan.parent == run_dir
        (orphan / OWNER_FILE).write_text(str(dead.pid))  # its server was SIGKILLed with its caller
        (live / OWNER_FILE).write_text(str(os.getpid()))
        (orphan / "sock").write_text("")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))  # its caller died before writing the owner file
        fresh = scratch_dir(run_dir)
        assert not orphan.exists() and not stale.exists() and live.exists() and starting.exists() and fresh.exists()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
