"""Redis cache of generated listings, keyed by model version, category and image content.

Contract
- ``get`` returns a stored :class:`CachedListing` or None; ``put`` stores one with
  the configured TTL. Both are idempotent. Every look-up made in one turn of the event loop
  (``get_many`` of a poll batch, concurrent ``get`` calls) shares one MGET, each call with its
  own result.
- A Redis failure never fails the event: ``get`` degrades to a miss and ``put`` to a
  no-op; both count it in ``errors`` and call ``on_error(op)`` (``"get"``, ``"put"``,
  ``"decode"``) so metrics show a sick cache.
- Keys: ``<prefix>result:<model version>:<schema key>:<sha256 of the image bytes>``, the schema key
  being :attr:`schemas.category.CategorySchema.key` (category and schema version; for the generic
  fallback also the category it stands in for). A new model version or a changed schema never
  sees an old one's results.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedListing:
    """A generated listing as the cache keeps it: what an AspectEvent needs, including the schema check the
    model's output got (a hit reports it as it was, not as valid by assumption)."""

    title: str
    aspects: list[tuple[str, str, float]]
    unknown_keys: list[str] = field(default_factory=list)
    invalid_values: list[str] = field(default_factory=list)
    model_name: str = ""
    model_version: str = ""
    missing_required: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not (self.unknown_keys or self.invalid_values or self.missing_required)


def images_digest(sha256s: list[str]) -> str:
    """The cache's image key from the images' SHA-256 (hex) digests: the one digest, or for several the sha256 of
    the concatenated binary digests."""
    if len(sha256s) == 1:
        return sha256s[0]
    return hashlib.sha256(b"".join(bytes.fromhex(h) for h in sha256s)).hexdigest()


class ResultCache:
    def __init__(self, url: str, ttl_s: int, prefix: str = "opal:") -> None:
        self._redis = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.errors = 0
        self.round_trips = 0  # MGETs sent (look-ups coalesce: fewer than gets under load)
        self.on_error: Callable[[str], None] | None = None
        self._pending: list[tuple[str, asyncio.Future[bytes | None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    def _error(self, op: str) -> None:
        self.errors += 1
        if self.on_error is not None:
            self.on_error(op)

    def key(self, model_version: str, category: str, digest: str) -> str:
        """The Redis key; ``category`` is the schema key (see the module contract)."""
        return f"{self.prefix}result:{model_version}:{category}:{digest}"

    async def get(self, model_version: str, category: str, digest: str) -> CachedListing | None:
        """The stored listing or None (:meth:`get_many` of one key)."""
        return (await self.get_many([(model_version, category, digest)]))[0]

    async def get_many(self, keys: list[tuple[str, str, str]]) -> list[CachedListing | None]:
        """The stored listing or None for each ``(model version, schema key, digest)``, in order. Every look-up
        queued in the same turn of the event loop (a poll batch, concurrent gets) shares one MGET. A Redis
        failure makes each key of this call a miss, counted once; an unreadable entry is a miss of its own."""
        if not keys:
            return []
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[bytes | None]] = []
        for k in keys:
            fut: asyncio.Future[bytes | None] = loop.create_future()
            self._pending.append((self.key(*k), fut))
            futures.append(fut)
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
            self._flushes.add(self._flusher)  # a strong reference until it ends (asyncio keeps only weak ones)
            self._flusher.add_done_callback(self._flushes.discard)
        try:
            raws = [await fut for fut in futures]  # one flush answers them all, or fails them all
        except (RedisError, OSError) as e:
            self._error("get")
            log.warning("result cache get of %d key(s) failed (treated as misses): %s", len(keys), e)
            return [None] * len(keys)
        return [self._listing(raw) for raw in raws]

    def _listing(self, raw: bytes | None) -> CachedListing | None:
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            d["aspects"] = [tuple(a) for a in d["aspects"]]
            return CachedListing(**d)
        except (ValueError, TypeError, KeyError) as e:
            self._error("decode")
            log.warning("unreadable cache entry ignored: %s", e)
            return None

    async def _flush(self) -> None:
        """One MGET for every look-up queued since the last one (after one yield, so a batch's records all queue).
        Every waiter gets an answer: its value, or the failure (a cancelled flush fails them as a connection error)."""
        try:
            await asyncio.sleep(0)
        except BaseException:
            batch, self._pending, self._flusher = self._pending, [], None
            self._fail(batch, ConnectionError("cache look-up ended: cancelled"))
            raise
        batch, self._pending, self._flusher = self._pending, [], None
        try:
            values = await self._redis.mget([k for k, _ in batch])
            self.round_trips += 1
            for (_, fut), raw in zip(batch, values, strict=True):
                if not fut.done():  # a waiter cancelled meanwhile
                    fut.set_result(raw)
        except Exception as e:  # Redis down: each waiter's miss; anything else (a bug) reaches each waiter as it is
            self._fail(batch, e)
        except BaseException:
            self._fail(batch, ConnectionError("cache look-up ended: cancelled"))
            raise
        finally:
            self._fail(batch, ConnectionError("cache look-up ended without an answer"))  # no-op once all are answered

    @staticmethod
    def _fail(batch: list[tuple[str, asyncio.Future[bytes | None]]], error: BaseException) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: a waiter cancelled meanwhile leaves no "never retrieved" warning

    async def put(self, model_version: str, category: str, digest: str, value: CachedListing) -> None:
        try:
            await self._redis.set(self.key(model_version, category, digest), json.dumps(asdict(value)), ex=self.ttl_s)
        except (RedisError, OSError) as e:
            self._error("put")
            log.warning("result cache put failed (ignored): %s", e)

    async def aclose(self) -> None:
        await self._redis.aclose()
