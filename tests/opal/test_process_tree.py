"""The process-table questions (opal/process_tree.py) on real processes: zombies count as dead, tags and descendants
are found wherever they run, a listener is seen and its end too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil

from opal.process_tree import SERVICE_TAG_ENV, environ_value, group_members, listening, pid_alive, pid_runs, tagged, with_descendants
from tests.support import wait_for


def test_a_zombie_counts_as_dead() -> None:
    z = subprocess.Popen(["true"])  # exits at once; a zombie until wait() reaps it
    try:
        wait_for(lambda: psutil.Process(z.pid).status() == psutil.STATUS_ZOMBIE, 10, "the child to become a zombie")
        assert not pid_alive(z.pid) and not pid_runs(z.pid, "/bin/true")
        assert z.pid not in group_members(os.getpgrp()) and os.getpid() in group_members(os.getpgrp())
        assert with_descendants([z.pid]) == set() and z.pid not in with_descendants([os.getpid()])
    finally:
        z.wait()
    assert not pid_alive(z.pid) and not pid_alive(0) and not pid_alive(-1)


# A parent carrying the tag, and a grandchild in a session of its own with an empty environment (no tag: like vLLM's
# engine core after setproctitle), which prints its pid.
_TREE = """
import subprocess, sys, time
kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True, env={})
print(kid.pid, flush=True)
time.sleep(60)
"""


def test_tag_and_descendants_are_found_across_sessions(tmp_path: Path) -> None:
    tag = f"test.{uuid.uuid4().hex[:12]}"
    parent = subprocess.Popen([sys.executable, "-c", _TREE], stdout=subprocess.PIPE, text=True, env={**os.environ, SERVICE_TAG_ENV: tag})
    try:
        assert parent.stdout is not None
        kid = int(parent.stdout.readline())
        assert tagged(tag) == {parent.pid} and environ_value(parent.pid, SERVICE_TAG_ENV) == tag
        assert environ_value(kid, SERVICE_TAG_ENV) is None
        assert with_descendants([parent.pid]) == {parent.pid, kid}
        assert pid_runs(parent.pid, sys.executable, tag) and not pid_runs(parent.pid, sys.executable, "another.tag")
        assert group_members(kid) == [kid]  # it leads a group of its own
    finally:
        for p in with_descendants([parent.pid]):
            os.kill(p, signal.SIGKILL)
        parent.wait()
    assert wait_for(lambda: not tagged(tag) and not pid_alive(kid), 10, "the tree to be gone")


def test_a_listener_is_seen_until_it_closes() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    assert not listening(port)  # bound, not listening
    s.listen()
    assert listening(port)
    s.close()
    assert not listening(port)
