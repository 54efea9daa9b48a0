"""The Redis result cache on a real valkey: look-ups of one event-loop turn share one MGET; failures stay misses."""

from __future__ import annotations

import asyncio

from opal.embedded import free_port
from schemas.settings import OpalSettings
from workers.result_cache import CachedListing, ResultCache


def _listing(i: int) -> CachedListing:
    return CachedListing(f"title {i}", [("Color", "Red", 0.9)], model_name="m", model_version="v")


def test_concurrent_lookups_share_one_round_trip(settings: OpalSettings) -> None:
    async def run() -> tuple[list[CachedListing | None], int, int]:
        cache = ResultCache(settings.redis.url_value(), 60, settings.redis.key_prefix + "rc-test:")
        try:
            for i in range(0, 64, 2):  # every other key stored
                await cache.put("m@v", "shoes#x", f"d{i}", _listing(i))
            before = cache.round_trips
            got = await asyncio.gather(*(cache.get("m@v", "shoes#x", f"d{i}") for i in range(64)))
            return list(got), cache.round_trips - before, cache.errors
        finally:
            await cache.aclose()

    got, trips, errors = asyncio.run(run())
    assert trips == 1 and errors == 0
    assert [g.title if g else None for g in got] == [f"title {i}" if i % 2 == 0 else None for i in range(64)]


def test_a_cache_that_is_down_is_a_miss_for_every_lookup() -> None:
    async def run() -> tuple[list[CachedListing | None], int, list[str]]:
        cache = ResultCache(f"redis://127.0.0.1:{free_port()}/0", 60)  # nothing listens there
        ops: list[str] = []
        cache.on_error = ops.append
        try:
            got = await asyncio.gather(*(cache.get("m@v", "shoes#x", f"d{i}") for i in range(5)))
            return list(got), cache.errors, ops
        finally:
            await cache.aclose()

    got, errors, ops = asyncio.run(run())
    assert got == [None] * 5 and errors == 5 and ops == ["get"] * 5


def test_a_cancelled_lookup_leaves_the_others_answered(settings: OpalSettings) -> None:
    async def run() -> CachedListing | None:
        cache = ResultCache(settings.redis.url_value(), 60, settings.redis.key_prefix + "rc-test2:")
        try:
            await cache.put("m@v", "k", "d1", _listing(1))
            gone = asyncio.ensure_future(cache.get("m@v", "k", "d0"))
            kept = asyncio.ensure_future(cache.get("m@v", "k", "d1"))
            await asyncio.sleep(0)
            gone.cancel()
            return await kept
        finally:
            await cache.aclose()

    got = asyncio.run(run())
    assert got is not None and got.title == "title 1"
