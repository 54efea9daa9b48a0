"""The enrich pipeline with fakes for its clients (pure logic): the worker's own stages, policy and outputs."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from inference.client import InferenceResult, InferenceUnavailableError
from inference.images import ImageRejectedError, PreparedImage, inspect_image, prepare_image
from inference.output import Listing
from schemas.category import default_categories
from schemas.events import AspectEvent, DeadLetter, ImageRef, Lane, ListingImageEvent, ModelInfo, SchemaCheck
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from tests.support import REPO
from workers.enrich import EnrichClients, EnrichWorker
from workers.enrich.pipeline import Pipeline
from workers.enrich.record import Record
from workers.image_loader import FetchedImage
from workers.result_cache import CachedListing, images_digest

PHOTO = (REPO / "data" / "sample" / "images" / "00020b5a.jpg").read_bytes()
CODEC: EventCodec[ListingImageEvent] = EventCodec(ListingImageEvent)
ASPECTS: EventCodec[AspectEvent] = EventCodec(AspectEvent)
DEAD: EventCodec[DeadLetter] = EventCodec(DeadLetter)
TOPIC = OpalSettings().topics.images_realtime


class Loader:
    """The real loader's fetch/prepare split, counting calls: file:// images are read in place (each photo its own
    bytes: the photo with its URI appended after the JPEG end), https:// ones are fetched; ``bad.jpg`` is refused."""

    def __init__(self, photo: bytes = PHOTO) -> None:
        self.photo = photo
        self.reads = 0
        self.fetches = 0
        self.decodes = 0

    def _bytes(self, uri: str) -> FetchedImage:
        if uri.endswith("bad.jpg"):
            raise ImageRejectedError("corrupt JPEG image: bad")
        data = self.photo if "same" in uri else self.photo + uri.replace("https://cdn.example.com/", "file:///img/").encode()
        return FetchedImage(data, inspect_image(data))

    def fetch_local(self, uri: str) -> FetchedImage | None:
        if uri.startswith("https://"):
            return None
        self.reads += 1
        return self._bytes(uri)

    async def fetch(self, uri: str) -> FetchedImage:
        self.fetches += 1
        return self._bytes(uri)

    def prepare(self, fetched: FetchedImage) -> PreparedImage:
        self.decodes += 1
        return prepare_image(fetched.data, header=fetched.header)


class Cache:
    """MGET-like: a hit for the digests given; counts round trips and puts."""

    def __init__(self, *hits: bytes) -> None:
        self.hits = {images_digest([hashlib.sha256(h).hexdigest()]) for h in hits}
        self.mgets: list[int] = []
        self.puts = 0
        self.on_error: Any = None

    async def get_many(self, keys: list[tuple[str, str, str]]) -> list[CachedListing | None]:
        self.mgets.append(len(keys))
        listing = CachedListing("A red shoe", [("Color", "Red", 0.9)], model_name="opal-tiny", model_version="v1")
        return [listing if k[2] in self.hits else None for k in keys]

    async def put(self, *_args: Any) -> None:
        self.puts += 1


class Model:
    """Fails ``failures`` times with an outage-kind error, then answers; counts requests."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.requests = 0

    async def generate(self, images: list[PreparedImage], schema: Any) -> InferenceResult:
        self.requests += 1
        if self.requests <= self.failures:
            raise InferenceUnavailableError("endpoint answered 503")
        return InferenceResult(
            listing=Listing("A blue shoe", {"Color": "Blue"}),
            check=SchemaCheck(valid=True),
            aspect_confidence={"Color": 0.8},
            title_confidence=None,
            model=ModelInfo(name="opal-tiny", version="v1"),
            raw="",
            endpoint="http://127.0.0.1:1",
            attempts=1,
            queued_ms=1.0,
            inference_ms=2.0,
        )


class Producer:
    """Records what is produced; ``poll`` acknowledges it all (calls the delivery callbacks, as librdkafka does)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self._callbacks: list[Any] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, on_delivery: Any = None) -> None:
        self.sent.append((topic, key, value))
        self._callbacks.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(None, None)
        return len(callbacks)

    def __len__(self) -> int:
        return len(self._callbacks)

    def aspects(self) -> list[AspectEvent]:
        return [ASPECTS.decode(v) for t, _, v in self.sent if t == OpalSettings().topics.aspects]

    def dead_letters(self) -> list[DeadLetter]:
        return [DEAD.decode(v) for t, _, v in self.sent if t == OpalSettings().topics.dead_letters]


