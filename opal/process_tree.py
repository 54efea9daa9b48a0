"""Questions about the live process table, answered through psutil: does a pid still run, which processes carry a
service's tag, form its process group or descend from it, what binary a pid runs, who listens on a port.

Contract for every function here
- A zombie (exited, not yet reaped by its parent) counts as dead: it runs nothing, holds no port and no signal can
  make it die any more. Only its pid stays taken until the parent reaps it.
- A process that exits, or cannot be read, while a question is being answered is left out of the answer; nothing
  here raises for it. Answers are snapshots: a caller that must see late children asks again (as
  :meth:`opal.processes.ManagedProcess.stop` does while it waits).
- Pure queries, except :func:`signal_all`, which only signals.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import psutil

SERVICE_TAG_ENV = "OPAL_SERVICE_TAG"
"""Environment variable carrying a service's tag (unique per start) into it and everything it starts."""

_DEAD = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


def _runs(p: psutil.Process) -> bool:
    try:
        return p.status() not in _DEAD
    except psutil.Error:
        return False


def pid_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return _runs(psutil.Process(pid))
    except (psutil.Error, ValueError):  # gone, or not a valid pid (0, negative)
        return False


def environ_value(pid: int, key: str) -> str | None:
    """The value of ``key`` in the environment ``pid`` was started with (None: unset, unreadable or gone).

    That is the environ block as the process left it: setproctitle (vLLM's engine core and workers) overwrites it.
    """
    try:
        return psutil.Process(pid).environ().get(key)
    except (psutil.Error, ValueError):
        return None


def tagged(tag: str) -> set[int]:
    """Live processes whose environment carries ``tag`` in :data:`SERVICE_TAG_ENV`, wherever they run."""
    out: set[int] = set()
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(SERVICE_TAG_ENV) == tag and _runs(p):
                out.add(p.pid)
    return out


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, in pid order."""
    out: list[int] = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pgid and pid_alive(pid):
                out.append(pid)
    return out


def with_descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` that are alive and all their live descendants (children, grandchildren, ...)."""
    out: set[int] = set()
    for pid in sorted(set(roots)):
        if pid in out:  # already found under an earlier root: its subtree too
            continue
        with contextlib.suppress(psutil.Error, ValueError):
            root = psutil.Process(pid)
            if _runs(root):
                out.add(pid)
                out.update(k.pid for k in root.children(recursive=True) if _runs(k))
    return out


def pid_runs(pid: int, exe: str, tag: str | None = None) -> bool:
    """True if ``pid`` is alive (not a zombie), runs the binary ``exe`` and, when ``tag`` is given, does not carry a
    tag other than ``tag`` (guards against pid reuse).

    Compares the executable rather than the command line, which servers such as valkey rewrite. A process whose
    environ block is unreadable or overwritten (setproctitle) passes the tag test: there is nothing to compare.
    """
    try:
        p = psutil.Process(pid)
        running = p.exe()
        if not _runs(p) or not running or os.path.realpath(running) != os.path.realpath(exe):
            return False
    except (psutil.Error, ValueError):
        return False
    if tag is None:
        return True
    try:
        found = p.environ().get(SERVICE_TAG_ENV)
    except psutil.AccessDenied:
        return True
    except psutil.Error:
        return False
    return found is None or found == tag


def listening(port: int) -> bool:
    """True while some socket listens on TCP ``port`` (any address, IPv4 or IPv6, any process).

    Reads the whole connection table (tens of milliseconds with a hundred processes): poll it at 0.1 s, not faster.
    """
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in psutil.net_connections("tcp"))


def signal_all(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each pid; a pid that is gone (or not ours to signal) is skipped."""
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
