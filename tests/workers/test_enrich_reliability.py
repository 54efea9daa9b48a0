"""Reliability on the real broker, valkey and vLLM: oversize records, model outages, single flight.

Each test proves one guarantee of workers/enrich.py: every record gets exactly one output and
its offset is committed (nothing wedges a partition); an outage of the model pauses the worker
instead of dead-lettering; concurrent misses on one image share one model request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from schemas.events import AspectEvent, DeadLetter, ImageRef, ListingImageEvent
from schemas.serde import EventCodec
from schemas.settings import OpalSettings, TopicSettings
from tests.support import REPO, opal_bin, read_to_end, read_topic, settings_env
from tests.support import worker_events as _events
from topology.admin import apply_topology
from topology.declared import build_topology
from workers.enrich import run_worker
from workers.kafka_clients import librdkafka_logger, make_admin, make_producer
from workers.metrics import WorkerMetrics

pytestmark = pytest.mark.vllm
CODEC = EventCodec(ListingImageEvent)


def _one_partition(s: OpalSettings, **worker: object) -> OpalSettings:
    """Fresh single-partition topics (produce order = output order) and a fresh group."""

    tag = uuid.uuid4().hex[:6]
    topics = TopicSettings.suffixed(tag, 1)
    s = s.model_copy(update={"topics": topics, "worker": s.worker.model_copy(update={"group_id": f"rel-{tag}", **worker})})
    apply_topology(make_admin(s.kafka), build_topology(s))
    return s


def _publish_big(s: OpalSettings, records: list[tuple[bytes, bytes]]) -> None:
    p = make_producer(s.kafka, **{"message.max.bytes": 4_000_000})
    for k, v in records:
        p.produce(s.topics.images_realtime, key=k, value=v)
    assert p.flush(60) == 0


def _committed(s: OpalSettings) -> int:
    c = Consumer(s.kafka.librdkafka_config(**{"group.id": f"{s.worker.group_id}.realtime", "logger": librdkafka_logger()}))
    try:
        return c.committed([TopicPartition(s.topics.images_realtime, 0)], timeout=10)[0].offset
    finally:
        c.close()


def _run(s: OpalSettings, idle: float = 2.0, timeout_s: float = 300) -> WorkerMetrics:
    metrics = WorkerMetrics()

    async def go() -> None:
        await asyncio.wait_for(run_worker(s, asyncio.Event(), idle_exit_s=idle, metrics=metrics), timeout_s)

    asyncio.run(go())
    return metrics


def test_near_1mb_records_get_a_bounded_dead_letter_and_never_wedge_the_partition(wsettings: OpalSettings, images: Path) -> None:
    s = _one_partition(wsettings, dead_letter_max_value_bytes=4096)
    good = _events(images, 6)
    base = good[0]
    huge_uri = base.model_copy(update={"listing_id": "huge-uri", "images": [ImageRef.model_construct(uri="file:///" + "x" * 999_900)]})
    # a valid event whose AspectEvent (which carries the seller listing for the judge) is over 1 MB
    huge_seller = base.model_copy(update={"listing_id": "huge-seller", "seller_aspects": {f"k{i}": "v" * 1000 for i in range(1050)}})
    ordered = [good[0], huge_uri, good[1], huge_seller, *good[2:]]
    values = {e.listing_id: CODEC.encode(e) for e in ordered}
    assert len(values["huge-uri"]) > 1_000_000 and len(values["huge-seller"]) > 1_000_000
    _publish_big(s, [(e.listing_id.encode(), values[e.listing_id]) for e in ordered])

    m = _run(s)  # returns: --idle-exit works, nothing stays in flight

    out = read_topic(s, s.topics.aspects, EventCodec(AspectEvent), len(good))
    assert sorted(k.decode() for k, _ in out) == sorted(e.listing_id for e in good)
    dead = {k.decode(): dl for k, dl in read_topic(s, s.topics.dead_letters, EventCodec(DeadLetter), 2)}
    assert set(dead) == {"huge-uri", "huge-seller"}
    assert dead["huge-uri"].error_kind == "invalid_event"  # a 999,900-character URI breaks the event contract
    assert dead["huge-seller"].error_kind == "output_too_large"
    for lid, dl in dead.items():
        assert dl.truncated and dl.value == values[lid][:4096] and dl.value_size == len(values[lid])
        assert "object at 0x" not in dl.error_message and len(dl.error_message) <= 4000
    assert _committed(s) == len(ordered)  # every offset committed: nothing replays, nothing is stuck
    assert m.value("opal_enrich_in_flight", lane="REALTIME") == 0


class _TcpProxy:
    """A port that refuses connections until :meth:`start`, then forwards to ``target`` (the real vLLM)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: socket.socket | None = None
        self.started = threading.Event()

    def start(self) -> None:
        srv = socket.create_server(("127.0.0.1", self.port))
        self._server = srv
        self.started.set()
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def test_model_outage_pauses_and_resumes_without_a_single_dead_letter(wsettings: OpalSettings, images: Path) -> None:
    real = wsettings.vllm.endpoints[0]
    host_port = real.split("//")[1].split("/")[0]
    proxy = _TcpProxy((host_port.split(":")[0], int(host_port.split(":")[1])))
    s = _one_partition(wsettings, breaker_failures=3, breaker_probe_s=0.5, breaker_probe_max_s=2.0, max_attempts=2)
    import httpx

    model = httpx.get(f"{real}/models", timeout=10).json()["data"][0]["id"]
    s = s.model_copy(update={"vllm": s.vllm.model_copy(update={"endpoints": [f"http://127.0.0.1:{proxy.port}/v1"], "model": model})})
    evs = _events(images, 10, prefix="outage")
    _publish_big(s, [(e.listing_id.encode(), CODEC.encode(e)) for e in evs])
    down_s = 8.0
    timer = threading.Timer(down_s, proxy.start)  # the model is down for 8 s, then answers again
    timer.start()
    try:
        m = _run(s)
        assert proxy.started.is_set()  # the worker was still there when the model came back: it waited instead of giving up
    finally:
        timer.cancel()
        proxy.close()
    dead = read_to_end(s, s.topics.dead_letters, EventCodec(DeadLetter))  # the worker has exited: all it wrote
    assert dead == [], [dl.error_kind for _, dl in dead]
    out = read_topic(s, s.topics.aspects, EventCodec(AspectEvent), len(evs))
    assert sorted(k.decode() for k, _ in out) == sorted(e.listing_id for e in evs)
    assert m.value("opal_enrich_breaker_trips_total", dependency="model") >= 1
    assert m.value("opal_enrich_probes_total", dependency="model", result="down") >= 1
    assert m.value("opal_enrich_probes_total", dependency="model", result="up") + m.value("opal_enrich_aspect_events_total") > 0
    assert m.value("opal_enrich_breaker_open", dependency="model") == 0
    assert _committed(s) == len(evs)