class Consumer:
    def __init__(self) -> None:
        self.stored: list[tuple[str, int, int]] = []

    def store_offsets(self, offsets: list[Any]) -> None:
        self.stored += [(tp.topic, tp.partition, tp.offset) for tp in offsets]


class Message:
    """The parts of a confluent-kafka Message the worker reads."""

    def __init__(self, offset: int, value: bytes) -> None:
        self._offset, self._value = offset, value

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return f"k{self._offset}".encode()

    def value(self) -> bytes:
        return self._value

    def headers(self) -> None:
        return None

    def error(self) -> None:
        return None


class Harness:
    """An EnrichWorker on fakes, its pipeline built as ``run`` builds it."""

    def __init__(self, loader: Loader, cache: Cache | None = None, model: Model | None = None) -> None:
        s = OpalSettings()
        s = s.model_copy(update={"worker": s.worker.model_copy(update={"retry_backoff_s": 0.0, "retry_backoff_max_s": 0.0})})
        self.loader, self.cache, self.model = loader, cache, model or Model()
        self.producer, self.consumer = Producer(), Consumer()
        clients = EnrichClients(
            consumers={Lane.REALTIME: self.consumer},  # type: ignore[dict-item]
            producer=self.producer,  # type: ignore[arg-type]
            model=self.model,  # type: ignore[arg-type]
            loader=loader,  # type: ignore[arg-type]
            cache=cache,  # type: ignore[arg-type]
            schemas=default_categories(),
            listing_codec=CODEC,
            aspect_codec=ASPECTS,
            dead_letter_codec=DEAD,
        )
        self.worker = EnrichWorker(s, clients)
        self.worker.lanes.assigned.add((TOPIC, 0))
        self.pipeline = Pipeline(self.worker.stages("opal-tiny@v1"), self.worker.policy, self.worker.stopping)

    def hold(self, values: list[bytes]) -> list[Record]:
        return [self.worker.lanes.hold(Message(i, v), Lane.REALTIME, 0.0) for i, v in enumerate(values)]  # type: ignore[arg-type]

    async def settle(self, records: list[Record]) -> None:
        """Wait until every record's task (its batch's or its own) is done."""
        while tasks := {r.task for r in records if r.task is not None and not r.task.done()}:
            await asyncio.wait(tasks)
        assert self.pipeline.fatal is None and self.worker.outputs.fatal is None


def event(i: int, *uris: str) -> bytes:
    return CODEC.encode(ListingImageEvent(listing_id=f"l{i}", category="shoes", images=[ImageRef(uri=u) for u in uris]))


def test_a_record_fetches_and_decodes_its_images_once_however_often_it_is_retried() -> None:
    h = Harness(Loader(), model=Model(failures=2))
    records = h.hold([event(0, "https://cdn.example.com/a.jpg")])

    async def go() -> None:
        await h.pipeline.run_batch(records)
        await h.settle(records)

    asyncio.run(go())
    assert h.model.requests == 3  # two failures retried, then the answer
    assert h.loader.fetches == 1 and h.loader.decodes == 1
    out = h.producer.aspects()
    assert len(out) == 1 and out[0].title == "A blue shoe" and not out[0].cache_hit and out[0].timings.inference_ms == 2.0
    assert h.worker.metrics.value("opal_enrich_retries_total", reason="inference_failed") == 2


def test_a_cache_hit_decodes_no_pixels_and_sends_no_model_request() -> None:
    """Header checks and the hash of the raw bytes find the result; the full decode is only for a model request."""
    same = PHOTO
    h = Harness(Loader(), Cache(same))
    records = h.hold([event(0, "file:///img/same.jpg")])
    asyncio.run(h.pipeline.run_batch(records))
    assert all(r.task is None for r in records)  # nothing left the batch: no task of its own
    (out,) = h.producer.aspects()
    assert out.cache_hit and out.title == "A red shoe" and out.image_sha256 == images_digest([hashlib.sha256(same).hexdigest()])
    assert h.loader.reads == 1 and h.loader.decodes == 0 and h.model.requests == 0 and h.cache is not None and h.cache.mgets == [1]


