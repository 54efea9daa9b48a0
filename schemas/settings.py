"""OPAL settings: one frozen pydantic-settings model, read from ``OPAL_*`` variables.

Contract
- Every field has a default that runs the embedded single-machine set-up; production
  changes settings only, never code.
- Environment names are ``OPAL_<GROUP>_<FIELD>`` (``OPAL_KAFKA_BOOTSTRAP``,
  ``OPAL_REDIS_URL``, ``OPAL_WORKER_MAX_IN_FLIGHT``); lists and dicts are JSON
  (``OPAL_VLLM_ENDPOINTS='["http://vllm-0:8000/v1"]'``). A ``.env`` file in the
  working directory is read too; real environment variables win over it.
- Instances are immutable; derive a changed copy with ``model_copy(update=...)``.
- Secrets are ``SecretStr``: ``repr``/``str``/``describe()`` show ``**********``. Only
  :meth:`KafkaSettings.librdkafka_config` and :meth:`RedisSettings.url_value` reveal
  them, to hand to a client library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(BaseModel):
    """Connection to a Kafka-protocol cluster (Apache Kafka, Confluent, MSK, tansu)."""

    model_config = _FROZEN

    bootstrap: str | None = Field(
        None,
        description="host:port[,host:port]. Unset: the embedded tansu broker is started on a free loopback port.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="librdkafka security.protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = Field(
        None, description="librdkafka sasl.mechanism (with a SASL_* protocol)."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (secret).")
    ssl_ca_location: str | None = Field(None, description="CA bundle path for SSL/SASL_SSL.")
    client_id: str = Field("opal", description="client.id prefix sent to the brokers.")
    session_timeout_ms: int = Field(
        6000, ge=1000, description="Consumer group session timeout; 6 s keeps rebalances quick (tansu joins slowly with 45 s)."
    )
    replication_factor: int = Field(
        1, ge=1, description="Replication factor for topics created by `opal topology apply` (3 in production)."
    )
    overrides: dict[str, str] = Field(
        default_factory=dict,
        description='Raw librdkafka properties merged last, e.g. {"socket.keepalive.enable": "true"}.',
    )
    schema_registry_url: str | None = Field(
        None,
        description="Confluent-compatible schema registry. Set: events use the Confluent wire format; unset: Avro single-object encoding.",
    )
    schema_registry_auth: SecretStr | None = Field(None, description="user:password for the schema registry (secret).")

    def librdkafka_config(self, **extra: Any) -> dict[str, Any]:
        """Return a librdkafka dict for confluent-kafka, secrets revealed.

        ``extra`` (per-client settings such as ``group.id``) is applied before
        :attr:`overrides`, so an operator override always wins. Raises ``ValueError``
        when :attr:`bootstrap` is unset (resolve the embedded broker first).
        """
        if not self.bootstrap:
            raise ValueError("kafka.bootstrap is not set (start the embedded stack or set OPAL_KAFKA_BOOTSTRAP)")
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "security.protocol": self.security_protocol,
            "client.id": self.client_id,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username is not None:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = self.ssl_ca_location
        conf.update(extra)
        conf.update(self.overrides)
        return conf


class RedisSettings(BaseModel):
    """Redis (or Valkey) for the image-result cache and the judge's state."""

    model_config = _FROZEN

    url: SecretStr | None = Field(
        None,
        description="redis://[:password@]host:port/db (secret: may hold a password). Unset: an embedded valkey-server is started.",
    )
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="TTL of cached results keyed by image hash and model version.")
    key_prefix: str = Field("opal:", description="Prefix for every key OPAL writes.")

    def url_value(self) -> str:
        """The URL with its secret revealed, for redis-py. Raises if unset."""
        if self.url is None:
            raise ValueError("redis.url is not set (start the embedded stack or set OPAL_REDIS_URL)")
        return self.url.get_secret_value()


