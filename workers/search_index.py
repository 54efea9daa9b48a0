"""The reference search index over the aspect topic, kept in Redis.

Each listing is one hash ``<prefix>idx:doc:<listing_id>`` (title, category, aspects,
model, the Kafka partition and offset it came from) and is a member of one Redis set per
searchable term: ``a:<name>=<value>`` for every aspect the category schema knows,
``c:<category>`` and ``w:<word>`` for every title word (terms are case-folded). A search
is the intersection of the sets of its terms.

Contract
- :meth:`SearchIndex.apply` is atomic (one Lua script) and **idempotent**: a record
  whose (partition, offset) is not newer than what the document already holds changes
  nothing, so replaying a partition after a crash, in order, ends in the same state.
  A tombstone (``event=None``) removes the listing from every term but keeps a small
  marker with its version, so a replayed older record cannot bring it back.
- Callers may retry :meth:`apply` after any :class:`redis.RedisError`.
- Standalone Redis/Valkey (or a replica set) only: the script touches term keys it
  does not declare, which Redis Cluster forbids.
- Versions are Kafka positions: if the aspect topic is ever recreated (offsets start
  again at 0), clear the index's keys (``<prefix>idx:*``) before re-indexing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from schemas.category import CategoryRegistry
from schemas.events import AspectEvent

WORD = re.compile(r"[^\W_]{2,}", re.UNICODE)

# KEYS: doc, terms-of-doc, all-docs. ARGV: listing id, partition, offset, prefix, doc JSON ('' = tombstone), term...
_APPLY = """
local cur = redis.call('HMGET', KEYS[1], 'partition', 'offset')
if cur[1] and tonumber(cur[1]) == tonumber(ARGV[2]) and tonumber(cur[2]) >= tonumber(ARGV[3]) then
  return 0
end
for _, t in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  redis.call('SREM', ARGV[4] .. t, ARGV[1])
end
redis.call('DEL', KEYS[1], KEYS[2])
if ARGV[5] == '' then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'partition', ARGV[2], 'offset', ARGV[3], 'deleted', '1')
  return 2
end
redis.call('HSET', KEYS[1], 'partition', ARGV[2], 'offset', ARGV[3], 'doc', ARGV[5])
redis.call('SADD', KEYS[3], ARGV[1])
for i = 6, #ARGV do
  redis.call('SADD', ARGV[4] .. ARGV[i], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[i])
end
return 1
"""


@dataclass(frozen=True)
class SearchHit:
    listing_id: str
    title: str
    category: str
    aspects: dict[str, str]
    model: str


def aspect_term(name: str, value: str) -> str:
    return f"a:{name.casefold()}={value.casefold()}"


def category_term(category: str) -> str:
    return f"c:{category.casefold()}"


def word_terms(text: str) -> list[str]:
    return sorted({f"w:{w.casefold()}" for w in WORD.findall(text)})


def terms_of(event: AspectEvent, categories: CategoryRegistry | None = None) -> list[str]:
    """Searchable terms of one listing: known aspects (all, if the category has no schema), category, title words."""
    known: set[str] | None = None
    if categories is not None and event.category in categories:
        known = {n.casefold() for n in categories.resolve(event.category).names}
    aspects = [aspect_term(a.name, a.value) for a in event.aspects if known is None or a.name.casefold() in known]
    return sorted({*aspects, category_term(event.category), *word_terms(event.title)})


class SearchIndex:
    """Listings searchable by aspect, category and title words (see the module contract)."""

    def __init__(self, client: redis.Redis, prefix: str = "opal:", categories: CategoryRegistry | None = None) -> None:
        self.r = client
        self.prefix = f"{prefix}idx:"
        self.categories = categories
        self._apply = self.r.register_script(_APPLY)

    @classmethod
    def from_url(cls, url: str, prefix: str = "opal:", categories: CategoryRegistry | None = None) -> SearchIndex:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5), prefix, categories)

    def _doc_key(self, listing_id: str) -> str:
        return f"{self.prefix}doc:{listing_id}"

    def apply(self, listing_id: str, partition: int, offset: int, event: AspectEvent | None) -> int:
        """Index ``event`` (None: delete) for ``listing_id`` at this Kafka position.

        Returns 1 indexed, 2 deleted, 0 skipped (not newer than what is indexed).
        """
        if event is None:
            doc, terms = "", []
        else:
            doc = json.dumps(
                {
                    "title": event.title,
                    "category": event.category,
                    "aspects": {a.name: a.value for a in event.aspects},
                    "model": f"{event.model.name}@{event.model.version}",
                    "source_event_id": event.source_event_id,
                },
                ensure_ascii=False,
            )
            terms = terms_of(event, self.categories)
        keys = [self._doc_key(listing_id), f"{self.prefix}terms:{listing_id}", f"{self.prefix}all"]
        return int(self._apply(keys=keys, args=[listing_id, partition, offset, self.prefix + "t:", doc, *terms]))

    def count(self) -> int:
        return int(self.r.scard(f"{self.prefix}all"))

    def search(
        self, aspects: dict[str, str] | None = None, category: str | None = None, words: str = "", limit: int = 20
    ) -> tuple[int, list[SearchHit]]:
        """(number of matches, the first ``limit`` hits by listing id) for listings having every given term."""
        terms = [aspect_term(n, v) for n, v in (aspects or {}).items()]
        terms += [category_term(category)] if category else []
        terms += word_terms(words)
        if not terms:
            raise ValueError("give at least one aspect, a category or a title word")
        ids = sorted(m.decode() for m in self.r.sinter([f"{self.prefix}t:{t}" for t in terms]))
        return len(ids), self.get_many(ids[:limit])

    def get_many(self, listing_ids: Sequence[str]) -> list[SearchHit]:
        pipe = self.r.pipeline(transaction=False)
        for i in listing_ids:
            pipe.hget(self._doc_key(i), "doc")
        hits = []
        for i, raw in zip(listing_ids, pipe.execute(), strict=True):
            if raw is None:  # deleted between SINTER and HGET
                continue
            d: dict[str, Any] = json.loads(raw)
            hits.append(SearchHit(i, d["title"], d["category"], d["aspects"], d["model"]))
        return hits

    def close(self) -> None:
        self.r.close()


def parse_aspect_filters(pairs: Iterable[str]) -> dict[str, str]:
    """``["Color=White", "Brand=Nike"]`` -> dict; raises ValueError on a pair without '='."""
    out = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"aspect filter {p!r} is not NAME=VALUE")
        out[name.strip()] = value.strip()
    return out
