"""Preference-set builder (faust-streaming): the preference topic -> DPO dataset shards (JSONL files).

Contract
- Consumes ``topics.preferences`` as faust app / consumer group :data:`PREFERENCE_GROUP`.
- Each new pair is appended, as one ``PreferencePair`` JSON line (what ``opal train dpo``
  reads), to ``<out_dir>/pairs-<model version>.jsonl``: one shard per model version
  that produced the rejected outputs, so each DPO round trains on its own model's
  mistakes. The line is flushed and fsync'ed, then the pair id is added to a Redis set
  (``<prefix>pairs:seen``); a pair already in the set is skipped, so replays and the
  compacted topic's re-deliveries do not grow the set.
- At-least-once: a crash between the fsync and the Redis write can leave one pair
  twice in a shard; readers dedupe by pair id (``training.dpo`` does). Nothing is lost:
  faust commits the offset only after both.
- Records that are not a PreferencePair become DeadLetters with their reason.
  Decoding never blocks the loop; a schema registry outage is waited out, never a dead
  letter (:func:`workers.faust_app.decode_event`).
- A Redis error reply about a pair (not an outage) dead-letters that pair (``internal_error``).
- Redis down: the agent waits on the pair it holds (:func:`workers.faust_app.gate_for`)
  and faust stops fetching; it goes on where it was when Redis answers. Never a dead letter.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import faust
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from schemas.errors import ErrorKind, OpalError
from schemas.events import DeadLetter, PreferencePair
from schemas.serde import CodecSet
from schemas.settings import OpalSettings
from topology.declared import PREFERENCE_GROUP
from workers.circuit import redis_outage
from workers.dependency_gate import dependency_failure
from workers.faust_app import decode_event, gate_for, make_faust_app, raw_topic, send_dead_letter

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _redis_down(e: Exception) -> bool:
    """Redis unreachable or busy (never a reply about the pair's data), or another dependency's failure."""
    return redis_outage(e) or dependency_failure(e)


def shard_path(out_dir: Path, pair: PreferencePair) -> Path:
    return out_dir / f"pairs-{_UNSAFE.sub('_', pair.model.version) or 'unversioned'}.jsonl"


def append_line(path: Path, line: str) -> None:
    """Append one line durably (flush + fsync) before the caller records it as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def build_preference_app(settings: OpalSettings, out_dir: Path, counts: Counter[str] | None = None) -> faust.App:
    """The faust app with one agent (see the module contract)."""
    codecs = CodecSet.of(settings.kafka)
    codec, dl_codec = codecs[PreferencePair], codecs[DeadLetter]
    counts = counts if counts is not None else Counter()
    t = settings.topics
    seen_key = f"{settings.redis.key_prefix}pairs:seen"
    app = make_faust_app(settings, PREFERENCE_GROUP)
    source, dead_letters = raw_topic(app, t.preferences), raw_topic(app, t.dead_letters)
    state = aioredis.Redis.from_url(settings.redis.url_value(), socket_timeout=5, socket_connect_timeout=5)
    gate = gate_for(settings, counts)

    @app.agent(source)
    async def build_shards(stream: faust.StreamT) -> None:
        async for ev in stream.events():
            try:
                pair = await decode_event(gate, codec, ev.value)
            except OpalError as e:
                await send_dead_letter(dead_letters, dl_codec, t.preferences, ev, e, counts)
                continue
            try:
                if await gate.call("redis", lambda p=pair: state.sismember(seen_key, p.pair_id), _redis_down):
                    counts["duplicates"] += 1
                    continue
                append_line(shard_path(out_dir, pair), pair.model_dump_json())
                await gate.call("redis", lambda p=pair: state.sadd(seen_key, p.pair_id), _redis_down)
            except RedisError as e:  # Redis answered with an error about this pair (not an outage): dead letter, go on
                err = OpalError(f"Redis refused the pair: {e}")
                err.reason = ErrorKind.INTERNAL
                await send_dead_letter(dead_letters, dl_codec, t.preferences, ev, err, counts)
                continue
            counts["written"] += 1

    return app
