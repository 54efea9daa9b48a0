"""Async client for OpenAI-compatible vLLM endpoints serving the OPAL model.

Contract of :meth:`ListingClient.generate`
- Images are checked (:func:`inference.images.prepare_image`) *before* any request;
  a bad image raises :class:`ImageRejectedError` and nothing is sent.
- At most ``max_concurrency`` requests are in flight per client; callers beyond that
  wait (bounded, no unbounded queue inside the client).
- Each attempt has ``timeout_s``. Connection errors, timeouts, HTTP 401/403/404/408/429
  and 5xx are retried up to ``max_retries`` times with capped exponential backoff and
  jitter (:class:`schemas.retry.Backoff`; ``backoff_base_s=0`` retries at once: failover
  only), each time on the endpoint with the fewest outstanding requests (an endpoint that
  just failed is avoided for ``cooldown_s``). When retries run out it raises
  :class:`InferenceUnavailableError` (``retriable=True``, ``dependency="model"``: the
  model, not the request, is the problem). The layers' retry budgets: :mod:`schemas.retry`.
- Other 4xx raise :class:`InferenceRejectedError` (not retriable: the request is bad).
- Output that is not a valid listing raises :class:`~inference.output.InvalidOutputError`
  carrying the raw text (not retried: with temperature 0 it would repeat).
- Generation is idempotent from the caller's view (no server-side state), so any
  call may be retried.

HTTP connections are spread over several small httpx pools (:data:`CONNECTIONS_PER_POOL`
each), every request going to the least busy one. httpcore re-scans every connection of
a pool for every request it assigns, so one pool of 64 connections cost ~30 ms of client
CPU per request at 64 in flight (cProfile: 4.2 of 5.8 s for 128 requests); small pools
keep that scan short. See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from inference.images import PixelBudget, PreparedImage, prepare_image
from inference.output import Listing, normalise_name, parse_listing
from inference.prompt import serving_messages
from schemas.category import CategoryRegistry, CategorySchema, default_categories
from schemas.errors import ErrorKind, OpalError
from schemas.events import ModelInfo, SchemaCheck
from schemas.retry import Backoff
from schemas.settings import mask_url

NEUTRAL = {"repetition_penalty": 1.0, "frequency_penalty": 0.0}
"""Penalty values that change nothing; the client sends a penalty only when set away from these."""

CONNECTIONS_PER_POOL = 8
"""Requests one httpx pool carries at once; the client opens ``ceil(max_concurrency / 8)`` pools."""


class InferenceUnavailableError(OpalError):
    """No endpoint answered successfully within the retry budget (the model is down, overloaded
    or misconfigured: transport errors, timeouts, 401/403/404/408/429, 5xx)."""

    reason = ErrorKind.INFERENCE_FAILED
    retriable = True
    dependency = "model"


class InferenceRejectedError(OpalError):
    """An endpoint refused this request itself (400, 413, 422 and other 4xx not listed above)."""

    reason = ErrorKind.INFERENCE_REJECTED


OUTAGE_STATUSES = frozenset({401, 403, 404, 408, 429})
"""4xx answers that say the *deployment* is wrong or busy (auth, model name, rate limit), not the request."""


@dataclass(frozen=True)
class InferenceResult:
    listing: Listing
    check: SchemaCheck
    aspect_confidence: dict[str, float]
    title_confidence: float | None
    model: ModelInfo
    raw: str
    endpoint: str
    attempts: int
    queued_ms: float
    inference_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Endpoint:
    url: str
    outstanding: int = 0
    down_until: float = 0.0
    requests: int = 0
    failures: int = 0


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    per_endpoint: dict[str, int] = field(default_factory=dict)


def model_info(served_name: str) -> ModelInfo:
    """``name@version`` (how `opal serve` names models) -> ModelInfo; no ``@`` -> version 'unversioned'."""
    name, _, version = served_name.partition("@")
    return ModelInfo(name=name, version=version or "unversioned")


def _token_spans(tokens: list[dict[str, Any]]) -> list[tuple[int, int, float]]:
    """(char start, char end, logprob) of each generated token in the decoded text."""
    spans: list[tuple[int, int, float]] = []
    buf = b""
    prev_chars = 0
    for t in tokens:
        raw = bytes(t["bytes"]) if t.get("bytes") is not None else t["token"].encode()
        buf += raw
        chars = len(buf.decode("utf-8", errors="ignore"))
        spans.append((prev_chars, chars, float(t["logprob"])))
        prev_chars = chars
    return spans


def _span_confidence(spans: list[tuple[int, int, float]], start: int, end: int) -> float | None:
    lps = [lp for s, e, lp in spans if s < end and e > start and math.isfinite(lp)]
    if not lps:
        return None
    return float(math.exp(sum(lps) / len(lps)))


def confidences(raw: str, tokens: list[dict[str, Any]] | None, listing_raw_keys: Sequence[str]) -> tuple[dict[str, float], float | None]:
    """Per-aspect and title confidence: exp(mean token log-prob) over each value's characters.

    Values are located in the compact JSON the constrained decoder emits
    (``"Name":"value"``); a value not found gets no entry.
    """
    if not tokens:
        return {}, None
    spans = _token_spans(tokens)
    out: dict[str, float] = {}
    title_conf = None
    pos = raw.find('"title"')
    if pos >= 0:
        start = raw.find('"', raw.find(":", pos) + 1) + 1
        end = start + len(json.dumps(_json_str_at(raw, start - 1))) - 2
        title_conf = _span_confidence(spans, start, end)
    aspects_at = raw.find('"aspects"')
    for key in listing_raw_keys:
        needle = json.dumps(key, ensure_ascii=False)
        p = raw.find(needle, max(aspects_at, 0))
        if p < 0:
            continue
        q = raw.find('"', raw.find(":", p + len(needle)) + 1)
        if q < 0:
            continue
        value = _json_str_at(raw, q)
        end = q + len(json.dumps(value, ensure_ascii=False)) - 1
        conf = _span_confidence(spans, q + 1, end)
        if conf is not None:
            out[key] = conf
    return out, title_conf


def _json_str_at(raw: str, quote_pos: int) -> str:
    decoder = json.JSONDecoder()
    try:
        value, _ = decoder.raw_decode(raw, quote_pos)
    except json.JSONDecodeError:
        return ""
    return value if isinstance(value, str) else ""


class ListingClient:
    """See the module contract. Use as ``async with ListingClient(...) as c``."""

    def __init__(
        self,
        endpoints: Sequence[str],
        model: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 32,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.2,
        cooldown_s: float = 2.0,
        max_tokens: int = 256,
        categories: CategoryRegistry | None = None,
        max_image_bytes: int = 10 * 1024 * 1024,
        max_image_pixels: int = 40_000_000,
        logprobs: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        repetition_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
    ) -> None:
        if not endpoints:
            raise ValueError("ListingClient needs at least one endpoint")
        self._endpoints = [_Endpoint(e.rstrip("/")) for e in endpoints]
        self._model = model
        self._models_listing: dict[str, Any] | None = None  # the GET /models answer, when the model name came from it
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._sem = asyncio.Semaphore(max_concurrency)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self._backoff = Backoff(backoff_base_s, cap_s=5.0)
        self.cooldown_s = cooldown_s
        self.max_tokens = max_tokens
        self.categories = categories or default_categories()
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.logprobs = logprobs
        self.penalties = {
            k: v for k, v in (("repetition_penalty", repetition_penalty), ("frequency_penalty", frequency_penalty)) if v != NEUTRAL[k]
        }
        self.stats = ClientStats()
        self._pools: list[httpx.AsyncClient] = []
        self._pool_load: list[int] = []
        self._transport = transport
        self._max_concurrency = max_concurrency

    async def __aenter__(self) -> ListingClient:
        # headroom over CONNECTIONS_PER_POOL for the model-list GET and connections still closing after an error
        limits = httpx.Limits(max_connections=2 * CONNECTIONS_PER_POOL, max_keepalive_connections=CONNECTIONS_PER_POOL)
        timeout = httpx.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s))
        n = math.ceil(self._max_concurrency / CONNECTIONS_PER_POOL)
        self._pools = [httpx.AsyncClient(timeout=timeout, limits=limits, transport=self._transport) for _ in range(n)]
        self._pool_load = [0] * n
        return self

    async def __aexit__(self, *exc: object) -> None:
        pools, self._pools = self._pools, []
        for pool in pools:
            await pool.aclose()

    @property
    def in_flight(self) -> int:
        return sum(e.outstanding for e in self._endpoints)

    def _pick(self, avoid: str | None) -> _Endpoint:
        now = time.monotonic()
        up = [e for e in self._endpoints if e.down_until <= now and e.url != avoid] or [e for e in self._endpoints if e.down_until <= now]
        pool = up or sorted(self._endpoints, key=lambda e: e.down_until)[:1]
        return min(pool, key=lambda e: (e.outstanding, e.requests))

    async def complete_json(
        self, messages: list[dict[str, Any]], schema: dict[str, Any], name: str, temperature: float = 0.0, max_tokens: int | None = None
    ) -> tuple[dict[str, Any], str, int, float, float]:
        """One chat completion constrained to ``schema`` (retries, balancing and bounds as in the module contract).

        Returns (response JSON, endpoint, attempts, queued ms, request ms). The content may still be
        unusable (e.g. cut at ``max_tokens``); callers parse it and raise their own typed error.
        """
        t_queue = time.perf_counter()
        async with self._sem:
            queued_ms = (time.perf_counter() - t_queue) * 1000
            model = await self._served_model_with_retry()
            body: dict[str, Any] = {
                "model": model,
                "messages": messages,
                "max_tokens": max_tokens or self.max_tokens,
                "temperature": temperature,
                "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
            }
            if self.logprobs:
                body["logprobs"] = True
            body.update(self.penalties)  # only those set away from neutral: any OpenAI-compatible server accepts the rest
            t0 = time.perf_counter()
            resp, endpoint, attempts = await self._request_with_retry("POST", "/chat/completions", body)
            return resp, endpoint, attempts, queued_ms, (time.perf_counter() - t0) * 1000

    async def generate(
        self, images: Sequence[bytes | PreparedImage], category: str | CategorySchema, temperature: float = 0.0
    ) -> InferenceResult:
        """One listing for one item (see module contract); a category named without a schema gets the generic one.

        Raw bytes are checked and prepared here; a :class:`~inference.images.PreparedImage` (from a caller that
        already checked it, such as the worker's image loader) is sent as it is."""
        cat = category if isinstance(category, CategorySchema) else self.categories.resolve(category)
        prepared = [b if isinstance(b, PreparedImage) else prepare_image(b, self.max_image_bytes, self.max_image_pixels) for b in images]
        if not prepared:
            raise ValueError("generate() needs at least one image")
        resp, endpoint, attempts, queued_ms, inference_ms = await self.complete_json(
            serving_messages(cat, [p.data_url() for p in prepared]), cat.json_schema(), f"opal_{cat.category}", temperature
        )
        choice = resp["choices"][0]
        raw = choice["message"].get("content") or ""
        listing, check = parse_listing(raw, cat)
        lp = (choice.get("logprobs") or {}).get("content")
        conf_raw, title_conf = confidences(raw, lp, _raw_aspect_keys(raw))
        aspect_conf = {normalise_name(k, cat): v for k, v in conf_raw.items()}
        usage = resp.get("usage") or {}
        return InferenceResult(
            listing=listing,
            check=check,
            aspect_confidence={k: aspect_conf[k] for k in listing.aspects if k in aspect_conf},
            title_confidence=title_conf,
            model=model_info(resp.get("model", self._model or "")),
            raw=raw,
            endpoint=endpoint,
            attempts=attempts,
            queued_ms=queued_ms,
            inference_ms=inference_ms,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )

    async def served_model(self) -> str:
        """``name@version`` of the model requests go to: the configured one, else the first the server lists (retried)."""
        return await self._served_model_with_retry()

    async def probe(self) -> None:
        """Does the model generate? One one-token text completion per endpoint (after GET /models
        when the model name is not known yet), no retries or sleeping; returns when any succeeds.

        A generation, not a listing of models: an engine that lists models but cannot generate
        (dead engine core, wrong model name, auth, a rate-limiting gateway) is still down.
        Raises :class:`InferenceUnavailableError` when no endpoint succeeds. Used by circuit breakers.
        """
        assert self._pools, "use `async with ListingClient(...)`"
        errors: list[str] = []
        timeout = min(10.0, self.timeout_s)
        for ep in self._endpoints:
            shown = mask_url(ep.url)
            try:
                model = self._model
                if model is None:
                    r = await self._pools[0].get(f"{ep.url}/models", headers=self._headers, timeout=timeout)
                    r.raise_for_status()
                    model = str(r.json()["data"][0]["id"])
                body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "temperature": 0.0}
                r = await self._pools[0].post(f"{ep.url}/chat/completions", json=body, headers=self._headers, timeout=timeout)
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                errors.append(f"{shown}: {type(e).__name__}")
                continue
            if r.status_code < 400:
                ep.down_until = 0.0
                return
            errors.append(f"{shown}: HTTP {r.status_code}")
        raise InferenceUnavailableError(f"model probe failed: {'; '.join(errors)}")

    async def pixel_budget(self) -> PixelBudget | None:
        """The served model's image budget (:class:`~inference.images.PixelBudget`) from its
        ``preprocessor_config.json``, read from the folder the server reports as the model's root (``GET /models``)
        when that folder is readable here (the same host, or a shared volume); None otherwise or when the config
        declares none. Never raises for a missing or unreadable config; connection errors propagate as for
        :meth:`served_model`."""
        model = await self._served_model_with_retry()
        resp = self._models_listing
        if resp is None:  # the model name was configured: nothing listed yet
            resp, _, _ = await self._request_with_retry("GET", "/models", None)
        models = resp.get("data") if isinstance(resp, dict) else None
        root = next((m.get("root") for m in models or [] if isinstance(m, dict) and m.get("id") == model), None)
        if not isinstance(root, str) or not root:
            return None
        path = Path(root) / "preprocessor_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return PixelBudget.from_preprocessor(config, str(path)) if isinstance(config, dict) else None

    async def _served_model_with_retry(self) -> str:
        if self._model is not None:
            return self._model
        resp, _, _ = await self._request_with_retry("GET", "/models", None)
        self._model = str(resp["data"][0]["id"])
        self._models_listing = resp  # pixel_budget() reads the model's root from it: one GET at start
        return self._model

    async def _request_with_retry(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[dict[str, Any], str, int]:
        assert self._pools, "use `async with ListingClient(...)`"
        last_error = ""
        avoid: str | None = None
        for attempt in range(1, self.max_retries + 2):
            ep = self._pick(avoid)
            ep.outstanding += 1
            ep.requests += 1
            self.stats.requests += 1
            self.stats.per_endpoint[ep.url] = self.stats.per_endpoint.get(ep.url, 0) + 1
            slot = min(range(len(self._pools)), key=self._pool_load.__getitem__)
            self._pool_load[slot] += 1
            try:
                r = await self._pools[slot].request(method, f"{ep.url}{path}", json=body, headers=self._headers)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                last_error = f"{mask_url(ep.url)}: {type(e).__name__}: {mask_url(str(e))}"
            else:
                if r.status_code < 400:
                    return r.json(), ep.url, attempt
                if r.status_code not in OUTAGE_STATUSES and r.status_code < 500:
                    raise InferenceRejectedError(f"{mask_url(ep.url)}{path} answered HTTP {r.status_code}: {r.text[:500]}")
                last_error = f"{mask_url(ep.url)}: HTTP {r.status_code}: {r.text[:200]}"
            finally:
                ep.outstanding -= 1
                self._pool_load[slot] -= 1
            ep.failures += 1
            ep.down_until = time.monotonic() + self.cooldown_s
            avoid = ep.url
            if attempt <= self.max_retries:
                self.stats.retries += 1
                delay = self._backoff.delay(attempt)
                if delay > 0:
                    await asyncio.sleep(delay)
        self.stats.failures += 1
        raise InferenceUnavailableError(f"{method} {path} failed after {self.max_retries + 1} attempts; last error: {last_error}")


def _raw_aspect_keys(raw: str) -> list[str]:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return []
    aspects = doc.get("aspects") if isinstance(doc, dict) else None
    return [str(k) for k in aspects] if isinstance(aspects, dict) else []
