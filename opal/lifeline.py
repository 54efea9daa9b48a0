"""Attached services die with the Python process that started them, however it ends (SIGKILL included).

Two mechanisms, both used by :meth:`opal.processes.ManagedProcess.start` for attached processes:

- :func:`die_with_parent` (a ``preexec_fn``): the direct child gets ``PR_SET_PDEATHSIG`` = SIGKILL. The kernel fires
  it when the *thread* that forked the child exits, so :func:`on_long_lived_thread` forks from the main thread or
  from a daemon spawner thread that lives as long as the process.
- The reaper (``opal/reaper.py``, its contract in its docstring): one small ``opal-reaper`` process per owning
  Python process, started on first use by :func:`reaper_watch` (and again if it died). It SIGKILLs, once the owner
  is gone, every process it saw under the owner's services, their process groups and every process carrying the
  owner's token in :data:`OWNER_ENV`. That catches grandchildren, which do not inherit PDEATHSIG.

A forked child forgets its parent's reaper (it must not hold the reaper's pipe open) and gets a token of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from opal.process_tree import SERVICE_TAG_ENV

OWNER_ENV = "OPAL_OWNER_TOKENS"
"""Colon-separated tokens of every owning process above an attached child (inherited by all it starts)."""
REAPER_LOG_ENV = "OPAL_REAPER_LOG"
"""Optional file where reapers note what they record and kill (diagnostics; tests wait on it)."""
REAPER = Path(__file__).with_name("reaper.py")
"""The reaper program (run with ``python -E -s``: the interpreter's own site-packages, for psutil)."""

log = logging.getLogger(__name__)
T = TypeVar("T")

# -- PR_SET_PDEATHSIG -------------------------------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1
_PRCTL: Any = None
if sys.platform == "linux":
    with contextlib.suppress(OSError, AttributeError):
        _PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: no dlopen between fork and exec


def die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: SIGKILL this child when the thread that forked it exits.

    SIGKILL, not SIGTERM: a server that is busy, ignores SIGTERM or is already in a (possibly endless) graceful
    shutdown does not act on a second SIGTERM. Covers the race where the parent died between fork and prctl.
    """

    def preexec() -> None:
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


_SPAWN_LOCK = threading.Lock()
_SPAWN_QUEUE: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_SPAWNER: tuple[int, threading.Thread] | None = None


def _spawner_loop() -> None:
    while True:
        fn, fut = _SPAWN_QUEUE.get()
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to the caller's thread
            fut.set_exception(e)


def on_long_lived_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that lives as long as the process; returns its result (or raises its exception).

    ``PR_SET_PDEATHSIG`` fires when the thread that forked the child exits, not the process: a service started from
    a short-lived worker thread (``asyncio.to_thread``, a thread pool) would be killed when that thread ends. The
    main thread and a daemon spawner thread both end only with the process.
    """
    global _SPAWNER
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _SPAWN_LOCK:
        if _SPAWNER is None or _SPAWNER[0] != os.getpid() or not _SPAWNER[1].is_alive():
            t = threading.Thread(target=_spawner_loop, name="opal-spawner", daemon=True)
            t.start()
            _SPAWNER = (os.getpid(), t)
    fut: Future[T] = Future()
    _SPAWN_QUEUE.put((fn, fut))
    return fut.result()


# -- the reaper -------------------------------------------------------------------------------------------------------
@dataclass
class _Reaper:
    owner: int
    proc: subprocess.Popen[bytes]
    write_fd: int


_TOKEN: tuple[int, str] | None = None  # (owner pid, token)
_REAPER: _Reaper | None = None
_REAPER_LOCK = threading.Lock()


def owner_token() -> str:
    """This process's token, put in :data:`OWNER_ENV` of every attached child (a new one after a fork)."""
    global _TOKEN
    if _TOKEN is None or _TOKEN[0] != os.getpid():
        _TOKEN = (os.getpid(), f"{os.getpid()}.{uuid.uuid4().hex[:12]}")
    return _TOKEN[1]


def _start_reaper() -> _Reaper | None:
    read_fd, write_fd = os.pipe()  # both non-inheritable: only the reaper gets the read end, as its stdin
    env = {k: v for k, v in os.environ.items() if k != SERVICE_TAG_ENV}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-E", "-s", str(REAPER), owner_token(), str(os.getpid()), os.environ.get(REAPER_LOG_ENV, "")],
            stdin=read_fd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C or group kill aimed at the owner must not take it first
            env=env,
        )
    except OSError as e:
        log.warning("no reaper process (%s): grandchildren may outlive a killed parent", e)
        os.close(write_fd)
        return None
    finally:
        os.close(read_fd)
    return _Reaper(os.getpid(), proc, write_fd)


def reaper_watch(pid: int, live: Iterable[int] = ()) -> None:
    """Have this process's reaper watch service ``pid``; thread-safe, never raises.

    Starts the reaper on first use and again if it died; a fresh reaper is also told ``live``, the pids of the
    services already running. Without a reaper (it cannot start) a warning is logged and PDEATHSIG alone remains.
    """
    global _REAPER
    if sys.platform != "linux":
        return
    with _REAPER_LOCK:
        for _ in range(2):
            r = _REAPER
            fresh = r is None or r.owner != os.getpid() or r.proc.poll() is not None
            if fresh:
                if r is not None and r.owner == os.getpid():
                    with contextlib.suppress(OSError):
                        os.close(r.write_fd)
                r = _REAPER = _start_reaper()
                if r is None:
                    return
            pids = {pid} | (set(live) if fresh else set())
            try:
                os.write(r.write_fd, "".join(f"{p}\n" for p in pids).encode())
                return
            except OSError:  # the reaper died since the check: start another one once
                with contextlib.suppress(OSError):
                    os.close(r.write_fd)
                r.proc.poll()
                _REAPER = None


def _forget_reaper_in_child() -> None:
    """After fork: the child must not hold its parent's reaper pipe open (it would delay the sweep)."""
    global _REAPER
    r = _REAPER
    if r is not None and r.owner != os.getpid():
        with contextlib.suppress(OSError):
            os.close(r.write_fd)
        _REAPER = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_reaper_in_child)
