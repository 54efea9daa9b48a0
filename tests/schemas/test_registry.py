"""The Confluent wire format against a registry on 127.0.0.1 (schemas/registry.py, schemas/serde.py's
ConfluentFraming): the bytes, basic auth, errors, and decoding inside a running event loop without blocking it."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from pydantic import SecretStr

from schemas.errors import DecodeError, SchemaRegistryError, UnknownSchemaError
from schemas.events import AspectEvent, AspectValue, ModelInfo, SchemaCheck
from schemas.serde import CodecSet, ConfluentFraming, EventCodec, SchemaRegistryClient
from schemas.settings import KafkaSettings

T0 = datetime(2026, 11, 29, 12, 0, 0, 123000, tzinfo=UTC)
EVENT = AspectEvent(
    listing_id="l1",
    source_event_id="e1",
    category="shoes",
    title="White leather sneakers",
    aspects=[AspectValue(name="Color", value="white", confidence=0.93)],
    model=ModelInfo(name="opal-tiny", version="2026.11.29"),
    schema_check=SchemaCheck(valid=False, unknown_keys=["Size"]),
    image_sha256="ab" * 32,
    cache_hit=True,
    produced_at=T0,
)


class _Registry(BaseHTTPRequestHandler):
    """A registry with the two endpoints OPAL uses. ``delay_s`` slows every GET of a schema, ``status`` makes every
    request answer that HTTP status, ``auth`` (``user:password``) is required when set; ``gets`` counts GETs."""

    schemas: ClassVar[dict[int, str]] = {}
    gets: ClassVar[int] = 0
    delay_s: ClassVar[float] = 0.0
    status: ClassVar[int | None] = None
    auth: ClassVar[str | None] = None

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refused(self) -> bool:
        expected = None if self.auth is None else "Basic " + base64.b64encode(self.auth.encode()).decode()
        if expected is not None and self.headers.get("Authorization") != expected:
            self._send(401, {"error_code": 401, "message": "Unauthorized"})
            return True
        if self.status is not None:
            self._send(self.status, {"error_code": self.status * 100, "message": "forced"})
            return True
        return False

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self._refused():
            return
        for sid, s in self.schemas.items():
            if s == body["schema"]:
                return self._send(200, {"id": sid})
        sid = 100 + len(self.schemas)
        self.schemas[sid] = body["schema"]
        self._send(200, {"id": sid})

    def do_GET(self) -> None:
        type(self).gets += 1
        time.sleep(self.delay_s)
        if self._refused():
            return
        sid = int(self.path.split("?")[0].rsplit("/", 1)[1])
        if sid not in self.schemas:
            return self._send(404, {"error_code": 40403, "message": "Schema not found"})
        self._send(200, {"schema": self.schemas[sid]})


@pytest.fixture
def registry_url() -> Iterator[str]:
    _Registry.schemas, _Registry.gets, _Registry.delay_s, _Registry.status, _Registry.auth = {}, 0, 0.0, None, None
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _confluent(url: str, **kw: Any) -> ConfluentFraming:
    return ConfluentFraming(SchemaRegistryClient(url, **kw))


def test_confluent_wire_format(registry_url: str) -> None:
    writer = EventCodec(AspectEvent, framing=_confluent(registry_url))
    data = writer.encode(EVENT)
    assert data[0] == 0 and struct.unpack(">I", data[1:5])[0] == 100
    assert data[5:] == EventCodec(AspectEvent).encode(EVENT)[10:]  # the same Avro body as single-object
    assert json.loads(_Registry.schemas[100]) == writer.writer.raw  # registered under the record name
    reader = EventCodec(AspectEvent, framing=_confluent(registry_url))  # fresh caches
    assert reader.decode(data) == EVENT
    assert reader.decode(data) == EVENT and _Registry.gets == 1  # learnt once
    with pytest.raises(UnknownSchemaError):
        reader.decode(b"\x00" + struct.pack(">I", 7) + data[5:])
    with pytest.raises(DecodeError, match="magic"):
        reader.decode(b"\xc3\x01" + data)


def test_registry_unreachable_is_retriable() -> None:
    codec = EventCodec(AspectEvent, framing=_confluent("http://127.0.0.1:9", timeout_s=1))
    with pytest.raises(SchemaRegistryError) as ei:
        codec.encode(EVENT)
    assert ei.value.retriable
    with pytest.raises(SchemaRegistryError, match="unreachable"):
        codec.decode(b"\x00" + struct.pack(">I", 100) + b"\x00")


def test_registry_basic_auth_from_the_settings(registry_url: str) -> None:
    """OPAL_KAFKA_SCHEMA_REGISTRY_URL's user:password (or OPAL_KAFKA_SCHEMA_REGISTRY_AUTH) reaches the registry as
    basic auth, for registering and for fetching; a wrong password is a retriable registry error."""
    _Registry.auth = "opal:s3cret"
    host = registry_url.removeprefix("http://")
    codecs = CodecSet.of(KafkaSettings(schema_registry_url=f"http://opal:s3cret@{host}"))
    data = codecs[AspectEvent].encode(EVENT)
    reader = CodecSet.of(KafkaSettings(schema_registry_url=registry_url, schema_registry_auth=SecretStr("opal:s3cret")))
    assert reader[AspectEvent].decode(data) == EVENT
    wrong = CodecSet.of(KafkaSettings(schema_registry_url=registry_url, schema_registry_auth=SecretStr("opal:guess")))
    with pytest.raises(SchemaRegistryError, match=r"refused.*401") as ei:
        wrong[AspectEvent].decode(data)
    assert ei.value.retriable


def test_an_unseen_schema_id_does_not_block_a_running_loop(registry_url: str) -> None:
    """The registry answers a schema fetch after 0.6 s. Inside a running loop, decode of an id not warmed raises a
    retriable error at once (and starts the fetch); warm fetches it while another task keeps ticking every 10 ms;
    then decode needs no request."""
    data = EventCodec(AspectEvent, framing=_confluent(registry_url)).encode(EVENT)
    reader = EventCodec(AspectEvent, framing=_confluent(registry_url))
    _Registry.delay_s = 0.6

    async def scenario() -> tuple[int, float, AspectEvent]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(SchemaRegistryError, match="warm") as ei:
            reader.decode(data)
        assert ei.value.retriable
        refused_in = time.monotonic() - t0
        before = ticks
        await reader.warm([data, None, b"\xc3\x01 not confluent", data])
        during = ticks - before
        event = reader.decode(data)
        ticker.cancel()
        return during, refused_in, event

    during, refused_in, event = asyncio.run(scenario())
    assert refused_in < 0.2, f"decode held the loop for {refused_in:.2f} s"
    assert during >= 20, f"the loop ticked only {during} times while the schema was fetched"
    assert event == EVENT
    assert _Registry.gets == 1  # the background fetch the refused decode started is the one warm waited for


def test_warm_keeps_failures_for_decode_and_tries_again(registry_url: str) -> None:
    """warm never raises: an id the registry lacks decodes to UnknownSchemaError (dead letter), an outage to a
    retriable SchemaRegistryError; once the registry answers, the next warm learns the id."""
    data = EventCodec(AspectEvent, framing=_confluent(registry_url)).encode(EVENT)
    missing = b"\x00" + struct.pack(">I", 7) + data[5:]
    reader = EventCodec(AspectEvent, framing=_confluent(registry_url))

    async def scenario() -> None:
        _Registry.status = 503
        await reader.warm([data, missing])
        with pytest.raises(SchemaRegistryError, match="503") as ei:
            reader.decode(data)
        assert ei.value.retriable
        _Registry.status = None
        await reader.warm([data, missing])
        assert reader.decode(data) == EVENT
        with pytest.raises(UnknownSchemaError) as unknown:
            reader.decode(missing)
        assert not unknown.value.retriable

    asyncio.run(scenario())