class VllmSettings(BaseModel):
    """OpenAI-compatible vLLM endpoints and the flags `opal serve` renders."""

    model_config = _FROZEN

    python: Path | None = Field(
        None,
        description="Model-side interpreter for `opal serve` / `opal model`; unset: this one if it has vLLM, else .venv-model.",
    )
    endpoints: list[str] = Field(
        default_factory=list,
        description="Base URLs ending in /v1, balanced by least outstanding requests. Empty: the demo starts a local CPU server.",
    )
    model: str | None = Field(None, description="Served model name; unset: the first model the server lists.")
    api_key: SecretStr | None = Field(None, description="Bearer token for the endpoints (secret).")
    request_timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_concurrency: int = Field(
        64,
        ge=1,
        description="In-flight requests per client across endpoints; keep it above the servers' max-num-seqs so every engine step "
        "finds the next requests queued (bench/bench_serving.py runs at 2x).",
    )
    max_retries: int = Field(3, ge=0, description="Retries on connection errors and 5xx, with exponential backoff.")
    # flags for the server process (`opal serve`); CPU defaults, GPU values in deploy/
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the server runs; selects the flag set.")
    dtype: str = Field("bfloat16", description="--dtype.")
    max_model_len: int = Field(2048, ge=256, description="--max-model-len.")
    max_num_seqs: int = Field(32, ge=1, description="--max-num-seqs.")
    tensor_parallel_size: int = Field(1, ge=1, description="--tensor-parallel-size (GPU).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="--gpu-memory-utilization (GPU).")
    cpu_kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE in GiB (CPU).")
    images_per_prompt: int = Field(1, ge=1, description="--limit-mm-per-prompt image count.")
    cpu_colocate_engine: bool = Field(
        True,
        description="CPU: pin vLLM's engine-core process to the model worker's cores so its busy-wait leaves the API server's cores free.",
    )


class TopicSettings(BaseModel):
    """Topic names. Change them per environment (e.g. a prefix per tenant)."""

    model_config = _FROZEN

    images_realtime: str = Field("opal.listing-images.realtime", description="New listings; served first.")
    images_backfill: str = Field("opal.listing-images.backfill", description="Catalog backfill; served when realtime is idle.")
    aspects: str = Field("opal.listing-aspects", description="AspectEvents keyed by listing id (compacted).")
    dead_letters: str = Field("opal.dead-letters", description="Every event that failed, with reason and raw bytes.")
    judge_outcomes: str = Field("opal.judge-outcomes", description="JudgeOutcome per judged AspectEvent.")
    preferences: str = Field("opal.preference-pairs", description="Low-confidence outcomes turned into DPO pairs.")
    partitions: int = Field(6, ge=1, description="Partitions of the image and aspect topics.")


class WorkerSettings(BaseModel):
    """Limits of the enrichment worker."""

    model_config = _FROZEN

    group_id: str = Field("opal-enrich", description="Consumer group of the enrichment worker.")
    batch_max_size: int = Field(16, ge=1, description="Most events taken from one poll.")
    batch_max_wait_ms: int = Field(50, ge=0, description="Longest wait to fill a batch.")
    max_in_flight: int = Field(64, ge=1, description="Events being processed at once; above it partitions are paused.")
    backfill_share: float = Field(0.2, ge=0, le=1, description="Share of capacity backfill may use while realtime has backlog.")
    max_attempts: int = Field(3, ge=1, description="Tries for a retriable failure before it is dead-lettered.")
    retry_backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles per attempt (capped at 30 s).")
    max_model_latency_s: float = Field(
        30.0, ge=0, description="Median model latency above which the in-flight window shrinks to a quarter; 0 disables."
    )
    image_max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest image download/file accepted.")
    image_max_pixels: int = Field(40_000_000, ge=1024, description="Largest decoded image (width*height); guards decompression bombs.")
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="Whole-download timeout for http(s) images.")
    allowed_file_root: Path | None = Field(None, description="file:// images must lie under this folder; unset: file:// refused.")
    allowed_http_hosts: list[str] = Field(
        default_factory=list, description="Host names http(s) images may come from; empty: http(s) refused."
    )
    allow_private_addresses: bool = Field(
        False, description="Let allow-listed image hosts resolve to private/loopback addresses (tests, on-prem CDNs)."
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one.")


class JudgeSettings(BaseModel):
    """The judge agent: which generated listings it judges."""

    model_config = _FROZEN

    confidence_below: float = Field(
        0.5, ge=0, le=1, description="Judge every listing whose lowest aspect confidence is below this (low confidence)."
    )
    sample_rate: float = Field(0.05, ge=0, le=1, description="Also judge this share of the other listings (deterministic by event id).")


class EmbeddedSettings(BaseModel):
    """The local stack started when no external endpoint is configured."""

    model_config = _FROZEN

    run_dir: Path = Field(Path(".opal/run"), description="Logs, pid and state files of embedded services.")
    broker_storage: Literal["memory", "s3"] = Field(
        "memory", description="tansu storage: memory (fast, lost on exit) or s3 on a local moto server (survives kill -9)."
    )
    start_timeout_s: float = Field(30.0, gt=0, description="How long to wait for a service to become ready.")


class OpalSettings(BaseSettings):
    """All OPAL settings. See the module docstring for the environment mapping."""

    model_config = SettingsConfigDict(
        env_prefix="OPAL_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        env_file=".env",
        extra="ignore",
        frozen=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)

    @field_validator("vllm")
    @classmethod
    def _endpoints_are_urls(cls, v: VllmSettings) -> VllmSettings:
        for e in v.endpoints:
            if not e.startswith(("http://", "https://")):
                raise ValueError(f"vllm endpoint {e!r} must start with http:// or https://")
        return v

    def describe(self) -> list[tuple[str, str, str]]:
        """(env name, value, description) for every field, secrets masked."""
        rows: list[tuple[str, str, str]] = []
        for group_name, _group_field in type(self).model_fields.items():
            group = getattr(self, group_name)
            for name, f in type(group).model_fields.items():
                value = getattr(group, name)
                shown = "**********" if isinstance(value, SecretStr) else ("" if value is None else str(value))
                rows.append((f"OPAL_{group_name.upper()}_{name.upper()}", shown, f.description or ""))
        return rows
