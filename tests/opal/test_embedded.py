"""The embedded stack starts real services and leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from opal.embedded import KILL_WAIT_S, EmbeddedStack, ManagedProcess, read_state
from opal.lifeline import REAPER_LOG_ENV
from schemas.settings import EmbeddedSettings, KafkaSettings, OpalSettings
from tests.support import REPO, alive, children, listening, opal_bin, stubborn_service, wait_dead, wait_for
from workers.kafka_clients import librdkafka_logger, make_admin

pytestmark = pytest.mark.server  # every test here starts real services or process trees (left out by `make test-fast`)


def _settings(run_dir: Path, **embedded: object) -> OpalSettings:
    return OpalSettings().model_copy(update={"embedded": EmbeddedSettings(run_dir=run_dir, **embedded)})  # type: ignore[arg-type]


def test_stack_starts_real_services_and_stops_them(tmp_path: Path) -> None:
    with EmbeddedStack(_settings(tmp_path)) as stack:
        pids = [p.pid for p in stack.processes if p.pid]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        r = redis.Redis.from_url(stack.settings.redis.url_value())
        assert r.ping() and r.set("k", "v") and r.get("k") == b"v"
        md = make_admin(stack.settings.kafka).list_topics(timeout=5)
        assert md.brokers
    assert wait_dead(pids) == []
    assert (tmp_path / "tansu.log").exists() and (tmp_path / "valkey.log").exists()


def test_configured_endpoints_start_nothing(tmp_path: Path) -> None:
    s = _settings(tmp_path).model_copy(update={"kafka": KafkaSettings(bootstrap="127.0.0.1:1")})
    with EmbeddedStack(s, services=["kafka"]) as stack:
        assert stack.processes == []
        assert stack.settings.kafka.bootstrap == "127.0.0.1:1"


_CHILD = """
import signal, sys, time, json
# A child inherits an ignored SIGINT from a shell that runs the suite in the background (`make test &`), and Python
# then installs no KeyboardInterrupt handler: restore it, as a terminal's Ctrl-C finds it.
signal.signal(signal.SIGINT, signal.default_int_handler)
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
    assert len(pids) == 2 and all(alive(p) for p in pids)
    return child, pids


def test_no_orphans_when_the_parent_is_killed(tmp_path: Path) -> None:
    child, pids = _spawn_child(tmp_path)
    child.kill()  # SIGKILL: no Python cleanup runs
    child.wait()
    assert wait_dead(pids) == [], "services outlived a SIGKILLed parent"


def test_ctrl_c_stops_services(tmp_path: Path) -> None:
    child, pids = _spawn_child(tmp_path)
    child.send_signal(signal.SIGINT)
    # The stop contract allows each service 10 s after SIGTERM, then SIGKILL (ManagedProcess.stop): bound the wait
    # by that worst case, not by the usual ~1 s.
    child.wait(timeout=2 * (10 + KILL_WAIT_S) + 10)
    assert wait_dead(pids, timeout_s=2) == []


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
    assert wait_dead(pids) == []
    assert read_state(run_dir) is None


def _poll_until(c: Consumer, n: int, what: str, timeout_s: float = 30) -> list[bytes]:
    """Poll ``c`` until it delivered ``n`` values (returned in arrival order); AssertionError naming ``what`` after
    ``timeout_s``."""
    got: list[bytes] = []

    def more() -> bool:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got.append(m.value())
        return len(got) >= n

    wait_for(more, timeout_s, what, interval_s=0)  # poll() itself waits for records
    return got


