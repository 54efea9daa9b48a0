"""ListingClient logic against in-process HTTP handlers (httpx.MockTransport).

Pure client behaviour only: retries, balancing, error typing, confidences. The same
client against a real vLLM server is tested in test_vllm_serving.py.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from inference.client import InferenceRejectedError, InferenceUnavailableError, ListingClient, confidences, model_info
from inference.images import ImageRejectedError
from inference.output import InvalidOutputError
from opal.samples import load_samples
from schemas.events import ModelInfo

IMG = load_samples()[0].image.read_bytes()
GOOD = '{"title":"White court shoes","aspects":{"Color":"white","Heel Type":"kitten"}}'


def completion(text: str, model: str = "opal-tiny@v7", lp: float = -0.1) -> dict[str, Any]:
    tokens = [{"token": text[i : i + 3], "logprob": lp, "bytes": list(text[i : i + 3].encode())} for i in range(0, len(text), 3)]
    return {
        "model": model,
        "choices": [{"message": {"role": "assistant", "content": text}, "logprobs": {"content": tokens}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": len(tokens)},
    }


def transport(handler: Callable[[httpx.Request], Any]) -> httpx.MockTransport:
    async def h(request: httpx.Request) -> httpx.Response:
        r = handler(request)
        if asyncio.iscoroutine(r):
            r = await r
        return r

    return httpx.MockTransport(h)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make(handler: Callable[[httpx.Request], Any], endpoints: list[str] | None = None, **kw: Any) -> ListingClient:
    kw.setdefault("backoff_base_s", 0.001)
    kw.setdefault("cooldown_s", 0.05)
    return ListingClient(endpoints or ["http://a/v1"], model="opal-tiny@v7", transport=transport(handler), **kw)


def test_success_parses_listing_confidence_and_model() -> None:
    seen: list[dict[str, Any]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        return httpx.Response(200, json=completion(GOOD))

    async def go() -> Any:
        async with make(handler) as c:
            return await c.generate([IMG], "shoes")

    r = run(go())
    assert r.listing.aspects == {"Color": "white", "Heel Type": "kitten"}
    assert r.model.name == "opal-tiny" and r.model.version == "v7"
    assert r.aspect_confidence["Color"] == pytest.approx(math.exp(-0.1))
    assert r.title_confidence == pytest.approx(math.exp(-0.1))
    body = seen[0]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["properties"]["aspects"]["additionalProperties"] is False
    assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert body["logprobs"] is True and body["temperature"] == 0.0
    assert "repetition_penalty" not in body and "frequency_penalty" not in body  # neutral values are not sent


def test_penalties_set_per_deployment_reach_every_request() -> None:
    seen: list[dict[str, Any]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        return httpx.Response(200, json=completion(GOOD))

    async def go() -> Any:
        async with make(handler, repetition_penalty=1.15, frequency_penalty=0.3) as c:
            return await c.generate([IMG], "shoes")

    run(go())
    assert seen[0]["repetition_penalty"] == 1.15 and seen[0]["frequency_penalty"] == 0.3


def test_confidence_tracks_value_tokens() -> None:
    text = '{"title":"ab","aspects":{"Color":"black","Material":"leather"}}'
    start = text.index('"leather"') + 1
    end = start + len("leather")
    tokens = [{"token": ch, "logprob": -2.0 if start <= i < end else -0.01, "bytes": list(ch.encode())} for i, ch in enumerate(text)]
    conf, title = confidences(text, tokens, ["Color", "Material"])
    assert conf["Material"] == pytest.approx(math.exp(-2.0))
    assert conf["Color"] == pytest.approx(math.exp(-0.01))
    assert title == pytest.approx(math.exp(-0.01))
    assert confidences(text, None, ["Color"]) == ({}, None)


def test_retries_5xx_429_and_connection_errors_then_succeeds() -> None:
    calls = Counter()
    script = ["connect", 503, 429]

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        step = script.pop(0) if script else 200
        if step == "connect":
            raise httpx.ConnectError("refused", request=req)
        if step != 200:
            return httpx.Response(step, text="busy")
        return httpx.Response(200, json=completion(GOOD))

    async def go() -> Any:
        async with make(handler, max_retries=3) as c:
            return await c.generate([IMG], "shoes"), c.stats

    r, stats = run(go())
    assert r.attempts == 4 and calls["n"] == 4 and stats.retries == 3


def test_exhausted_retries_raise_retriable_error() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    async def go() -> None:
        async with make(handler, max_retries=2) as c:
            await c.generate([IMG], "shoes")

    with pytest.raises(InferenceUnavailableError, match="after 3 attempts") as ei:
        run(go())
    assert ei.value.retriable


def test_4xx_is_not_retried() -> None:
    calls = Counter()

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(400, json={"error": "prompt too long"})

    async def go() -> None:
        async with make(handler) as c:
            await c.generate([IMG], "shoes")

    with pytest.raises(InferenceRejectedError, match="400"):
        run(go())
    assert calls["n"] == 1


def test_invalid_model_output_is_typed_not_retried() -> None:
    calls = Counter()

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(200, json=completion("{not json"))

    async def go() -> None:
        async with make(handler) as c:
            await c.generate([IMG], "shoes")

    with pytest.raises(InvalidOutputError) as ei:
        run(go())
    assert ei.value.raw == "{not json" and calls["n"] == 1


def test_corrupt_image_rejected_before_any_request() -> None:
    calls = Counter()

    def handler(req: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(200, json=completion(GOOD))

    async def go() -> None:
        async with make(handler) as c:
            await c.generate([IMG[:300]], "shoes")

    with pytest.raises(ImageRejectedError):
        run(go())
    assert calls["n"] == 0


def test_least_outstanding_balancing_and_failover() -> None:
    # "slow" holds every request it gets until all the others are answered; "fast" answers at once. A request goes to
    # slow only while slow has no more outstanding than fast, and at most 8 are outstanding: slow gets between 1 (the
    # first request, on a tie) and 4. A balancer that ignored outstanding requests would fill all 8 slots with held
    # requests and never finish (the timeout below).
    n = 40
    held: list[asyncio.Event] = []
    answered = Counter()

    async def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "slow":
            release = asyncio.Event()
            held.append(release)
            if answered["fast"] + len(held) == n:
                for e in held:
                    e.set()
            await release.wait()
        else:
            await asyncio.sleep(0)
            answered["fast"] += 1
            if answered["fast"] + len(held) == n:
                for e in held:
                    e.set()
        return httpx.Response(200, json=completion(GOOD))

    async def go() -> Counter[str]:
        async with make(handler, endpoints=["http://slow/v1", "http://fast/v1"], max_concurrency=8) as c:
            rs = await asyncio.wait_for(asyncio.gather(*[c.generate([IMG], "shoes") for _ in range(n)]), 30)
            return Counter(httpx.URL(r.endpoint).host for r in rs)

    hosts = run(go())
    assert 1 <= hosts["slow"] <= 4 and hosts["fast"] == n - hosts["slow"], hosts

    def down(req: httpx.Request) -> httpx.Response:
        if req.url.host == "dead":
            raise httpx.ConnectError("refused", request=req)
        return httpx.Response(200, json=completion(GOOD))

    async def go2() -> list[Any]:
        async with make(down, endpoints=["http://dead/v1", "http://alive/v1"], cooldown_s=30) as c:
            return await asyncio.gather(*[c.generate([IMG], "shoes") for _ in range(10)])

    results = run(go2())
    assert all(httpx.URL(r.endpoint).host == "alive" for r in results)


def test_concurrency_is_bounded() -> None:
    active = Counter()

    async def handler(req: httpx.Request) -> httpx.Response:
        active["now"] += 1
        active["max"] = max(active["max"], active["now"])
        await asyncio.sleep(0.01)
        active["now"] -= 1
        return httpx.Response(200, json=completion(GOOD))

    async def go() -> None:
        async with make(handler, max_concurrency=4) as c:
            await asyncio.gather(*[c.generate([IMG], "shoes") for _ in range(30)])

    run(go())
    assert active["max"] == 4


def test_model_info_parsing() -> None:
    # `opal serve` names a model name@version: split at the first "@"
    assert model_info("opal@2026.1") == ModelInfo(name="opal", version="2026.1")
    assert model_info("opal-tiny@v7") == ModelInfo(name="opal-tiny", version="v7")
    assert model_info("opal@sft@2") == ModelInfo(name="opal", version="sft@2")
    # no version after the name (no "@", or nothing after it): "unversioned"
    assert model_info("opal") == ModelInfo(name="opal", version="unversioned")
    assert model_info("opal@") == ModelInfo(name="opal", version="unversioned")
    # a served path stays whole as the name
    assert model_info("/models/opal-tiny-abo") == ModelInfo(name="/models/opal-tiny-abo", version="unversioned")
