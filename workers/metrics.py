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
        self.paused = Gauge("opal_enrich_paused_partitions", "Partitions paused for backpressure, lane priority or an outage", registry=r)
        self.commit_lag = Gauge(
            "opal_enrich_commit_lag",
            "High-water mark minus the offset the group resumes from (next offset to store); grows while an offset is stuck",
            ["topic", "partition"],
            registry=r,
        )
        self.oldest_in_flight = Gauge(
            "opal_enrich_oldest_in_flight_seconds", "Age of the oldest record consumed but not yet output (0 when none)", registry=r
        )
        self.cache_errors = Counter(
            "opal_enrich_cache_errors_total", "Redis cache operations that failed (degraded to a miss)", ["op"], registry=r
        )
        self.schema_reloads = Counter("opal_enrich_schema_reloads_total", "Schema-set reloads", ["result"], registry=r)
        self.schema_categories = Gauge("opal_enrich_schema_categories", "Category schemas in use", registry=r)
        self.coalesced = Counter(
            "opal_enrich_coalesced_total", "Cache misses that shared another record's in-flight model request", registry=r
        )
        self.breaker_open = Gauge(
            "opal_enrich_breaker_open", "1 while the dependency's circuit breaker is open", ["dependency"], registry=r
        )
        self.breaker_trips = Counter("opal_enrich_breaker_trips_total", "Times a dependency's breaker opened", ["dependency"], registry=r)
        self.probes = Counter("opal_enrich_probes_total", "Probes of dependencies that are down", ["dependency", "result"], registry=r)
        self.dependency_waits = Counter(
            "opal_enrich_dependency_waits_total",
            "Times a record waited for a dependency instead of spending an attempt",
            ["dependency"],
            registry=r,
        )


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
        self.breaker_open = Gauge("opal_index_redis_breaker_open", "1 while Redis is down and partitions are paused", registry=r)
        self.waits = Counter("opal_index_retry_waits_total", "Waits before retrying a Redis (or registry) operation", registry=r)
        self.lag = Gauge(
            "opal_index_lag", "High-water mark minus the next offset to index, from fetched messages", ["partition"], registry=r
        )


@dataclass
class JudgeMetrics(_Metrics):
    """The judge agent: which judge decided, how long it took, how often the MLLM and the rules agree."""

    def __post_init__(self) -> None:
        r = self.registry
        self.verdicts = Counter(
            "opal_judge_verdicts_total", "JudgeOutcomes by judge (mllm, rules) and verdict", ["judge", "verdict"], registry=r
        )
        self.latency = Histogram(
            "opal_judge_latency_seconds", "Time to judge one listing (image load included)", ["judge"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.fallbacks = Counter(
            "opal_judge_fallbacks_total", "Listings the rules judged instead of the MLLM, by reason", ["reason"], registry=r
        )
        self.agreement = Counter(
            "opal_judge_agreement_total", "Sampled MLLM verdicts compared with the rules' (agree, disagree)", ["result"], registry=r
        )
