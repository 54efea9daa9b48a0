"""The embedded single-machine stack: :class:`EmbeddedStack` starts the tansu broker and valkey-server (and, for
durable broker storage, a moto S3 server) that the settings leave unset; the detached stacks of ``opal dev``
(up / status / restart / down) live here too.

The parts, each with its own contract:
- :mod:`opal.process_tree` -- questions about the live process table (psutil): alive (zombies count as dead),
  tagged, process group, descendants, listening ports.
- :mod:`opal.lifeline` -- attached children die with their parent (PDEATHSIG from a long-lived thread, the reaper).
- :mod:`opal.processes` -- :class:`ManagedProcess`: one service and everything it starts; its idempotent ``stop``.
- :mod:`opal.services` -- starting one service and waiting until it answers.

Lifecycle contract
- :class:`EmbeddedStack` is a context manager. ``__enter__`` starts only what the settings leave unset
  (``kafka.bootstrap`` / ``redis.url`` set means "use that, start nothing") on free loopback ports and returns once
  each service answers; if one fails to start, those already started are stopped before the error propagates.
  ``__exit__`` stops them in reverse order, also on Ctrl-C or an exception. ``stop`` is idempotent.
- Attached stacks (the default) die with the owning Python process however it ends (SIGKILL included): see
  :mod:`opal.lifeline`. An ``atexit`` hook stops survivors of normal exits (gracefully) that skipped ``__exit__``.
- Detached stacks (``opal dev up``) outlive the CLI; their pids, commands, environment, ports and tags are written
  to ``<run_dir>/stack.json``. ``opal dev down`` (:func:`stop_detached`) stops them, :func:`restart_service`
  (``opal dev restart``) replaces one service in place on its recorded port and records the new pid,
  :func:`kill_service` kills one abruptly (for chaos tests), :func:`up_detached` (``opal dev up``) restarts only
  what is down. Operations that change a run dir's stack are serialized by ``<run_dir>/stack.lock``. Stopping is
  idempotent and checks a pid still runs the recorded command (and tag) before signalling it.
- Logs stay in ``<run_dir>/<service>.log`` after stop, for post-mortems.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from opal.process_tree import listening, signal_all
from opal.processes import KILL_WAIT_S, ManagedProcess, ServiceStartError, free_port
from opal.services import await_service, start_moto, start_tansu, start_valkey
from schemas.settings import OpalSettings

__all__ = [  # the names callers import from here (several live in the modules above)
    "KILL_WAIT_S",
    "LOCK_FILE",
    "SERVICE_PROCESS",
    "STATE_FILE",
    "EmbeddedStack",
    "ManagedProcess",
    "ServiceStartError",
    "UpResult",
    "free_port",
    "kill_service",
    "read_state",
    "resolve_settings",
    "restart_service",
    "settings_env",
    "stack_lock",
    "start_moto",
    "start_tansu",
    "start_valkey",
    "stop_detached",
    "up_detached",
]

STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"
# `opal dev restart` names -> process names in stack.json
SERVICE_PROCESS = {"kafka": "tansu", "redis": "valkey", "s3": "moto"}


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
        """Start the services the settings leave unset; returns once each answers, with ``self.settings`` resolved.

        Detached (``attached=False``): also records the stack in ``<run_dir>/stack.json`` (callers hold
        :func:`stack_lock`). On failure or interruption whatever was started is stopped before the error propagates,
        so a retry starts from nothing. Not idempotent: call it once per stack (or again after :meth:`stop`).
        """
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
        """Stop what this stack started, newest first (:meth:`ManagedProcess.stop`: SIGTERM, SIGKILL after the grace,
        port released). Idempotent; safe to call again after an interruption. A detached stack's ``stack.json`` is
        left as it is: :func:`stop_detached` stops a recorded stack and forgets it."""
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
    if old.port is not None and listening(old.port):
        raise ServiceStartError(f"{name}: port {old.port} is held by another process; cannot restart on the same address")
    new = ManagedProcess(old.name, old.argv, old.log_path, env=old.env, attached=False, port=old.port, scratch=scratch)
    new.start()
    rec = new.record() | {"restarts": int(state["processes"][i].get("restarts", 0)) + 1}
    state["processes"][i] = rec
    _write_state(run_dir, state)  # before the readiness wait: `down` must know the pid even if start-up fails
    if new.port is None:  # records written before ports were kept: nothing to wait on
        return new
    await_service(new, timeout_s)  # stops it again on failure; the record then names a dead pid
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
    signal_all(members, sig)
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
