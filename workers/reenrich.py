"""Re-enrichment after a promotion: the catalogue converges to the new model version.

The aspects topic (compacted by listing id) holds each listing's current AspectEvent, and
since AspectEvent v2 that event carries what is needed to enrich the listing again (its
images, category, seller title and aspects). :func:`plan` reads the topic to the end
offsets the broker reports, keeps the latest event per listing, and turns every listing
whose event came from another model version into a ``ListingImageEvent`` on the **backfill**
lane; :func:`publish` sends them at a bounded rate. The enrich workers serve the backfill
lane only with what realtime leaves (``workers/flow_control.py``), and the new version
misses the result cache (its key holds the model version), so each listing is generated
again by the promoted model.

Contract
- Idempotent: a listing's re-enrichment event id is derived from (listing id, target
  version), so a rerun (or a crash and rerun) re-sends the same events, recognisable
  downstream; listings already at the target version are not sent again.
- :func:`publish` returns only after every event it sent was acknowledged (raises on a
  delivery error or a record the producer refuses: rerun it). Paced without a catch-up burst;
  a full producer queue is waited out (``workers/paced_producer.py``). Undecodable records and
  events without images are counted, never sent.
- Progress: :func:`plan` and :func:`publish` report through a callback; the counts say how
  far the catalogue has converged (listings at the target version / all listings).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from confluent_kafka import Producer

from schemas.errors import OpalError
from schemas.events import AspectEvent, Lane, ListingImageEvent
from schemas.serde import EventCodec
from schemas.settings import KafkaSettings
from workers.kafka_clients import messages_to_end
from workers.paced_producer import PacedProducer

E = TypeVar("E")


@dataclass
class Plan:
    target: str  # the model version listings should come from
    listings: int = 0  # listings with a current AspectEvent
    at_target: int = 0
    unreadable: int = 0  # records that are not AspectEvents
    without_images: int = 0
    events: list[ListingImageEvent] = field(default_factory=list)  # what to send


def reenrich_event_id(listing_id: str, target: str) -> str:
    return "reenrich-" + hashlib.sha256(f"{listing_id}\0{target}".encode()).hexdigest()[:24]


def read_latest(
    kafka: KafkaSettings,
    topic: str,
    codec: EventCodec[E],
    timeout_s: float = 120,
    key_of: Callable[[E], str] = lambda ev: str(getattr(ev, "listing_id", "")),
) -> tuple[dict[str, E], int]:
    """(latest event per key, unreadable records) of a compacted ``topic`` up to the end offsets reported now.

    A record counts as unreadable when it does not decode or its key is not ``key_of`` of its event (the listing id
    by default: the aspect and judge-outcome topics; the preference topic is keyed by pair id)."""
    latest: dict[str, E] = {}
    unreadable = 0
    for m in messages_to_end(kafka, topic, timeout_s):
        key = (m.key() or b"").decode(errors="replace")
        if m.value() is None:
            latest.pop(key, None)  # a tombstone: the listing is gone
            continue
        try:
            ev = codec.decode(m.value())
        except OpalError:
            unreadable += 1
            continue
        if key_of(ev) == key:
            latest[key] = ev
        else:  # keyed under another id (or none): not this listing's current state
            unreadable += 1
    return latest, unreadable


def plan(latest: dict[str, AspectEvent], target: str, unreadable: int = 0) -> Plan:
    """Which listings to send again: those whose current event's model version is not ``target``."""
    p = Plan(target=target, listings=len(latest), unreadable=unreadable)
    for listing_id, ev in sorted(latest.items()):
        if ev.model.version == target:
            p.at_target += 1
        elif not ev.images:
            p.without_images += 1
        else:
            p.events.append(
                ListingImageEvent(
                    event_id=reenrich_event_id(listing_id, target),
                    listing_id=listing_id,
                    category=ev.category,
                    images=ev.images,
                    seller_title=ev.seller_title,
                    seller_aspects=ev.seller_aspects,
                    lane=Lane.BACKFILL,
                )
            )
    return p


def publish(
    producer: Producer,
    topic: str,
    events: list[ListingImageEvent],
    codec: EventCodec[ListingImageEvent],
    rate_per_s: float,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Send ``events`` (keyed by listing id) at most ``rate_per_s`` a second (0: no limit); returns how many were
    acknowledged, which is all of them: raises RuntimeError when any was not (a delivery error, a record the producer
    refused, or one still in flight after 60 s). Paced by :class:`workers.paced_producer.PacedProducer`."""
    sender = PacedProducer(producer, rate_per_s)
    for i, ev in enumerate(events, 1):
        sender.send(topic, codec.encode(ev), key=ev.listing_id.encode(), label=ev.listing_id)
        if progress is not None and (i % 50 == 0 or i == len(events)):
            progress(i, len(events))
    not_acked = sender.flush(60)
    if not_acked:
        raise RuntimeError(f"{not_acked} of {sender.sent} re-enrichment events were not acknowledged ({sender.problem()}): rerun")
    return sender.acked
