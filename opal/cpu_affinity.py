"""CPU placement of vLLM's processes on a CPU-only host.

vLLM's CPU backend binds the model worker's OpenMP threads to its cores
(``VLLM_CPU_OMP_THREADS_BIND=auto``) but leaves the ``EngineCore`` process free to run
anywhere. The engine core only alternates with the worker (schedule, wait for the
step, process its output), yet while it waits it busy-polls shared memory for up to a
second. On a small host that poll lands on the cores the API server needs to accept
and pre-process requests, the engine then sees requests arrive staggered and runs
small batches: on the 2-core development machine the client path ran at 8-45 req/s,
round to round, instead of a steady 36-45 (see docs/BENCHMARKS.md).

:func:`colocate_engine_core` pins every thread of the engine core onto the union of
the cores the worker's threads are bound to, leaving the rest to the frontend. Linux
only; a no-op (returning why) elsewhere, when the worker is not bound, or when the
kernel refuses (never raises). Idempotent; safe to call again after a restart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENGINE_PREFIX = "VLLM::EngineCor"  # /proc/<pid>/comm is cut at 15 characters
WORKER_PREFIX = "VLLM::Worker"


@dataclass(frozen=True)
class Placement:
    """What :func:`colocate_engine_core` did: ``pinned`` engine pids and their cores, or why not."""

    pinned: tuple[int, ...]
    cores: frozenset[int]
    skipped: str = ""

    def describe(self) -> str:
        if self.skipped:
            return f"engine core not pinned: {self.skipped}"
        return f"engine core {', '.join(map(str, self.pinned))} pinned to the worker's cores {sorted(self.cores)}"


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (depth first), from /proc; empty if it is gone."""
    out: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(c) for c in children.read_text().split()]
        except OSError:
            continue
        for k in kids:
            out.append(k)
            out.extend(descendants(k))
    return out


def process_name(pid: int) -> str:
    """The kernel name of ``pid`` (/proc/<pid>/comm, 15 characters at most); empty if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def colocate_engine_core(root_pid: int) -> Placement:
    """Pin every vLLM engine-core process under ``root_pid`` to the union of its workers' cores."""
    if not hasattr(os, "sched_setaffinity"):
        return Placement((), frozenset(), "no sched_setaffinity on this platform")
    procs = [(p, process_name(p)) for p in descendants(root_pid)]
    engines = [p for p, c in procs if c.startswith(ENGINE_PREFIX)]
    workers = [p for p, c in procs if c.startswith(WORKER_PREFIX)]
    if not engines or not workers:
        return Placement((), frozenset(), f"found {len(engines)} engine core(s) and {len(workers)} worker(s) under pid {root_pid}")
    try:
        # affinity is per thread: libgomp pins each OpenMP thread of a worker to one of its cores
        cores: set[int] = set()
        for w in workers:
            for tid in threads(w):
                cores |= os.sched_getaffinity(tid)
        allowed = os.sched_getaffinity(root_pid)
        if cores >= allowed:
            return Placement((), frozenset(cores), "the workers are not bound to a subset of the cores (VLLM_CPU_OMP_THREADS_BIND)")
        for e in engines:
            for tid in threads(e):  # the engine's socket threads too, not only its main thread
                os.sched_setaffinity(tid, cores)
    except OSError as e:  # a process exited meanwhile, or a cpuset forbids it: placement is an optimisation
        return Placement((), frozenset(), f"{type(e).__name__}: {e}")
    return Placement(tuple(engines), frozenset(cores))


def threads(pid: int) -> list[int]:
    """Thread ids of ``pid`` (just ``pid`` if /proc lists none)."""
    tids = [int(t.name) for t in Path(f"/proc/{pid}/task").glob("*") if t.name.isdigit()]
    return tids or [pid]
