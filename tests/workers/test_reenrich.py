"""Re-enrichment after a promotion, on the real broker: stale listings go back on the backfill lane, once each."""

from __future__ import annotations

import subprocess

from schemas.events import AspectEvent, AspectValue, ImageRef, Lane, ListingImageEvent, ModelInfo, SchemaCheck
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from tests.support import REPO, opal_bin, publish, read_to_end, settings_env
from topology.admin import apply_topology
from topology.declared import build_topology
from workers.kafka_clients import make_admin
from workers.reenrich import reenrich_event_id

CODEC = EventCodec(AspectEvent)


def _aspect_event(listing_id: str, version: str, images: bool = True) -> AspectEvent:
    return AspectEvent(
        listing_id=listing_id,
        source_event_id=f"e-{listing_id}-{version}",
        category="handbag",
        title="white leather tote",
        aspects=[AspectValue(name="Color", value="white", confidence=0.9)],
        model=ModelInfo(name="opal-tiny", version=version),
        schema_check=SchemaCheck(valid=True),
        images=[ImageRef(uri=f"file:///data/{listing_id}.jpg")] if images else [],
        seller_title="white tote",
        seller_aspects={"Color": "white"},
    )


def test_stale_listings_are_republished_on_the_backfill_lane_idempotently(settings: OpalSettings, cli_env: dict[str, str]) -> None:
    s = settings
    apply_topology(make_admin(s.kafka), build_topology(s))
    records = [
        (b"old-1", CODEC.encode(_aspect_event("old-1", "v1"))),
        (b"old-2", CODEC.encode(_aspect_event("old-2", "v1"))),
        (b"new-1", CODEC.encode(_aspect_event("new-1", "v1"))),
        (b"new-1", CODEC.encode(_aspect_event("new-1", "v2"))),  # its latest event is already from v2
        (b"gone", CODEC.encode(_aspect_event("gone", "v1"))),
        (b"gone", None),  # deleted listing: tombstone
        (b"bare", CODEC.encode(_aspect_event("bare", "v1", images=False))),
        (b"junk", b"not avro"),
    ]
    publish(s, s.topics.aspects, records)
    env = settings_env(s, cli_env)

    def reenrich(*extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [opal_bin(), "loop", "reenrich", "--version", "v2", "--rate", "0", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)

    dry = reenrich("--dry-run")
    assert dry.returncode == 0 and dry.stdout.strip().endswith("reenrich: 0 listings re-published for v2; 1 of 4 already at it"), dry.stdout
    r = reenrich()
    assert r.returncode == 0 and r.stdout.strip().endswith("reenrich: 2 listings re-published for v2; 1 of 4 already at it"), r.stdout
    sent = read_to_end(s, s.topics.images_backfill, EventCodec(ListingImageEvent))
    assert sorted(k for k, _ in sent) == [b"old-1", b"old-2"]
    for _, ev in sent:
        assert ev.lane is Lane.BACKFILL and ev.event_id == reenrich_event_id(ev.listing_id, "v2")
        assert ev.images[0].uri == f"file:///data/{ev.listing_id}.jpg" and ev.seller_title == "white tote"
    assert reenrich().returncode == 0  # a rerun sends the same events (same ids): recognisable downstream
    again = read_to_end(s, s.topics.images_backfill, EventCodec(ListingImageEvent))
    unserved = subprocess.run(  # an endpoint that cannot say what it serves: refused, nothing sent
        [opal_bin(), "loop", "reenrich", "--version", "v2"],
        capture_output=True,
        text=True,
        env=env | {"OPAL_VLLM_ENDPOINTS": '["http://127.0.0.1:9/v1"]'},
        cwd=REPO,
        timeout=120,
    )
    assert unserved.returncode == 2 and "cannot list the models" in unserved.stdout, unserved.stdout
    assert sorted(ev.event_id for _, ev in again) == sorted(2 * [reenrich_event_id("old-1", "v2"), reenrich_event_id("old-2", "v2")])
