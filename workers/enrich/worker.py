"""The enrich worker's app loop: consume by lane, flow control, hand poll batches to the pipeline.

The loop owns no record: :class:`~workers.enrich.lanes.LaneConsumers` owns assignment, pausing, lag and
offsets; :class:`~workers.enrich.pipeline.Pipeline` owns what happens to a record;
:class:`~workers.dependency_gate.DependencyGate` owns breakers, probes and waits;
:class:`~workers.enrich.output.Outputs` owns the producer and its delivery reports. Each loop turn:
act on delivery reports, refresh lag, start due probes, pause or resume partitions
(:mod:`workers.flow_control` decides), take up to the lanes' quotas (realtime first) and start the
batch. Lifecycle: :meth:`EnrichWorker.run` returns after a clean shutdown (see :meth:`EnrichWorker.shutdown`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from confluent_kafka import Consumer, Producer

from inference.client import InferenceUnavailableError, ListingClient, model_info
from inference.images import PixelBudget
from schemas.category import CategoryRegistry
from schemas.events import AspectEvent, DeadLetter, Lane, ListingImageEvent, ModelInfo
from schemas.retry import Backoff
from schemas.schema_source import SchemaWatcher
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from workers import flow_control as flow
from workers.dependency_gate import DependencyGate
from workers.enrich.lanes import LaneConsumers
from workers.enrich.output import FatalWorkerError, Outputs
from workers.enrich.pipeline import Pipeline, RecordPolicy
from workers.enrich.record import Record
from workers.enrich.stages import MODEL, Decode, Emit, Fetch, Generate, LookUp, ReadLocal, Stage
from workers.image_loader import ImageLoader
from workers.metrics import WorkerMetrics
from workers.result_cache import ResultCache

log = logging.getLogger(__name__)

DECODE_THREADS = 2
"""Images decoded at once on cache misses (each full decode of a large photo holds ~100 MB while it runs)."""
IDLE_BLOCK_S = 0.005
"""Longest wait for a record on the backfill consumer when nothing is in flight (see :meth:`EnrichWorker.run`)."""


@dataclass
class EnrichClients:
    """What the worker talks to; built from settings by :func:`workers.enrich.build_worker`, or fakes in tests."""

    consumers: dict[Lane, Consumer]
    producer: Producer
    model: ListingClient
    loader: ImageLoader
    cache: ResultCache | None
    schemas: CategoryRegistry | SchemaWatcher  # a fixed set, or a watcher that swaps in changed files between batches
    listing_codec: EventCodec[ListingImageEvent]
    aspect_codec: EventCodec[AspectEvent]
    dead_letter_codec: EventCodec[DeadLetter]


class EnrichWorker:
    """One worker process (see the package docstring for the delivery contract)."""

    def __init__(self, settings: OpalSettings, clients: EnrichClients, metrics: WorkerMetrics | None = None) -> None:
        self.s = settings
        self.w = settings.worker
        self.clients = clients
        self.metrics = m = metrics or WorkerMetrics()
        topics = {Lane.REALTIME: settings.topics.images_realtime, Lane.BACKFILL: settings.topics.images_backfill}
        self.lanes = LaneConsumers(clients.consumers, topics, m, settings.kafka.session_timeout_ms / 1000)
        self.outputs = Outputs(
            clients.producer,
            settings.topics.aspects,
            settings.topics.dead_letters,
            clients.aspect_codec,
            clients.dead_letter_codec,
            m,
            on_acked=self.lanes.release,
            after_round=self.lanes.store,
            dead_letter_max_value_bytes=self.w.dead_letter_max_value_bytes,
        )
        self.gate = DependencyGate(
            self.w.breaker_failures,
            Backoff(self.w.breaker_probe_s, self.w.breaker_probe_max_s),
            Backoff(self.w.retry_backoff_s, self.w.retry_backoff_max_s),
            prober=self._probe,
            on_open=lambda name, _e: (m.breaker_trips.labels(name).inc(), m.breaker_open.labels(name).set(1)),
            on_close=lambda name, _s: m.breaker_open.labels(name).set(0),
            on_probe=lambda name, up: m.probes.labels(name, "up" if up else "down").inc(),
        )
        self.stopping = asyncio.Event()
        self.policy = RecordPolicy(self.w, self.gate, self.outputs, m, self.stopping)
        self.model = ModelInfo(name="", version="")
        self.latencies: deque[float] = deque(maxlen=50)
        self.decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="opal-decode")
        self.pipeline: Pipeline | None = None  # built once the served model is known (the cache key names it)
        self._full_since: float | None = None  # since when the window has been full (flow control)
        self._capped_since: float | None = None  # since when backfill has held its cap
        self._last_rt = 0.0  # when the realtime lane last delivered records
        if clients.cache is not None:
            clients.cache.on_error = lambda op: m.cache_errors.labels(op).inc()

    # -- the schema set --------------------------------------------------------------------
    @property
    def categories(self) -> CategoryRegistry:
        """The schema set in use now: a record is checked against the set current when its stage runs."""
        s = self.clients.schemas
        return s.registry if isinstance(s, SchemaWatcher) else s

    def _poll_schemas(self) -> None:
        s = self.clients.schemas
        if not isinstance(s, SchemaWatcher):
            return
        failures = s.failures
        if s.poll():
            self.metrics.schema_reloads.labels("ok").inc()
            self.metrics.schema_categories.set(len(s.registry))
        elif s.failures > failures:
            self.metrics.schema_reloads.labels("refused").inc()

    def stages(self, model_version: str) -> list[Stage]:
        """The pipeline's stages in order (a new stage goes here)."""
        c, w, per_prompt = self.clients, self.w, self.s.vllm.images_per_prompt
        categories = lambda: self.categories  # noqa: E731 - read at each stage run (hot reload)
        return [
            Decode(c.listing_codec, categories, w.generic_fallback),
            ReadLocal(c.loader, per_prompt, self.gate),
            Fetch(c.loader, per_prompt, self.gate),
            LookUp(c.cache, categories, w.generic_fallback, model_version, self.metrics),
            Generate(c.model, c.loader, self.decoder, c.cache, self.gate, model_version, self.metrics, self.latencies),
            Emit(self.outputs),
        ]

    async def _probe(self, name: str) -> None:
        if name == MODEL:
            await self.clients.model.probe()
        else:
            await self.clients.loader.probe(name)

    # -- the loop --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, idle_exit_s: float | None = None, grace_s: float = 30.0) -> None:
        """Process until ``stop`` is set (or nothing arrived for ``idle_exit_s``), then shut down cleanly.

        Idle time starts only when both lanes are assigned and a session timeout has passed since the
        last rebalance, so a batch run does not exit while a dead member's partitions are about to move
        to it (``--idle-exit`` means: the group has nothing left for this worker).
        """
        served = await self._served_model(stop)
        if served is None:
            return  # stopped before the model ever answered: nothing consumed
        self.model = model_info(served)
        self.pipeline = pipeline = Pipeline(self.stages(f"{self.model.name}@{self.model.version}"), self.policy, self.stopping)
        await self._learn_pixel_budget()
        self.metrics.schema_categories.set(len(self.categories))
        lanes = self.lanes
        lanes.subscribe()
        last_activity = time.monotonic()
        try:
            while not stop.is_set():
                fatal = pipeline.fatal or self.outputs.fatal
                if fatal is not None:
                    raise FatalWorkerError(str(fatal)) from fatal
                self.outputs.poll(0)
                lanes.update_lag()
                self.gate.start_probes()
                window, cap = self._flow_control()
                self._poll_schemas()
                got = self._take(window, cap)
                if got:
                    self.metrics.batch_size.observe(len(got))
                    pipeline.start_batch(got)
                if lanes.records:
                    last_activity = time.monotonic()
                    await asyncio.sleep(0.002)
                else:
                    if not lanes.settled():
                        last_activity = time.monotonic()
                    elif idle_exit_s is not None and time.monotonic() - last_activity > idle_exit_s:
                        break
                    await asyncio.sleep(0)  # always yield: signal handlers and tasks run on this loop
        finally:
            await self.shutdown(grace_s)

    def _take(self, window: int, cap: int) -> list[Record]:
        """Realtime first (it may take the whole window), then backfill up to its cap. Paused lanes are still
        polled (callbacks, liveness); the backfill poll blocks a few ms only when nothing else is held, since a
        longer block holds back realtime records that arrive meanwhile."""
        lanes, batch_max = self.lanes, self.w.batch_max_size
        got: list[Record] = []
        q = flow.quotas(window, lanes.held, cap, batch_max)
        if q.realtime > 0 or lanes.lane_paused(Lane.REALTIME):
            got = lanes.consume(Lane.REALTIME, max(1, q.realtime), 0)
            if got:
                self._last_rt = time.monotonic()
        q = flow.quotas(window, lanes.held, cap, batch_max)
        if q.backfill > 0 or lanes.lane_paused(Lane.BACKFILL):
            got += lanes.consume(Lane.BACKFILL, max(1, q.backfill), 0 if (lanes.records or got) else IDLE_BLOCK_S)
        return got

    async def _served_model(self, stop: asyncio.Event) -> str | None:
        """The served model's name, waiting (probing with the breaker backoff) while the model is down."""
        backoff = Backoff(self.w.breaker_probe_s, self.w.breaker_probe_max_s)
        tries = 0
        while True:
            try:
                return await self.clients.model.served_model()
            except InferenceUnavailableError as e:
                tries += 1
                log.warning("model not answering at start (%s); retrying (%d)", e, tries)
            try:
                await asyncio.wait_for(stop.wait(), backoff.delay(tries))
                return None
            except TimeoutError:
                continue

    async def _learn_pixel_budget(self) -> None:
        """Set the loader's image budget: ``vllm.max_pixels`` when configured, else the served model's processor
        config when its folder is readable here, else none (photos capped at 1024 px a side). Logged either way."""
        loader = self.clients.loader
        if self.s.vllm.max_pixels is not None:
            loader.budget = PixelBudget(self.s.vllm.max_pixels, source="OPAL_VLLM_MAX_PIXELS")
        else:
            try:
                loader.budget = await self.clients.model.pixel_budget()
            except Exception as e:  # a gateway without /models, an odd answer: the budget is only an optimisation
                log.warning("could not read the served model's image budget (%s: %s); photos capped at 1024 px a side", type(e).__name__, e)
                return
        b = loader.budget
        if b is None:
            log.info("served model's image budget unknown (set OPAL_VLLM_MAX_PIXELS); photos capped at 1024 px a side")
        else:
            log.info(
                "photos resized on the worker to the served model's budget: %d px, sides in multiples of %d (%s)",
                b.max_pixels,
                b.factor,
                b.source,
            )

    async def shutdown(self, grace_s: float) -> None:
        """Finish joining (tansu), let records in flight finish for up to ``grace_s``, flush their outputs, commit
        what is stored and leave the groups. Records still without an output are not stored: replayed."""
        self.stopping.set()  # records waiting for a dependency give up their turn (not stored: replayed)
        await self.lanes.finish_joining(self.s.kafka.session_timeout_ms / 1000 + 10)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:  # a batch ending meanwhile hands records to tasks of their own: wait for those too
            tasks = {r.task for r in self.lanes.records.values() if r.task is not None and not r.task.done()}
            if not tasks:
                break
            await asyncio.wait(tasks, timeout=deadline - time.monotonic())
        self.outputs.drain(grace_s)
        self.gate.stop_probes()
        self.lanes.close()
        self.decoder.shutdown(wait=False, cancel_futures=True)
        log.info("worker stopped; %d outputs, %d records handed back", self.outputs.acknowledged, len(self.lanes.records))

    # -- flow control (decisions in workers/flow_control.py) --------------------------------
    def _window(self) -> int:
        return flow.window(self.latencies, self.w.max_in_flight, self.w.max_model_latency_s)

    def _backfill_cap(self, window: int) -> int:
        lanes = self.lanes
        rt = [tp for tp in lanes.assigned if lanes.lane_of.get(tp[0]) is Lane.REALTIME]
        backlog = flow.realtime_backlog(time.monotonic() - self._last_rt, lanes.held[Lane.REALTIME], (lanes.lag.get(tp) for tp in rt))
        return flow.backfill_cap(window, self.w.backfill_share, Lane.REALTIME in lanes.joined, backlog)

    def _flow_control(self) -> tuple[int, int]:
        """Pause and resume partitions as :func:`workers.flow_control.partitions_to_pause` decides; the window and
        backfill's cap now."""
        lanes, window, now = self.lanes, self._window(), time.monotonic()
        held, bf, cap = len(lanes.records), lanes.held[Lane.BACKFILL], self._backfill_cap(window)
        self._full_since = (self._full_since or now) if held >= window else None
        self._capped_since = (self._capped_since or now) if bf >= cap else None
        want = flow.partitions_to_pause(
            lanes.assigned,
            lanes.lane_of,
            lanes.paused,
            held=held,
            window_size=window,
            backfill_in_flight=bf,
            cap=cap,
            model_down=self.gate.is_open(MODEL),
            full_for_s=0.0 if self._full_since is None else now - self._full_since,
            capped_for_s=0.0 if self._capped_since is None else now - self._capped_since,
        )
        if want != lanes.paused:
            lanes.pause_only(want)
        return window, cap
