"""The reaper: one small process per owning Python process (stdlib only, run with ``python -S -E``).

    python -S -E opal/reaper.py TOKEN OWNER_PID [LOG_FILE]

Contract (see :mod:`opal.embedded`)
- The owner writes the pid of every attached service it starts to the reaper's stdin and
  never closes it; EOF (or the owner's pid gone or reused) means the owner is gone,
  however it went, SIGKILL included.
- Until then the reaper records every process under those services (pid + start time)
  twice a second. vLLM's engine core and workers must be found that way: setproctitle
  overwrites their ``/proc/<pid>/environ``, and PDEATHSIG reaches only direct children.
- When the owner is gone it SIGKILLs, until none is left for three rounds (at most 60 s):
  recorded processes still running (same start time, so a reused pid is spared), their
  descendants, the services' process groups, and every process whose environment carries
  the owner's token in ``OPAL_OWNER_TOKENS``. SIGINT is ignored (a Ctrl-C aimed at the
  owner's group must not take the reaper first).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Iterable

Table = dict[int, tuple[int, int, int]]  # pid -> (ppid, process group, start time)


def table() -> Table:
    out: Table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] not in (b"Z", b"X"):
                out[int(name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return out


def closure(roots: Iterable[int], tab: Table) -> set[int]:
    """``roots`` (those alive) and all their descendants."""
    kids: dict[int, list[int]] = {}
    for pid, row in tab.items():
        kids.setdefault(row[0], []).append(pid)
    out: set[int] = set()
    todo = [r for r in roots if r in tab]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(kids.get(p, ()))
    return out


def tokened(tab: Table, token: bytes) -> set[int]:
    """Processes whose environment carries ``token`` in OPAL_OWNER_TOKENS."""
    out: set[int] = set()
    for pid in tab:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        for item in env.split(b"\0"):
            if item.startswith(b"OPAL_OWNER_TOKENS=") and token in item[18:].split(b":"):
                out.add(pid)
                break
    return out


def _kill(pids: Iterable[int]) -> None:
    for p in pids:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, b"opal-reaper", 0, 0, 0)  # PR_SET_NAME: easy to spot in ps
    except Exception:
        pass
    token, owner, me = argv[1].encode(), int(argv[2]), os.getpid()
    log_path = argv[3] if len(argv) > 3 else ""

    def note(msg: str) -> None:
        if log_path:
            try:
                with open(log_path, "a") as f:
                    f.write(f"{time.time():.3f} reaper {me} (owner {owner}): {msg}\n")
            except OSError:
                pass

    tab = table()
    owner_start = tab.get(owner, (0, 0, -1))[2]
    leaders: dict[int, int | None] = {}  # service pid -> start time (None until first seen)
    seen: dict[int, int] = {}
    buf = b""
    while True:
        if select.select([0], [], [], 0.5)[0]:
            chunk = os.read(0, 4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            new = [int(x) for x in lines if x.strip().isdigit() and int(x) not in leaders]
            leaders.update((x, None) for x in new)
            note(f"watching services {new}")
        tab = table()
        if tab.get(owner, (0, 0, -1))[2] != owner_start:
            break  # the owner is gone although the pipe is still open (an inherited copy)
        for g, start in list(leaders.items()):
            if start is None and g in tab:
                leaders[g] = tab[g][2]
        live = [g for g, start in leaders.items() if g in tab and tab[g][2] == start]  # a reused pid is not ours
        seen = {p: st for p, st in seen.items() if p in tab and tab[p][2] == st}
        for p in closure(live, tab):
            seen[p] = tab[p][2]

    note(f"owner gone; sweeping {len(seen)} recorded processes under {len(leaders)} services")
    quiet, deadline = 0, time.monotonic() + 60
    while quiet < 3 and time.monotonic() < deadline:
        tab = table()
        known = {p for p, start in seen.items() if p in tab and tab[p][2] == start}
        groups = {g for g in leaders if any(tab[p][1] == g for p in known)}
        victims = closure(known | {p for p, row in tab.items() if row[1] in groups}, tab) - {me, owner}
        _kill(victims)  # before any environ read: reading a busy process's environ can wait on its memory lock
        extra = closure(tokened(tab, token), tab) - victims - {me, owner}
        _kill(extra)
        if victims or extra:
            note(f"SIGKILLed {sorted(victims | extra)}")
        quiet = 0 if victims or extra else quiet + 1
        time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv)
