"""The embedded stack starts real services and leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from opal.embedded import EmbeddedStack, read_state
from schemas.settings import EmbeddedSettings, KafkaSettings, OpalSettings
from tests.conftest import REPO, opal_bin


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_dead(pids: list[int], timeout_s: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _settings(run_dir: Path, **embedded: object) -> OpalSettings:
    return OpalSettings().model_copy(update={"embedded": EmbeddedSettings(run_dir=run_dir, **embedded)})  # type: ignore[arg-type]


def test_stack_starts_real_services_and_stops_them(tmp_path: Path) -> None:
    with EmbeddedStack(_settings(tmp_path)) as stack:
        pids = [p.pid for p in stack.processes if p.pid]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        r = redis.Redis.from_url(stack.settings.redis.url_value())
        assert r.ping() and r.set("k", "v") and r.get("k") == b"v"
        md = AdminClient(stack.settings.kafka.librdkafka_config()).list_topics(timeout=5)
        assert md.brokers
    assert _wait_dead(pids) == []
    assert (tmp_path / "tansu.log").exists() and (tmp_path / "valkey.log").exists()


def test_configured_endpoints_start_nothing(tmp_path: Path) -> None:
    s = _settings(tmp_path).model_copy(update={"kafka": KafkaSettings(bootstrap="127.0.0.1:1")})
    with EmbeddedStack(s, services=["kafka"]) as stack:
        assert stack.processes == []
        assert stack.settings.kafka.bootstrap == "127.0.0.1:1"


_CHILD = """
import sys, time, json
from pathlib import Path
from opal.embedded import EmbeddedStack
from schemas.settings import OpalSettings, EmbeddedSettings
s = OpalSettings().model_copy(update={"embedded": EmbeddedSettings(run_dir=Path(sys.argv[1]))})
with EmbeddedStack(s) as st:
    print(json.dumps([p.pid for p in st.processes]), flush=True)
    time.sleep(120)
"""


def _spawn_child(tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout is not None
    pids = json.loads(child.stdout.readline())
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    return child, pids


def test_no_orphans_when_the_parent_is_killed(tmp_path: Path) -> None:
    child, pids = _spawn_child(tmp_path)
    child.kill()  # SIGKILL: no Python cleanup runs
    child.wait()
    assert _wait_dead(pids) == [], "services outlived a SIGKILLed parent"


def test_ctrl_c_stops_services(tmp_path: Path) -> None:
    child, pids = _spawn_child(tmp_path)
    child.send_signal(signal.SIGINT)
    child.wait(timeout=20)
    assert _wait_dead(pids, timeout_s=2) == []


def test_dev_up_status_down(cli_env: dict[str, str]) -> None:
    up = subprocess.run([opal_bin(), "dev", "up"], env=cli_env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert up.returncode == 0, up.stderr
    run_dir = Path(cli_env["OPAL_EMBEDDED_RUN_DIR"])
    state = read_state(run_dir)
    assert state is not None and all(state["alive"].values())
    pids = [p["pid"] for p in state["processes"]]
    try:
        assert "export OPAL_KAFKA_BOOTSTRAP=" in up.stdout
        again = subprocess.run([opal_bin(), "dev", "up"], env=cli_env, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert "already up" in again.stdout
        st = subprocess.run([opal_bin(), "dev", "status"], env=cli_env, capture_output=True, text=True, cwd=REPO, timeout=30)
        assert st.returncode == 0 and "tansu" in st.stdout and "valkey" in st.stdout
        # other commands find the detached stack without any OPAL_KAFKA_BOOTSTRAP
        ap = subprocess.run([opal_bin(), "topology", "apply"], env=cli_env, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert ap.returncode == 0, ap.stdout + ap.stderr
        assert "created" in ap.stdout
    finally:
        down = subprocess.run([opal_bin(), "dev", "down"], env=cli_env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert down.returncode == 0 and "tansu" in down.stdout
    assert _wait_dead(pids) == []
    assert read_state(run_dir) is None


def test_s3_storage_survives_a_broker_kill(tmp_path: Path) -> None:
    """Durable option: tansu on a local moto S3 keeps topics and records across kill -9."""
    from opal.embedded import start_moto, start_tansu

    moto, endpoint = start_moto(tmp_path, 30)
    try:
        broker, bootstrap = start_tansu(tmp_path, 30, s3_endpoint=endpoint)
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic("durable", 1, 1)])["durable"].result(timeout=10)
        p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        for i in range(5):
            p.produce("durable", key=str(i).encode(), value=f"v{i}".encode())
        assert p.flush(15) == 0
        assert broker.proc is not None
        os.kill(broker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        broker.proc.wait()
        broker2, bootstrap2 = start_tansu(tmp_path, 30, s3_endpoint=endpoint)
        try:
            c = Consumer({"bootstrap.servers": bootstrap2, "group.id": "g", "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
            c.subscribe(["durable"])
            got: list[bytes] = []
            deadline = time.monotonic() + 30
            while len(got) < 5 and time.monotonic() < deadline:
                m = c.poll(0.5)
                if m is not None and not m.error():
                    got.append(m.value())
            c.close()
            assert sorted(got) == [f"v{i}".encode() for i in range(5)]
        finally:
            broker2.stop()
    finally:
        moto.stop()
