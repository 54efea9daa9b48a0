"""Events and dead letters through the real broker."""

from __future__ import annotations

import time

from confluent_kafka import Consumer

from opal.samples import load_samples, sample_event
from schemas.category import default_categories
from schemas.errors import OpalError
from schemas.events import DeadLetter, ListingImageEvent
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from topology.admin import apply_topology
from topology.declared import build_topology
from workers.intake import dead_letter_for, decode_listing_event
from workers.kafka_clients import make_admin, make_consumer, make_producer


def _drain(c: Consumer, n: int, timeout_s: float = 30) -> list:
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            out.append(m)
    return out


def test_events_and_dead_letters_round_trip(settings: OpalSettings) -> None:
    apply_topology(make_admin(settings.kafka), build_topology(settings))
    codec = EventCodec(ListingImageEvent)
    dl_codec = EventCodec(DeadLetter)
    events = [sample_event(s) for s in load_samples()[:6]]
    unknown_cat = events[0].model_copy(update={"listing_id": "odd", "category": "spaceship"})
    garbage = b"\x00\x01garbage"
    p = make_producer(settings.kafka)
    topic = settings.topics.images_realtime
    for ev in events:
        p.produce(topic, key=ev.listing_id.encode(), value=codec.encode(ev), headers=[("trace", b"t1")])
    p.produce(topic, key=b"odd", value=codec.encode(unknown_cat))
    p.produce(topic, key=b"junk", value=garbage, headers=[("trace", b"t2")])
    assert p.flush(15) == 0

    c = make_consumer(settings.kafka, "test-intake")
    c.subscribe([topic])
    good, dead = [], []
    for m in _drain(c, len(events) + 2):
        try:
            good.append(decode_listing_event(m, codec, default_categories(), fallback=False))  # the refusing mode
        except OpalError as e:
            dl = dead_letter_for(m, e, worker="test")
            p.produce(settings.topics.dead_letters, key=m.key(), value=dl_codec.encode(dl))
            dead.append(dl)
        c.store_offsets(m)
    c.close()
    assert p.flush(15) == 0
    assert sorted(e.listing_id for e in good) == sorted(e.listing_id for e in events)
    assert {e.listing_id: e for e in good} == {e.listing_id: e for e in events}
    assert sorted(d.error_kind for d in dead) == ["malformed_event", "unknown_category"]

    reader = make_consumer(settings.kafka, "test-dlq")
    reader.subscribe([settings.topics.dead_letters])
    back = [dl_codec.decode(m.value()) for m in _drain(reader, 2)]
    reader.close()
    junk = next(d for d in back if d.key == b"junk")
    assert junk.value == garbage  # raw bytes preserved exactly
    assert [(h.key, h.value) for h in junk.headers] == [("trace", b"t2")]
    assert junk.origin_topic == topic and junk.error_kind == "malformed_event"
    odd = next(d for d in back if d.key == b"odd")
    assert odd.listing_id == "odd" and "spaceship" in odd.error_message
