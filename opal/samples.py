"""The bundled sample listings (real ABO photos, see data/sample/ATTRIBUTION.md) as
ListingImageEvents, plus deliberately bad records for showing dead letters."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.events import ImageRef, Lane, ListingImageEvent
from schemas.serde import CodecSet
from schemas.settings import OpalSettings

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"


@dataclass(frozen=True)
class SampleListing:
    item_id: str
    image: Path
    title: str
    product_type: str
    color: str


def load_samples(directory: Path = SAMPLE_DIR) -> list[SampleListing]:
    out: list[SampleListing] = []
    for line in (directory / "listings.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append(SampleListing(r["item_id"], (directory / r["image"]).resolve(), r["title"], r["product_type"], r["color"]))
    return out


def sample_event(s: SampleListing, lane: Lane = Lane.REALTIME) -> ListingImageEvent:
    """The event a marketplace would send for this listing (seller data is the raw catalogue text)."""
    digest = hashlib.sha256(s.image.read_bytes()).hexdigest()
    return ListingImageEvent(
        listing_id=f"abo-{s.item_id}",
        category=s.product_type,
        images=[ImageRef(uri=s.image.as_uri(), sha256=digest)],
        seller_title=s.title,
        seller_aspects={"Color": s.color} if s.color else {},
        lane=lane,
    )


def publish_samples(s: OpalSettings, lane: Lane, bad: bool, samples: Path = SAMPLE_DIR) -> int:
    """Publish the listings of ``samples`` to the ``lane``'s image topic; returns how many records were sent.

    With ``bad``, two deliberately bad records follow: bytes that are not Avro and an image outside the
    allowed root. Raises RuntimeError when a record is not delivered within 30 s.
    """
    from workers.kafka_clients import make_producer

    codec = CodecSet.of(s.kafka)[ListingImageEvent]
    topic = s.topics.images_realtime if lane is Lane.REALTIME else s.topics.images_backfill
    producer = make_producer(s.kafka)
    errors: list[str] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    records: list[tuple[bytes, bytes]] = []
    for item in load_samples(samples):
        ev = sample_event(item, lane)
        records.append((ev.listing_id.encode(), codec.encode(ev)))
    if bad:
        good = sample_event(load_samples(samples)[0], lane)
        records.append((b"bad-corrupt-bytes", b"this is not an avro record"))
        odd = good.model_copy(update={"listing_id": "bad-image-outside-root", "images": [ImageRef(uri="file:///etc/passwd")]})
        records.append((odd.listing_id.encode(), codec.encode(odd)))
    for key, value in records:
        producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
        producer.poll(0)
    remaining = producer.flush(30)
    if remaining or errors:
        raise RuntimeError(f"{remaining} records undelivered, errors: {errors[:3]}")
    return len(records)
