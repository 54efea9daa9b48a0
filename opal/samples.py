"""The bundled sample listings (real ABO photos, see data/sample/ATTRIBUTION.md) as
ListingImageEvents, plus deliberately bad records for showing dead letters."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from schemas.events import ImageRef, Lane, ListingImageEvent

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
