"""Prometheus metrics of the stream workers (one registry per worker instance)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


@dataclass
class _Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics; returns the bound port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else float(v)


@dataclass
class WorkerMetrics(_Metrics):
    """The enrichment worker."""

    def __post_init__(self) -> None:
        r = self.registry
        self.consumed = Counter("opal_enrich_consumed_total", "Records consumed", ["lane"], registry=r)
        self.produced = Counter("opal_enrich_aspect_events_total", "AspectEvents produced and acknowledged", registry=r)
        self.dead_lettered = Counter("opal_enrich_dead_letters_total", "DeadLetters produced and acknowledged", ["reason"], registry=r)
        self.retries = Counter("opal_enrich_retries_total", "Retried attempts of retriable failures", ["reason"], registry=r)
        self.batch_size = Histogram(
            "opal_enrich_batch_size", "Records per consume() call", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.in_flight = Gauge("opal_enrich_in_flight", "Records being processed", ["lane"], registry=r)
        self.model_requests = Counter("opal_enrich_model_requests_total", "Requests sent to the model", registry=r)
        self.model_latency = Histogram("opal_enrich_model_latency_seconds", "Model request latency", buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("opal_enrich_cache_hits_total", "Results reused from the image cache", registry=r)
        self.cache_misses = Counter("opal_enrich_cache_misses_total", "Cache look-ups that found nothing", registry=r)
        self.lag = Gauge("opal_enrich_lag", "High-water mark minus position, from fetched messages", ["topic", "partition"], registry=r)
        self.paused = Gauge("opal_enrich_paused_partitions", "Partitions paused for backpressure or lane priority", registry=r)


@dataclass
class IndexerMetrics(_Metrics):
    """The search indexer."""

    def __post_init__(self) -> None:
        r = self.registry
        self.applied = Counter(
            "opal_index_records_total", "Records applied to the index", ["outcome"], registry=r
        )  # outcome: indexed, deleted, skipped (not newer than the index: replays)
        self.dead_lettered = Counter(
            "opal_index_dead_letters_total", "DeadLetters produced (a batch fails unless all are acknowledged)", ["reason"], registry=r
        )
        self.batch_seconds = Histogram("opal_index_batch_seconds", "Time to apply and store one batch", buckets=LATENCY_BUCKETS, registry=r)
        self.lag = Gauge(
            "opal_index_lag", "High-water mark minus the next offset to index, from fetched messages", ["partition"], registry=r
        )
