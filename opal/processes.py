"""One managed child process and everything it starts: :class:`ManagedProcess`.

Contract
- Every child started by :meth:`ManagedProcess.start` carries :data:`~opal.process_tree.SERVICE_TAG_ENV` (unique per
  start) in its environment, and so does everything it starts in turn, whatever process group or session it ends up
  in (unless it rewrites its environ block, as setproctitle does for vLLM's engine core and workers; those stay in
  the leader's process group). :meth:`ManagedProcess.members` finds the whole set (tag, process group,
  descendants); :meth:`ManagedProcess.stop` sends it SIGTERM, waits a grace period, SIGKILLs every survivor and
  waits until the service's port is released. It never relies on a child honouring SIGTERM, and an interruption
  mid-stop still SIGKILLs.
- Attached processes (the default) die with their parent however it ends (:mod:`opal.lifeline`: PDEATHSIG and the
  reaper). An ``atexit`` hook stops survivors of normal exits (gracefully) that skipped their ``stop``.
- Detached processes outlive their parent; :meth:`ManagedProcess.record` / :meth:`ManagedProcess.from_record` turn
  one into JSON and back (``stack.json`` of ``opal dev up``), and a handle made from a record stops the same set,
  after checking the pid still runs the recorded binary (and tag): a reused pid is never signalled.
- Logs stay in ``log_path`` after stop, for post-mortems.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opal.lifeline import OWNER_ENV, die_with_parent, on_long_lived_thread, owner_token, reaper_watch
from opal.process_tree import SERVICE_TAG_ENV, group_members, listening, pid_alive, pid_runs, signal_all, tagged, with_descendants

KILL_WAIT_S = 5.0  # after SIGKILL: how long to wait for processes to vanish and the port to be released
_POLL_S = 0.05  # how often stop() looks at the pids it knows
_RESCAN_S = 0.5  # how often stop() rescans for members it did not know (late children)
_PORT_POLL_S = 0.1  # how often stop() looks at the port (a read of the whole connection table)

_LIVE: list[ManagedProcess] = []  # attached processes started here and not stopped yet
log = logging.getLogger(__name__)


class ServiceStartError(RuntimeError):
    """A service did not become ready in time; the message carries its log tail."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the usual bind-to-0 race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ManagedProcess:
    """One child process with a log file, and everything it starts.

    ``start`` may be called again after ``stop`` (a new pid and tag). ``stop`` is idempotent and safe to retry
    after an interruption. ``port``, when known, is the port the service listens on: ``stop`` returns only once it
    is released. ``scratch`` is a folder of the process's own (its TMPDIR), removed by ``stop`` once nothing of the
    service runs any more.
    """

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    attached: bool = True
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    port: int | None = None
    tag: str | None = None
    scratch: Path | None = None

    def start(self) -> ManagedProcess:
        """Start the command with its output appended to ``log_path``; returns at once (readiness is the caller's
        check). Raises ``OSError`` when the command cannot be started."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.scratch is not None:  # normally made by the caller (mkdtemp); kept across a restart
            self.scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tag = f"{self.name}.{uuid.uuid4().hex[:12]}"
        env = {**os.environ, **self.env, SERVICE_TAG_ENV: self.tag}
        env.pop(OWNER_ENV, None)
        if self.attached:
            inherited = [t for t in os.environ.get(OWNER_ENV, "").split(":") if t]
            env[OWNER_ENV] = ":".join([*inherited, owner_token()])
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
            log_file.flush()

            def popen() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    self.argv,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,  # own process group: Ctrl-C in a terminal reaches us, not it
                    preexec_fn=die_with_parent(os.getpid()) if self.attached and sys.platform == "linux" else None,
                )

            self.proc = on_long_lived_thread(popen) if self.attached else popen()
        self.pid = self.proc.pid
        if self.attached:
            reaper_watch(self.pid, [p.pid for p in _LIVE if p.pid is not None])
            _LIVE.append(self)
        return self

    def alive(self) -> bool:
        """The leader (the process started) runs; see :meth:`members` for the whole set.

        Never reaps the leader: until :meth:`stop` does, its pid -- and so its process group's id -- cannot be
        reused, which keeps the group test in :meth:`members` safe. A handle from a record checks the pid still runs
        the recorded binary and tag.
        """
        if self.proc is not None:
            if self.proc.returncode is not None:
                return False
            try:
                return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
            except ChildProcessError:  # reaped by someone else
                return self.proc.poll() is None
        return self.pid is not None and pid_runs(self.pid, self.argv[0], self.tag)

    def members(self) -> set[int]:
        """Every live process of this service: the leader, its process group, every process carrying its tag (in any
        group or session, reparented or not) and all their descendants. Never includes the calling process."""
        if self.pid is None:
            return set()
        leader = self.alive()
        roots: set[int] = {self.pid} if leader else set()
        if self.tag is not None:
            roots |= tagged(self.tag)
        group = set(group_members(self.pid))
        # The group is ours if its id cannot have been reused: our unreaped child leads it (alive or zombie), the
        # recorded leader runs, or a member carries our tag.
        unreaped = self.proc is not None and self.proc.returncode is None
        if unreaped or leader or self.tag is None or roots & group:
            roots |= group
        return with_descendants(roots) - {os.getpid()}

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log ("(no log)" when there is none)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0, kill_wait_s: float = KILL_WAIT_S) -> None:
        """Stop the service and everything it started, then wait for its port to be free.

        SIGTERM to every member (:meth:`members`), up to ``timeout_s`` for them to exit, then SIGKILL to every
        survivor (rescanned, so late children count too) and up to ``kill_wait_s`` for them to vanish and for
        ``port`` to stop listening. If the caller is interrupted while waiting (a second Ctrl-C, SIGTERM unwinding),
        the survivors are SIGKILLed before the exception propagates: escalation never gets skipped, and calling
        ``stop`` again finishes the job. Idempotent; a call on a stopped service returns at once (after removing
        ``scratch`` if that is still there). Logs a warning (does not raise) if something survives SIGKILL or
        another process holds the port.
        """
        if self.pid is None:
            return
        known = self.members()
        had_members = bool(known)
        try:
            if known:
                signal_all(known, signal.SIGTERM)
                known = self._wait_gone(known, time.monotonic() + timeout_s)
        except BaseException:
            signal_all(known, signal.SIGKILL)
            signal_all(self.members(), signal.SIGKILL)
            raise
        signal_all(known, signal.SIGKILL)  # the known survivors first, before rescanning
        known |= self.members()
        if known:
            signal_all(known, signal.SIGKILL)
            known = self._wait_gone(known, time.monotonic() + kill_wait_s)
            if known:
                log.warning("%s: processes %s survived SIGKILL (uninterruptible?)", self.name, sorted(known))
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1)
        if self.port is not None and had_members:  # with nothing of ours running, a listener there is not ours
            deadline = time.monotonic() + kill_wait_s
            held = listening(self.port)
            while held and time.monotonic() < deadline:
                time.sleep(_PORT_POLL_S)
                held = listening(self.port)
            if held:
                log.warning("%s stopped but port %d is still held by another process", self.name, self.port)
        if self.scratch is not None and not known:  # nothing of ours runs any more: nothing can be using it
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self in _LIVE:
            _LIVE.remove(self)

    def _wait_gone(self, known: set[int], deadline: float) -> set[int]:
        """Wait until ``known`` (plus members found by a rescan every 0.5 s) is empty or ``deadline``; returns the
        survivors."""
        next_scan = time.monotonic() + _RESCAN_S
        while True:
            known = {p for p in known if pid_alive(p)}  # a zombie leader does not count
            if time.monotonic() >= next_scan:
                known |= self.members()
                next_scan = time.monotonic() + _RESCAN_S
            if not known or time.monotonic() >= deadline:
                return known
            time.sleep(_POLL_S)

    # -- detached records (stack.json) ----------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """This process as JSON-able data (see :meth:`from_record`)."""
        return {
            "name": self.name,
            "pid": self.pid,
            "argv": self.argv,
            "env": self.env,
            "log": str(self.log_path),
            "port": self.port,
            "tag": self.tag,
            "scratch": str(self.scratch) if self.scratch else None,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> ManagedProcess:
        """A detached handle on a recorded process (records written before tags existed still work)."""
        return cls(
            rec["name"],
            list(rec["argv"]),
            Path(rec["log"]),
            env=dict(rec.get("env") or {}),
            attached=False,
            pid=rec.get("pid"),
            port=rec.get("port"),
            tag=rec.get("tag"),
            scratch=Path(rec["scratch"]) if rec.get("scratch") else None,
        )


@atexit.register
def _stop_all() -> None:
    for p in list(reversed(_LIVE)):
        p.stop(timeout_s=5)
