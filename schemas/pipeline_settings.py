"""Settings groups of the pipeline around the model: topic names, the enrichment worker, the judge agent, the
category schema source, the model registry and the embedded local stack.

Part of :class:`schemas.settings.OpalSettings` (read from ``OPAL_<GROUP>_<FIELD>``, see :mod:`schemas.settings`),
which re-exports every class here; the connection groups (Kafka, Redis, vLLM) and the secret masking stay there.
Each group is a frozen pydantic model; none of them holds a secret except :attr:`JudgeSettings.api_key`
(a ``SecretStr``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

# hide_input_in_errors: a ValidationError names the field and the rule, never the rejected input (it may be a secret
# or a dict holding one)
FROZEN = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class TopicSettings(BaseModel):
    """Topic names. Change them per environment (e.g. a prefix per tenant)."""

    model_config = FROZEN

    images_realtime: str = Field("opal.listing-images.realtime", description="New listings; served first.")
    images_backfill: str = Field("opal.listing-images.backfill", description="Catalog backfill; served when realtime is idle.")
    aspects: str = Field("opal.listing-aspects", description="AspectEvents keyed by listing id (compacted).")
    dead_letters: str = Field("opal.dead-letters", description="Every event that failed, with reason and raw bytes.")
    judge_outcomes: str = Field("opal.judge-outcomes", description="JudgeOutcome per judged AspectEvent.")
    preferences: str = Field("opal.preference-pairs", description="Low-confidence outcomes turned into DPO pairs.")
    partitions: int = Field(6, ge=1, description="Partitions of the image and aspect topics.")

    @classmethod
    def suffixed(cls, tag: str, partitions: int) -> TopicSettings:
        """The default topic names with ``-<tag>`` appended and ``partitions`` partitions: a namespace of
        its own (a test, a benchmark scenario, a tenant) on a shared cluster."""
        names = {k: f"{v}-{tag}" for k, v in cls().model_dump().items() if k != "partitions"}
        return cls(**names, partitions=partitions)


class WorkerSettings(BaseModel):
    """Limits of the enrichment worker."""

    model_config = FROZEN

    group_id: str = Field(
        "opal-enrich", description="Consumer-group prefix of the enrichment worker: it joins <prefix>.realtime and <prefix>.backfill."
    )
    generic_fallback: bool = Field(
        True,
        description="Enrich a listing whose category has no schema with the generic visual schema (the AspectEvent says so); "
        "false: dead-letter it as unknown_category.",
    )
    batch_max_size: int = Field(16, ge=1, description="Most events taken from one poll.")
    max_in_flight: int = Field(64, ge=1, description="Events being processed at once; a window full for 1 s pauses partitions.")
    backfill_share: float = Field(0.2, ge=0, le=1, description="Share of capacity backfill may use while realtime has backlog.")
    max_attempts: int = Field(
        3, ge=1, description="Tries for a failure that may be specific to one record before it is dead-lettered (schemas/retry.py)."
    )
    retry_backoff_s: float = Field(0.5, ge=0, description="First record retry delay; doubles per attempt, with jitter.")
    retry_backoff_max_s: float = Field(30.0, ge=0, description="Longest record retry delay.")
    breaker_failures: int = Field(
        5, ge=1, description="Consecutive failures of a dependency (model, image host, Redis) that open its circuit breaker."
    )
    breaker_probe_s: float = Field(1.0, gt=0, description="First probe of an open breaker's dependency; doubles per failed probe.")
    breaker_probe_max_s: float = Field(30.0, gt=0, description="Longest wait between probes of a dependency that is down.")
    image_host_max_wait_s: float = Field(
        600.0, gt=0, description="How long records wait for an image host that is down before they are dead-lettered."
    )
    dead_letter_max_value_bytes: int = Field(
        256 * 1024,
        ge=0,
        le=512 * 1024,
        description="Raw value bytes kept in a DeadLetter; longer values are cut (size and SHA-256 of the whole are kept).",
    )
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
    metrics_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the workers' /metrics server binds (0.0.0.0 in containers, for probes and Prometheus).",
    )


class JudgeSettings(BaseModel):
    """The judge agent: which generated listings it judges, and with which judge."""

    model_config = FROZEN

    confidence_below: float = Field(
        0.5, ge=0, le=1, description="Judge every listing whose lowest aspect confidence is below this (low confidence)."
    )
    sample_rate: float = Field(0.05, ge=0, le=1, description="Also judge this share of the other listings (deterministic by event id).")
    endpoint: str | None = Field(
        None, description="OpenAI-compatible endpoint (…/v1) of the MLLM judge; unset: the reference rules judge every listing."
    )
    model: str | None = Field(None, description="Judge model name at the endpoint; unset: the first model it lists.")
    api_key: SecretStr | None = Field(None, description="Bearer token for the judge endpoint (secret).")
    request_timeout_s: float = Field(60.0, gt=0, description="Per-request timeout of the judge.")
    agreement_rate: float = Field(
        0.1, ge=0, le=1, description="Share of MLLM-judged listings also judged by the rules, to measure agreement (by event id)."
    )


def _packaged_schema_locations() -> list[Path]:
    from schemas.schema_source import DEFAULT_LOCATIONS

    return list(DEFAULT_LOCATIONS)


class SchemaSettings(BaseModel):
    """Where the category schemas come from (``schemas/schema_source.py``)."""

    model_config = FROZEN

    paths: list[Path] = Field(
        default_factory=_packaged_schema_locations,
        description="Schema folders or bulk files, later overriding earlier (JSON list); default: the packaged ABO set.",
    )
    reload_s: float = Field(5.0, ge=0, description="How often workers look for changed schema files (0: only on SIGHUP).")


class ModelSettings(BaseModel):
    """The model registry (``training/registry.py``): versioned model folders and a current pointer per deployment."""

    model_config = FROZEN

    registry: Path = Field(Path(".opal/registry"), description="Registry root: models/<version>/ and deployments/<name>.json.")
    deployment: str = Field(
        "default", pattern=r"^[A-Za-z0-9_.-]+$", description="Deployment whose current version `opal serve` serves without --model."
    )


class EmbeddedSettings(BaseModel):
    """The local stack started when no external endpoint is configured."""

    model_config = FROZEN

    run_dir: Path = Field(Path(".opal/run"), description="Logs, pid and state files of embedded services.")
    broker_storage: Literal["memory", "s3"] = Field(
        "memory", description="tansu storage: memory (fast, lost on exit) or s3 on a local moto server (survives kill -9)."
    )
    start_timeout_s: float = Field(30.0, gt=0, description="How long to wait for a service to become ready.")
