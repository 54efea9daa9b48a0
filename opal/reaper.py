"""The reaper: one small process per owning Python process (stdlib and psutil only; started by
:mod:`opal.lifeline` with ``python -E -s``).

    python -E -s opal/reaper.py TOKEN OWNER_PID [LOG_FILE]

Contract
- The owner writes the pid of every attached service it starts to the reaper's stdin and never closes it; EOF (or
  the owner gone: exited, a zombie, or its pid reused) means the owner is gone, however it went, SIGKILL included.
- Until then the reaper records every process under those services twice a second, as psutil handles (pid and
  creation time). vLLM's engine core and workers must be found that way: setproctitle overwrites their environ
  block, and PDEATHSIG reaches only direct children.
- When the owner is gone it SIGKILLs, until none is left for three rounds (at most 60 s): recorded processes still
  running (a reused pid is spared: psutil checks the creation time before signalling), their descendants, the
  services' process groups, and every process whose environment carries the owner's token in
  ``OPAL_OWNER_TOKENS``. Zombies count as gone. Never itself or the owner's pid. SIGINT is ignored (a Ctrl-C aimed
  at the owner's group must not take the reaper first).
- With LOG_FILE it appends a line there for each change: services watched, processes recorded, processes killed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Iterable

try:
    import psutil
except ImportError:  # run with -S (by an owner that loaded an older opal/lifeline.py): load the interpreter's site
    import site

    site.main()
    import psutil

Procs = dict[int, psutil.Process]
_DEAD = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


def alive(p: psutil.Process) -> bool:
    """``p`` still runs: not a zombie, and its pid not reused by another process."""
    try:
        return p.is_running() and p.status() not in _DEAD
    except psutil.Error:
        return False


def closure(roots: Iterable[psutil.Process]) -> Procs:
    """``roots`` that are alive and all their live descendants, by pid."""
    out: Procs = {}
    for root in roots:
        if root.pid in out or not alive(root):
            continue
        out[root.pid] = root
        with contextlib.suppress(psutil.Error):
            out.update((k.pid, k) for k in root.children(recursive=True) if alive(k))
    return out


def group_members(groups: set[int]) -> list[psutil.Process]:
    """Live processes whose process group is one of ``groups``."""
    out: list[psutil.Process] = []
    for pid in psutil.pids():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(pid) in groups:
                out.append(psutil.Process(pid))
    return out


def tokened(token: str) -> list[psutil.Process]:
    """Processes whose environment carries ``token`` in OPAL_OWNER_TOKENS."""
    out: list[psutil.Process] = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if token in p.environ().get("OPAL_OWNER_TOKENS", "").split(":"):
                out.append(p)
    return out


def _kill(procs: Iterable[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()  # psutil refuses (NoSuchProcess) when the pid now belongs to another process


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, b"opal-reaper", 0, 0, 0)  # PR_SET_NAME: easy to spot in ps
    except Exception:
        pass
    token, me = argv[1], os.getpid()
    owner_pid = int(argv[2])
    log_path = argv[3] if len(argv) > 3 else ""

    def note(msg: str) -> None:
        if log_path:
            try:
                with open(log_path, "a") as f:
                    f.write(f"{time.time():.3f} reaper {me} (owner {owner_pid}): {msg}\n")
            except OSError:
                pass

    try:
        owner: psutil.Process | None = psutil.Process(owner_pid)
    except psutil.Error:
        owner = None  # already gone: sweep at once
    leaders: Procs = {}  # the services, as first seen
    seen: Procs = {}
    buf = b""
    while owner is not None and alive(owner):
        if select.select([0], [], [], 0.5)[0]:
            chunk = os.read(0, 4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            new = [int(x) for x in lines if x.strip().isdigit() and int(x) not in leaders]
            for pid in new:
                with contextlib.suppress(psutil.Error):  # gone already: nothing to watch (and a reuse is not ours)
                    leaders[pid] = psutil.Process(pid)
            note(f"watching services {new}")
        before = set(seen)
        seen = {pid: p for pid, p in seen.items() if alive(p)}
        seen.update(closure(leaders.values()))
        if set(seen) - before:
            note(f"recorded {sorted(seen)}")

    note(f"owner gone; sweeping {len(seen)} recorded processes under {len(leaders)} services")
    spare = {me, owner_pid}
    quiet, deadline = 0, time.monotonic() + 60
    while quiet < 3 and time.monotonic() < deadline:
        known = [p for p in seen.values() if alive(p)]
        groups: set[int] = set()
        for p in known:
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(p.pid))
        groups &= set(leaders)  # a service leads its own process group (start_new_session)
        victims = {pid: p for pid, p in closure([*known, *group_members(groups)]).items() if pid not in spare}
        _kill(victims.values())  # before any environ read: reading a busy process's environ can wait on its memory lock
        extra = {pid: p for pid, p in closure(tokened(token)).items() if pid not in spare and pid not in victims}
        _kill(extra.values())
        if victims or extra:
            note(f"SIGKILLed {sorted(victims.keys() | extra.keys())}")
        quiet = 0 if victims or extra else quiet + 1
        time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv)
