"""Avro framing, round trips, schema evolution and bad input."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from fastavro.schema import fingerprint
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import DecodeError, InvalidEventError, OpalError, UnknownSchemaError
from schemas.events import (
    AspectEvent,
    AspectLabel,
    AspectValue,
    DeadLetter,
    Header,
    ImageRef,
    JudgeOutcome,
    Lane,
    ListingImageEvent,
    ModelInfo,
    PreferencePair,
    SchemaCheck,
    Verdict,
)
from schemas.serde import (
    AVRO_ROOT,
    EventCodec,
    SchemaStore,
    SingleObjectFraming,
    default_store,
)

T0 = datetime(2026, 11, 29, 12, 0, 0, 123000, tzinfo=UTC)
MODEL = ModelInfo(name="opal-tiny", version="2026.11.29")


def samples() -> list[Any]:
    return [
        ListingImageEvent(
            event_id="e1",
            listing_id="l1",
            category="shoes",
            images=[ImageRef(uri="file:///data/a.jpg", sha256="ab" * 32), ImageRef(uri="https://img.example/b.jpg")],
            seller_title="Nike Air — white 42 SHIP FAST 🚀",
            seller_aspects={"Color": "white", "Size": "42"},
            lane=Lane.BACKFILL,
            created_at=T0,
            published_at=T0,
        ),
        AspectEvent(
            listing_id="l1",
            source_event_id="e1",
            category="shoes",
            title="White leather sneakers",
            aspects=[AspectValue(name="Color", value="white", confidence=0.93)],
            model=MODEL,
            schema_check=SchemaCheck(valid=False, unknown_keys=["Size"]),
            image_sha256="ab" * 32,
            cache_hit=True,
            produced_at=T0,
        ),
        DeadLetter(
            origin_topic="t",
            origin_partition=2,
            origin_offset=99,
            key=b"l1",
            value=b"\x00\xff raw",
            headers=[Header(key="trace", value=b"x"), Header(key="empty")],
            error_kind="malformed_event",
            error_message="bad magic",
            attempts=3,
            worker="w-1",
            failed_at=T0,
        ),
        JudgeOutcome(
            listing_id="l1",
            source_event_id="e1",
            category="shoes",
            verdict=Verdict.MOSTLY_INCORRECT,
            score=0.4,
            aspect_labels=[AspectLabel(name="Color", value="white", correctly_identified=False)],
            title_matched=False,
            generated='{"aspects":{},"title":"x"}',
            reference_kind="ground_truth",
            reference=None,
            judge_model="judge",
            model=MODEL,
            judged_at=T0,
        ),
        PreferencePair(
            pair_id="p1",
            listing_id="l1",
            category="shoes",
            prompt="Describe",
            image=ImageRef(uri="file:///a.jpg"),
            chosen='{"title":"a"}',
            rejected='{"title":"b"}',
            verdict=Verdict.INCORRECT,
            model=MODEL,
            created_at=T0,
        ),
    ]


@pytest.mark.parametrize("event", samples(), ids=lambda e: type(e).__name__)
def test_round_trip_single_object(event: Any) -> None:
    codec = EventCodec(type(event))
    data = codec.encode(event)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == bytes.fromhex(fingerprint(codec.writer.canonical, "CRC-64-AVRO"))
    assert codec.decode(data) == event


@given(
    listing_id=st.text(min_size=1, max_size=40),
    title=st.none() | st.text(max_size=200),
    aspects=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=8),
    uris=st.lists(st.text(min_size=1, max_size=60), min_size=1, max_size=4),
)
@settings(max_examples=60, deadline=None)
def test_round_trip_any_listing(listing_id: str, title: str | None, aspects: dict[str, str], uris: list[str]) -> None:
    ev = ListingImageEvent(
        listing_id=listing_id,
        category="shoes",
        images=[ImageRef(uri=u) for u in uris],
        seller_title=title,
        seller_aspects=aspects,
        created_at=T0,
        published_at=T0,
    )
    codec = EventCodec(ListingImageEvent)
    assert codec.decode(codec.encode(ev)) == ev


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_raise_only_typed_errors(data: bytes) -> None:
    codec = EventCodec(ListingImageEvent)
    with contextlib.suppress(OpalError):
        codec.decode(data)


@given(st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=8))
@settings(max_examples=150, deadline=None)
def test_corrupted_real_records_raise_only_typed_errors(cut: int, junk: bytes) -> None:
    codec = EventCodec(ListingImageEvent)
    good = codec.encode(samples()[0])
    for data in (good[: min(cut, len(good) - 1)], good[:10] + junk + good[10:], good + junk):
        with contextlib.suppress(OpalError):
            codec.decode(data)


def test_specific_bad_inputs() -> None:
    codec = EventCodec(ListingImageEvent)
    good = codec.encode(samples()[0])
    with pytest.raises(DecodeError, match="no value"):
        codec.decode(None)
    with pytest.raises(DecodeError, match="too short"):
        codec.decode(b"\xc3\x01\x00")
    with pytest.raises(DecodeError, match="magic"):
        codec.decode(b'plain json? {"listing_id": 1}')
    with pytest.raises(UnknownSchemaError, match="fingerprint"):
        codec.decode(b"\xc3\x01" + b"\x00" * 8 + good[10:])
    with pytest.raises(DecodeError, match=r"corrupt|trailing"):
        codec.decode(good[:-3])
    with pytest.raises(DecodeError, match="trailing"):
        codec.decode(good + b"\x00")
    dl = EventCodec(DeadLetter).encode(samples()[2])
    with pytest.raises(DecodeError, match=r"expected ai\.opal\.events\.ListingImageEvent"):
        codec.decode(dl)
    assert DecodeError("x").reason == "malformed_event"


def test_contract_breach_is_invalid_event() -> None:
    """An Avro-valid record that breaks the pydantic contract (empty image list)."""
    import io

    import fastavro

    codec = EventCodec(ListingImageEvent)
    rec = samples()[0].model_dump()
    rec["images"] = []
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, codec.writer.parsed, rec)
    with pytest.raises(InvalidEventError, match="images"):
        codec.decode(b"\xc3\x01" + codec.writer.fingerprint + buf.getvalue())


# -- evolution -------------------------------------------------------------------------
def _v2_with_optional_field() -> dict[str, Any]:
    v1 = json.loads((AVRO_ROOT / "listing_image_event" / "v1.avsc").read_text())
    v2 = copy.deepcopy(v1)
    v2["fields"].append({"name": "marketplace", "type": ["null", "string"], "default": None})
    return v2


def test_adding_an_optional_field_keeps_old_readers_working() -> None:
    v2 = _v2_with_optional_field()
    new_store = SchemaStore()
    new_store.add("listing_image_event", 2, v2)
    old_store = SchemaStore()
    old_store.add("listing_image_event", 2, v2)  # readers ship the new .avsc before writers use it (rule 3)
    old_reader = EventCodec(ListingImageEvent, store=old_store)
    old_reader.writer = old_store.versions("listing_image_event")[0]  # still reads with v1
    assert old_reader.writer.version == 1

    import io

    import fastavro

    rec = samples()[0].model_dump() | {"marketplace": "EBAY_DE"}
    buf = io.BytesIO()
    v2s = new_store.latest("listing_image_event")
    fastavro.schemaless_writer(buf, v2s.parsed, rec)
    data = b"\xc3\x01" + v2s.fingerprint + buf.getvalue()
    assert old_reader.decode(data) == samples()[0]  # new field skipped

    # a new reader (v2) reads v1 data, filling the default
    v1_data = EventCodec(ListingImageEvent).encode(samples()[0])
    rec2 = fastavro.schemaless_reader(io.BytesIO(v1_data[10:]), new_store.versions("listing_image_event")[0].parsed, v2s.parsed)
    assert rec2["marketplace"] is None


def test_reader_without_the_writer_schema_fails_clearly() -> None:
    import io

    import fastavro

    v2 = SchemaStore(root=None).add("listing_image_event", 2, _v2_with_optional_field())
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v2.parsed, samples()[0].model_dump() | {"marketplace": None})
    with pytest.raises(UnknownSchemaError, match="deploy readers"):
        EventCodec(ListingImageEvent).decode(b"\xc3\x01" + v2.fingerprint + buf.getvalue())


def test_shipped_history_follows_the_evolution_rules() -> None:
    """Every later version only adds fields with defaults, and data of each version reads with every other."""
    import io

    import fastavro

    store = default_store()
    by_model = {m.AVRO_DIR: m for m in map(type, samples())}
    for folder in store.folders():
        versions = store.versions(folder)
        assert [v.version for v in versions] == list(range(1, len(versions) + 1)), f"{folder}: versions must be v1..vN"
        for old, new in itertools.pairwise(versions):
            old_f = {f["name"]: f for f in old.raw["fields"]}
            new_f = {f["name"]: f for f in new.raw["fields"]}
            assert set(old_f) <= set(new_f), f"{folder} v{new.version} removed fields"
            for name in set(new_f) - set(old_f):
                assert "default" in new_f[name], f"{folder} v{new.version}: new field {name} has no default"
            for name in old_f:
                assert old_f[name]["type"] == new_f[name]["type"], f"{folder} v{new.version}: type of {name} changed"
        sample = next(e for e in samples() if type(e) is by_model[folder])
        written = {}
        for v in versions:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, v.parsed, sample.model_dump())
            written[v.version] = buf.getvalue()
        for w in versions:
            for r in versions:
                fastavro.schemaless_reader(io.BytesIO(written[w.version]), w.parsed, r.parsed)


def test_single_object_framing_is_the_default() -> None:
    assert isinstance(EventCodec(DeadLetter).framing, SingleObjectFraming)


def test_warm_is_a_no_op_for_single_object_framing() -> None:
    codec = EventCodec(AspectEvent)
    data = codec.encode(samples()[1])
    asyncio.run(codec.warm([data, None, b"junk"]))
    assert codec.decode(data) == samples()[1]
