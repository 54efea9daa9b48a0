"""opal.cpu_affinity on real processes named like vLLM's (Linux /proc, no vLLM needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from opal.cpu_affinity import colocate_engine_core, descendants, process_name

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and at least 2 usable cores"
)

CHILD = "import os, sys, time; open('/proc/self/comm', 'w').write(sys.argv[1]); {bind}; time.sleep(120)"
ROOT = """
import subprocess, sys, time
kids = [
    subprocess.Popen([sys.executable, '-c', {worker!r}, 'VLLM::Worker']),
    subprocess.Popen([sys.executable, '-c', {engine!r}, 'VLLM::EngineCore']),
]
time.sleep(120)
"""


def _tree(bind_worker: bool) -> subprocess.Popen[bytes]:
    worker = CHILD.format(bind="os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})" if bind_worker else "pass")
    engine = CHILD.format(bind="pass")
    return subprocess.Popen([sys.executable, "-c", ROOT.format(worker=worker, engine=engine)], start_new_session=True)


def _named(root: int) -> dict[str, int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        names = {process_name(p): p for p in descendants(root)}
        if {"VLLM::Worker", "VLLM::EngineCor"} <= names.keys():
            return names
        time.sleep(0.05)
    raise AssertionError(f"children never renamed themselves: {names}")


@pytest.fixture
def trees() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_engine_core_is_pinned_to_the_bound_worker_cores(trees: list[subprocess.Popen[bytes]]) -> None:
    trees.append(root := _tree(bind_worker=True))
    names = _named(root.pid)
    worker_cores = os.sched_getaffinity(names["VLLM::Worker"])
    assert os.sched_getaffinity(names["VLLM::EngineCor"]) != worker_cores

    placement = colocate_engine_core(root.pid)

    assert placement.pinned == (names["VLLM::EngineCor"],) and placement.cores == worker_cores
    assert os.sched_getaffinity(names["VLLM::EngineCor"]) == worker_cores
    assert "pinned to the worker's cores" in placement.describe()
    assert colocate_engine_core(root.pid).pinned == placement.pinned  # idempotent


def test_unbound_worker_leaves_the_engine_alone(trees: list[subprocess.Popen[bytes]]) -> None:
    trees.append(root := _tree(bind_worker=False))
    names = _named(root.pid)
    before = os.sched_getaffinity(names["VLLM::EngineCor"])

    placement = colocate_engine_core(root.pid)

    assert placement.pinned == () and "not bound" in placement.skipped
    assert os.sched_getaffinity(names["VLLM::EngineCor"]) == before


def test_no_vllm_processes_is_reported_not_raised(trees: list[subprocess.Popen[bytes]]) -> None:
    trees.append(root := subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True))
    placement = colocate_engine_core(root.pid)
    assert placement.pinned == () and "found 0 engine core(s) and 0 worker(s)" in placement.describe()