def test_a_truncated_photo_passes_the_header_checks_but_never_reaches_the_model() -> None:
    """The bytes a cache miss would send are decoded first: a body cut short is a dead letter, no request sent."""
    cut = PHOTO[: len(PHOTO) // 2]
    header = inspect_image(cut)  # the header alone looks fine
    whole = prepare_image(PHOTO)
    assert (header.width, header.height) == (whole.width, whole.height)
    h = Harness(Loader(cut), Cache())
    records = h.hold([event(0, "file:///img/same.jpg")])

    async def go() -> None:
        await h.pipeline.run_batch(records)
        await h.settle(records)

    asyncio.run(go())
    (dead,) = h.producer.dead_letters()
    assert dead.error_kind == "invalid_image" and "corrupt JPEG" in dead.error_message and h.model.requests == 0


def test_one_batch_one_mget_hits_go_out_at_once_and_misses_and_failures_continue_on_their_own() -> None:
    hit = PHOTO + b"file:///img/hit.jpg"
    h = Harness(Loader(), Cache(hit))
    values = [
        event(0, "file:///img/hit.jpg"),
        event(1, "file:///img/miss.jpg"),
        b"\x00not avro",
        event(3, "file:///img/bad.jpg"),
        event(4, "https://cdn.example.com/hit.jpg"),  # fetched over http: the hit photo's bytes
        event(5, "file:///img/hit.jpg"),
    ]
    records = h.hold(values)
    assert h.worker.lanes.held == {Lane.REALTIME: 6, Lane.BACKFILL: 0}

    async def go() -> None:
        await h.pipeline.run_batch(records)
        # the batch pass: local hits produced in one MGET; the miss, the http one and the failures left the batch
        assert [ev.listing_id for ev in h.producer.aspects()] == ["l0", "l5"]
        assert {r.msg.offset() for r in records if r.task is not None} == {1, 2, 3, 4}
        h.worker.outputs.poll(0)  # acknowledged: released, stored only up to the first record still out (offset 1)
        assert h.consumer.stored == [(TOPIC, 0, 1)]
        await h.settle(records)
        h.worker.outputs.poll(0)

    asyncio.run(go())
    assert h.cache is not None and h.cache.mgets[0] == 3  # the three local records that read their images: one MGET
    assert sorted(ev.listing_id for ev in h.producer.aspects()) == ["l0", "l1", "l4", "l5"]
    by_id = {ev.listing_id: ev for ev in h.producer.aspects()}
    assert by_id["l4"].cache_hit and not by_id["l1"].cache_hit and h.model.requests == 1 and h.cache.puts == 1
    dead = sorted((d.origin_offset, d.error_kind, d.attempts) for d in h.producer.dead_letters())
    assert dead == [(2, "malformed_event", 1), (3, "invalid_image", 1)]
    assert h.loader.reads == 4 and h.loader.fetches == 1  # each image read once (the refused one not again by its own task)
    assert h.worker.lanes.held == {Lane.REALTIME: 0, Lane.BACKFILL: 0} and h.consumer.stored[-1] == (TOPIC, 0, 6)
    assert h.worker.metrics.value("opal_enrich_cache_hits_total") == 3 and h.worker.metrics.value("opal_enrich_cache_misses_total") == 1


def test_a_model_outage_parks_records_without_spending_attempts_and_a_probe_releases_them() -> None:
    """Failures through the model up to the breaker's threshold open it: records wait (no dead letter), the probe
    closes it, and they go on with a full budget."""
    h = Harness(Loader(), model=Model(failures=10**6))
    probes: list[str] = []

    async def probe(name: str) -> None:
        probes.append(name)
        h.model.failures = 0  # the model is back

    h.worker.gate.prober = probe
    h.worker.gate.probe_backoff = type(h.worker.gate.probe_backoff)(0.0, 0.0)
    values = [event(i, f"file:///img/p{i}.jpg") for i in range(3)]
    records = h.hold(values)

    async def go() -> None:
        await h.pipeline.run_batch(records)
        while not h.worker.gate.is_open("model"):
            await asyncio.sleep(0)
        assert h.producer.sent == []
        while any(r.task is not None and not r.task.done() for r in records):
            h.worker.gate.start_probes()
            await asyncio.sleep(0)
        await h.settle(records)

    asyncio.run(go())
    assert probes and len(h.producer.aspects()) == 3 and h.producer.dead_letters() == []
    assert h.worker.metrics.value("opal_enrich_breaker_trips_total", dependency="model") == 1
