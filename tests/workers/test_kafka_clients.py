"""librdkafka's log lines go through Python logging (workers/kafka_clients.py), never straight to stderr."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support import REPO

# Clients against a port nothing listens on, polled for 2 s: librdkafka logs a FAIL line per connection attempt.
SCRIPT = """
import logging, socket, sys, time
from confluent_kafka import Producer
from schemas.settings import KafkaSettings
from workers.kafka_clients import make_admin, make_consumer, make_producer

mode = sys.argv[1]
if mode == "configured":
    logging.basicConfig(level=logging.WARNING, format="LOGGED %(levelname)s %(name)s: %(message)s")
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
k = KafkaSettings(bootstrap=f"127.0.0.1:{port}")
if mode == "raw":
    clients = [Producer({"bootstrap.servers": k.bootstrap})]
else:
    consumer = make_consumer(k, "g")
    consumer.subscribe(["t"])
    clients = [make_producer(k), consumer, make_admin(k)]
end = time.monotonic() + 2.0
while time.monotonic() < end:
    for c in clients:
        c.poll(0.05)
"""


def _stderr(mode: str) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_librdkafka_lines_reach_stderr_only_through_configured_logging() -> None:
    raw = _stderr("raw")  # the control: a client without the logger prints librdkafka's own lines
    assert "|FAIL|" in raw and "Connection refused" in raw
    assert _stderr("silent") == ""  # OPAL's clients, logging not configured: nothing
    lines = _stderr("configured").splitlines()
    assert lines and all(line.startswith("LOGGED WARNING opal.librdkafka: ") for line in lines), lines[:3]
    text = "\n".join(lines)
    handles = set(re.findall(r"\[(opal#\w+-\d+)\]", text))  # the admin client is a producer-type handle
    assert len(handles) == 3 and any("consumer" in h for h in handles), handles
    assert "Connection refused" in text and "|FAIL|" not in text