def test_s3_storage_survives_a_broker_kill(tmp_path: Path) -> None:
    """Durable option: tansu on a local moto S3 keeps topics and records across kill -9."""
    from opal.embedded import start_moto, start_tansu

    moto, endpoint = start_moto(tmp_path, 30)
    try:
        broker, bootstrap = start_tansu(tmp_path, 30, s3_endpoint=endpoint)
        admin = AdminClient({"logger": librdkafka_logger(), "bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic("durable", 1, 1)])["durable"].result(timeout=10)
        p = Producer({"logger": librdkafka_logger(), "bootstrap.servers": bootstrap, "linger.ms": 20})
        for i in range(5):
            p.produce("durable", key=str(i).encode(), value=f"v{i}".encode())
        assert p.flush(15) == 0
        assert broker.proc is not None
        os.kill(broker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        broker.proc.wait()
        broker2, bootstrap2 = start_tansu(tmp_path, 30, s3_endpoint=endpoint)
        try:
            conf = {"bootstrap.servers": bootstrap2, "group.id": "g", "auto.offset.reset": "earliest", "session.timeout.ms": 6000}
            c = Consumer({"logger": librdkafka_logger(), **conf})
            c.subscribe(["durable"])
            try:
                got = _poll_until(c, 5, "the 5 records back from the restarted broker")
            finally:
                c.close()
            assert sorted(got) == [f"v{i}".encode() for i in range(5)]
        finally:
            broker2.stop()
    finally:
        moto.stop()


# -- process hygiene: stop() escalates, children die with a SIGKILLed parent ------------------
# (the stubborn server: tests/support.py STUBBORN)
def test_stop_escalates_to_sigkill_within_the_grace_period(tmp_path: Path) -> None:
    mp, helper, port = stubborn_service(tmp_path)
    assert mp.pid is not None
    t0 = time.monotonic()
    mp.stop(timeout_s=1.0)
    took = time.monotonic() - t0
    assert 1.0 <= took < 3.0, f"stop took {took:.2f} s"
    assert wait_dead([mp.pid, helper], timeout_s=0.1) == [], "a SIGTERM-ignoring process survived stop()"
    assert not listening(port)
    mp.stop()  # idempotent


def test_stop_removes_the_process_scratch_folder_once_it_is_gone(tmp_path: Path) -> None:
    """A server's own temp folder (vLLM's TMPDIR) is removed by stop, also through a detached record."""
    for detached in (False, True):
        scratch = tmp_path / f"scratch-{detached}"
        mp = ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "s.log", scratch=scratch).start()
        (scratch / "sock").write_text("x")  # made by start, written while it runs
        handle = ManagedProcess.from_record(json.loads(json.dumps(mp.record()))) if detached else mp
        assert handle.scratch == scratch
        handle.stop(timeout_s=2)
        assert not scratch.exists() and not alive(mp.pid or -1)
        mp.stop()


def test_an_interrupted_stop_still_sigkills(tmp_path: Path) -> None:
    """A second Ctrl-C / SIGTERM unwinding through stop() must not skip the escalation."""
    mp, helper, port = stubborn_service(tmp_path)
    assert mp.pid is not None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        mp.stop(timeout_s=30)
        raise AssertionError("stop() was not interrupted")
    except KeyboardInterrupt:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert wait_dead([mp.pid, helper], timeout_s=2) == []
    mp.stop()  # what the caller's cleanup (atexit) does next: returns at once
    assert not listening(port)


_OWNER = """
import sys, time
from pathlib import Path
from tests.support import stubborn_service
mp, helper, port = stubborn_service(Path(sys.argv[1]))
print(mp.pid, helper, port, flush=True)
time.sleep(600)
"""


def test_sigkilled_parent_takes_the_whole_tree_with_it(tmp_path: Path) -> None:
    """Parent SIGKILLed: the SIGTERM-ignoring server (PDEATHSIG SIGKILL) and its helper in
    another session, without our tag (reaper sweep) die within seconds; the port is freed."""
    reaper_log = tmp_path / "reaper.log"
    env = {**os.environ, REAPER_LOG_ENV: str(reaper_log)}
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    assert owner.stdout is not None
    server, helper, port = map(int, owner.stdout.readline().split())
    reapers = [p for p in children(owner.pid) if psutil.Process(p).name() == "opal-reaper"]
    assert len(reapers) == 1

    def recorded() -> bool:  # the reaper logs "recorded [pids]" each time it records new processes (twice a second)
        lines = reaper_log.read_text().splitlines() if reaper_log.exists() else []
        sets = [{int(p) for p in re.findall(r"\d+", line.split(": recorded ", 1)[1])} for line in lines if ": recorded " in line]
        return any({server, helper} <= pids for pids in sets)

    wait_for(recorded, 10, "the reaper to record the server and its helper")
    owner.kill()
    owner.wait()
    assert wait_dead([server, helper, *reapers], timeout_s=5) == [], "processes outlived a SIGKILLed parent"
    assert not listening(port)


# Answers SIGUSR1 with a line "pong" in its log: proof that it still runs its own code.
_PONG = """
import signal, time
signal.signal(signal.SIGUSR1, lambda *_: print("pong", flush=True))
print("ready", flush=True)
while True:
    time.sleep(600)
"""


def test_service_started_from_a_short_lived_thread_outlives_the_thread(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG fires when the forking THREAD exits; start() must not tie the child to it."""
    log = tmp_path / "pong.log"
    box: list[ManagedProcess] = []
    t = threading.Thread(target=lambda: box.append(ManagedProcess("pong", [sys.executable, "-c", _PONG], log).start()))
    t.start()
    t.join()
    mp = box[0]
    assert mp.pid is not None

    def said(word: str) -> bool:
        return word in log.read_text().splitlines()

    try:
        wait_for(lambda: said("ready"), 10, "the service to start")
        # The kernel sends PDEATHSIG while the thread exits, before the thread leaves the task list (which join()
        # does not wait for); and a process sent SIGKILL never runs its own code again. So a service that answers
        # a signal sent after the thread is gone was not tied to that thread.
        wait_for(lambda: t.native_id not in {th.id for th in psutil.Process().threads()}, 10, "the starting thread to exit")
        os.kill(mp.pid, signal.SIGUSR1)
        wait_for(lambda: said("pong"), 10, "the service to answer after the thread that started it exited")
        assert mp.alive()
    finally:
        mp.stop(timeout_s=0.5)


# -- restarting one service of a detached stack -------------------------------------------------
def _opal(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([opal_bin(), *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def _read_all(bootstrap: str, topic: str, n: int) -> list[bytes]:
    """``n`` values of partition 0 from the start, sorted (assigned, no group: no rebalance wait)."""
    c = Consumer({"logger": librdkafka_logger(), "bootstrap.servers": bootstrap, "group.id": "reader", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        return sorted(_poll_until(c, n, f"{n} records of {topic}"))
    finally:
        c.close()


def test_dev_restart_kafka_on_s3_keeps_address_and_records(cli_env: dict[str, str]) -> None:
    from opal.embedded import kill_service, restart_service

    run_dir = Path(cli_env["OPAL_EMBEDDED_RUN_DIR"])
    up = _opal(cli_env, "dev", "up", "--storage", "s3")
    assert up.returncode == 0, up.stdout + up.stderr
    state = read_state(run_dir)
    assert state is not None and state["storage"] == "s3" and all(state["alive"].values())
    every_pid = {p["pid"] for p in state["processes"]}
    ports = [p["port"] for p in state["processes"]]
    bootstrap = state["kafka_bootstrap"]
    try:
        # keep a reference: a collected client fails its futures
        admin = AdminClient({"logger": librdkafka_logger(), "bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic("durable", 1, 1)])["durable"].result(timeout=10)
        p = Producer({"logger": librdkafka_logger(), "bootstrap.servers": bootstrap, "linger.ms": 5})
        for i in range(5):
            p.produce("durable", key=str(i).encode(), value=f"v{i}".encode())
        assert p.flush(15) == 0
        expected = [f"v{i}".encode() for i in range(5)]
        old_broker = next(x["pid"] for x in state["processes"] if x["name"] == "tansu")

        # 1. the CLI restart: same bootstrap, new pid, records still there
        r = _opal(cli_env, "dev", "restart", "kafka")
        assert r.returncode == 0, r.stdout + r.stderr
        state = read_state(run_dir)
        assert state is not None and state["kafka_bootstrap"] == bootstrap and all(state["alive"].values())
        tansu = next(x for x in state["processes"] if x["name"] == "tansu")
        assert tansu["pid"] != old_broker and tansu["restarts"] == 1 and not alive(old_broker)
        every_pid.add(tansu["pid"])
        assert _read_all(bootstrap, "durable", 5) == expected
        st = _opal(cli_env, "dev", "status")
        assert st.returncode == 0 and str(tansu["pid"]) in st.stdout and "no" not in st.stdout.split()

        # 2. the chaos path, from Python: kill -9 the broker, status shows it down, restart it
        assert kill_service(run_dir, "kafka") == [tansu["pid"]]
        assert wait_dead([tansu["pid"]]) == []
        down = read_state(run_dir)
        assert down is not None and down["alive"]["tansu"] is False
        new = restart_service(run_dir, "kafka")
        assert new.pid is not None and new.pid != tansu["pid"] and f"127.0.0.1:{new.port}" == bootstrap
        every_pid.add(new.pid)
        assert _read_all(bootstrap, "durable", 5) == expected

        # 3. `dev up` on a half-dead stack restarts only what is down, in place
        kill_service(run_dir, "redis")
        healed = _opal(cli_env, "dev", "up")
        assert healed.returncode == 0 and "restarted on the recorded ports: valkey" in healed.stdout, healed.stdout
        state = read_state(run_dir)
        assert state is not None and all(state["alive"].values()) and state["kafka_bootstrap"] == bootstrap
        every_pid |= {x["pid"] for x in state["processes"]}
    finally:
        down_r = _opal(cli_env, "dev", "down")
    assert down_r.returncode == 0 and "tansu" in down_r.stdout and "valkey" in down_r.stdout and "moto" in down_r.stdout
    assert wait_dead(sorted(every_pid)) == [], "a process of the stack outlived `opal dev down`"
    assert read_state(run_dir) is None
    assert not any(listening(port) for port in ports)