def test_concurrent_misses_on_one_image_share_one_model_request(wsettings: OpalSettings, images: Path) -> None:
    s = _one_partition(wsettings, max_in_flight=32, batch_max_size=32)
    photos = _events(images, 3, prefix="p")
    evs = [p.model_copy(update={"listing_id": f"sf-{i}-{p.listing_id}", "event_id": uuid.uuid4().hex}) for i in range(8) for p in photos]
    _publish_big(s, [(e.listing_id.encode(), CODEC.encode(e)) for e in evs])
    m = _run(s)
    out = read_topic(s, s.topics.aspects, EventCodec(AspectEvent), len(evs))
    assert len({k for k, _ in out}) == 24
    assert m.value("opal_enrich_model_requests_total") == 3  # one per distinct (model, category, image)
    assert m.value("opal_enrich_coalesced_total") + m.value("opal_enrich_cache_hits_total") == 21


def test_worker_status_shows_an_outage_and_sigterm_during_it_loses_nothing(
    wsettings: OpalSettings, images: Path, cli_env: dict[str, str]
) -> None:
    import os
    import signal
    import subprocess

    s = _one_partition(wsettings, breaker_failures=2, breaker_probe_s=0.5, breaker_probe_max_s=1.0)
    evs = _events(images, 4, prefix="st")
    _publish_big(s, [(e.listing_id.encode(), CODEC.encode(e)) for e in evs])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]  # nothing listens here: the model is down
    env = settings_env(s, cli_env) | {
        "OPAL_VLLM_ENDPOINTS": f'["http://127.0.0.1:{dead_port}/v1"]',
        "OPAL_VLLM_MODEL": "opal-tiny@down",
        "OPAL_WORKER_GROUP_ID": s.worker.group_id,
        "OPAL_WORKER_ALLOWED_FILE_ROOT": str(images),
        "OPAL_WORKER_BREAKER_FAILURES": "2",
        "OPAL_WORKER_BREAKER_PROBE_S": "0.5",
    }
    worker = subprocess.Popen(
        [opal_bin(), "worker", "enrich", "--log-level", "WARNING"],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, shown = time.monotonic() + 60, ""
        while time.monotonic() < deadline:
            r = subprocess.run([opal_bin(), "worker", "status"], env=env, cwd=REPO, capture_output=True, text=True, timeout=30)
            shown = r.stdout
            if r.returncode == 0 and "model" in shown and f"{s.topics.images_realtime}[0]" in shown:
                break
            time.sleep(1)
        assert "model" in shown, shown  # the open breaker
        row = next(line for line in shown.splitlines() if "/metrics" in line)
        assert row.split("│")[2].strip() == "4", shown  # the four records are held, none dead-lettered
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, out[-2000:]
    assert "Traceback" not in out
    assert read_to_end(s, s.topics.dead_letters, EventCodec(DeadLetter)) == []  # the worker has exited: all it wrote
    # the held records were not committed: a worker with a live model picks them all up
    m = _run(s)
    assert m.value("opal_enrich_aspect_events_total") == 4
    assert not [p for p in (Path(env["OPAL_EMBEDDED_RUN_DIR"]) / "workers").glob("*.json") if str(worker.pid) in p.name]
    assert os.path.exists(env["OPAL_EMBEDDED_RUN_DIR"])
