"""OPAL settings: one frozen pydantic-settings model, read from ``OPAL_*`` variables.

This module holds :class:`OpalSettings`, the connection groups (Kafka, Redis, vLLM) and the
secret masking; the pipeline's groups (topics, worker, judge, schemas, models, embedded) are
in :mod:`schemas.pipeline_settings` and re-exported here.

Contract
- Every field has a default that runs the embedded single-machine set-up; production
  changes settings only, never code.
- Environment names are ``OPAL_<GROUP>_<FIELD>`` (``OPAL_KAFKA_BOOTSTRAP``,
  ``OPAL_REDIS_URL``, ``OPAL_WORKER_MAX_IN_FLIGHT``); lists and dicts are JSON
  (``OPAL_VLLM_ENDPOINTS='["http://vllm-0:8000/v1"]'``). A ``.env`` file in the
  working directory is read too; real environment variables win over it.
- Instances are immutable; derive a changed copy with ``model_copy(update=...)``.
- Secrets never show: ``repr``/``str``/``describe()``/``model_dump_json()`` and validation
  errors (inputs are hidden from them) print ``**********`` instead. Secrets are the
  ``SecretStr`` fields, every :attr:`KafkaSettings.overrides` value whose librdkafka key
  :func:`is_secret_key` (stored as ``SecretStr``), and the userinfo of URLs (a schema
  registry URL's ``user:password@`` moves into :attr:`KafkaSettings.schema_registry_auth`;
  ``describe()`` masks userinfo of any other URL). Only
  :meth:`KafkaSettings.librdkafka_config` and :meth:`RedisSettings.url_value` (and
  ``SecretStr.get_secret_value()``) reveal them, to hand to a client library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from pydantic import AfterValidator, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The pipeline's settings groups live in schemas/pipeline_settings.py; re-exported: import them from here or there.
from schemas.pipeline_settings import FROZEN
from schemas.pipeline_settings import EmbeddedSettings as EmbeddedSettings
from schemas.pipeline_settings import JudgeSettings as JudgeSettings
from schemas.pipeline_settings import ModelSettings as ModelSettings
from schemas.pipeline_settings import SchemaSettings as SchemaSettings
from schemas.pipeline_settings import TopicSettings as TopicSettings
from schemas.pipeline_settings import WorkerSettings as WorkerSettings

MASK = "**********"
_FROZEN = FROZEN  # frozen, extra fields forbidden, inputs hidden from validation errors

# librdkafka (and Confluent client) property names that carry credentials. Generous on purpose: masking a value that
# was not secret costs a less useful `opal settings` line; missing one prints a credential.
_SECRET_MARKERS = ("password", "passwd", "secret", "token", "credential", "jaas", "private", "apikey", "api.key", "auth", "bearer")
_SECRET_PREFIXES = ("sasl.oauthbearer.", "ssl.key.")
_NOT_SECRET = frozenset({"ssl.key.location"})
_SECRET_EXACT = frozenset({"ssl.key", "ssl.keystore.password", "sasl.password", "sasl.jaas.config"})


def is_secret_key(key: str) -> bool:
    """Whether a librdkafka property (or URL query parameter) name may carry a credential.

    Case-insensitive; ``_`` and ``-`` count as ``.`` (``ssl_key`` is ``ssl.key``). True for
    anything containing password/secret/token/credential/jaas/auth/..., every
    ``sasl.oauthbearer.*`` and ``ssl.key.*`` property except ``ssl.key.location``
    (a path), and ``ssl_key``.
    """
    k = re.sub(r"[_\-]", ".", key.strip().lower())
    if k in _NOT_SECRET:
        return False
    return k in _SECRET_EXACT or k.startswith(_SECRET_PREFIXES) or any(m in k for m in _SECRET_MARKERS)


def mask_url(url: str) -> str:
    """``url`` with its userinfo password (or a password-less userinfo, often a token) and
    secret-looking query values replaced by ``**********``; a string that does not parse
    as a URL but has an ``@`` in it is masked whole. Other strings come back unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK if "@" in url else url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if sep else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_key(k) for k, _ in pairs):
            query = urlencode([(k, MASK if is_secret_key(k) else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def split_userinfo(url: str) -> tuple[str, str | None]:
    """(``url`` without ``user[:password]@``, the percent-decoded ``user[:password]`` or None)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=host)), ":".join(unquote(p) for p in userinfo.split(":", 1))


def _mask_secret_overrides(overrides: dict[str, str | SecretStr]) -> dict[str, str | SecretStr]:
    return {k: SecretStr(v) if isinstance(v, str) and is_secret_key(k) else v for k, v in overrides.items()}


def _reveal(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def _shown(value: Any) -> str:
    """How ``describe()`` prints a value: secrets masked, URLs' userinfo masked, None as ''."""
    if value is None:
        return ""
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, dict):
        return str({k: MASK if is_secret_key(str(k)) or isinstance(v, SecretStr) else _shown(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return str([_shown(v) for v in value])
    return mask_url(value) if isinstance(value, str) and "://" in value else str(value)


@dataclass(frozen=True)
class Librdkafka:
    """Field metadata: the librdkafka property a :class:`KafkaSettings` field renders to
    in :meth:`KafkaSettings.librdkafka_config` (skipped while the field is None or "")."""

    key: str


class KafkaSettings(BaseModel):
    """Connection to a Kafka-protocol cluster (Apache Kafka, Confluent, MSK, tansu).

    Fields annotated with :class:`Librdkafka` are rendered by :meth:`librdkafka_config`;
    adding a librdkafka property is one annotated field, no code.
    """

    model_config = _FROZEN

    bootstrap: Annotated[str | None, Librdkafka("bootstrap.servers")] = Field(
        None,
        description="host:port[,host:port]. Unset: the embedded tansu broker is started on a free loopback port.",
    )
    security_protocol: Annotated[Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"], Librdkafka("security.protocol")] = Field(
        "PLAINTEXT", description="librdkafka security.protocol."
    )
    sasl_mechanism: Annotated[Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None, Librdkafka("sasl.mechanism")] = (
        Field(None, description="librdkafka sasl.mechanism (with a SASL_* protocol).")
    )
    sasl_username: Annotated[str | None, Librdkafka("sasl.username")] = Field(None, description="SASL user name.")
    sasl_password: Annotated[SecretStr | None, Librdkafka("sasl.password")] = Field(None, description="SASL password (secret).")
    sasl_oauthbearer_method: Annotated[Literal["default", "oidc"] | None, Librdkafka("sasl.oauthbearer.method")] = Field(
        None,
        description="sasl.oauthbearer.method for OAUTHBEARER: oidc fetches tokens from the token endpoint with the client "
        "credentials below; default uses sasl.oauthbearer.config (an override).",
    )
    sasl_oauthbearer_client_id: Annotated[str | None, Librdkafka("sasl.oauthbearer.client.id")] = Field(
        None, description="OIDC client id (sasl.oauthbearer.client.id)."
    )
    sasl_oauthbearer_client_secret: Annotated[SecretStr | None, Librdkafka("sasl.oauthbearer.client.secret")] = Field(
        None, description="OIDC client secret (sasl.oauthbearer.client.secret; secret)."
    )
    sasl_oauthbearer_token_endpoint_url: Annotated[str | None, Librdkafka("sasl.oauthbearer.token.endpoint.url")] = Field(
        None, description="OIDC token endpoint URL (sasl.oauthbearer.token.endpoint.url)."
    )
    sasl_oauthbearer_scope: Annotated[str | None, Librdkafka("sasl.oauthbearer.scope")] = Field(
        None, description="OIDC scope requested with the token (sasl.oauthbearer.scope)."
    )
    ssl_ca_location: Annotated[str | None, Librdkafka("ssl.ca.location")] = Field(None, description="CA bundle path for SSL/SASL_SSL.")
    ssl_certificate_location: Annotated[str | None, Librdkafka("ssl.certificate.location")] = Field(
        None, description="Client certificate (PEM) path for mutual TLS (ssl.certificate.location)."
    )
    ssl_certificate_pem: Annotated[str | None, Librdkafka("ssl.certificate.pem")] = Field(
        None, description="Client certificate as a PEM string, instead of a path (ssl.certificate.pem)."
    )
    ssl_key_location: Annotated[str | None, Librdkafka("ssl.key.location")] = Field(
        None, description="Client private key (PEM) path for mutual TLS (ssl.key.location)."
    )
    ssl_key_pem: Annotated[SecretStr | None, Librdkafka("ssl.key.pem")] = Field(
        None, description="Client private key as a PEM string, instead of a path (ssl.key.pem; secret)."
    )
    ssl_key_password: Annotated[SecretStr | None, Librdkafka("ssl.key.password")] = Field(
        None, description="Passphrase of the client private key (ssl.key.password; secret)."
    )
    client_id: Annotated[str, Librdkafka("client.id")] = Field("opal", description="client.id prefix sent to the brokers.")
    session_timeout_ms: int = Field(
        6000, ge=1000, description="Consumer group session timeout; 6 s keeps rebalances quick (tansu joins slowly with 45 s)."
    )
    replication_factor: int = Field(
        1, ge=1, description="Replication factor for topics created by `opal topology apply` (3 in production)."
    )
    overrides: Annotated[dict[str, str | SecretStr], AfterValidator(_mask_secret_overrides)] = Field(
        default_factory=dict,
        description='Raw librdkafka properties merged last, e.g. {"socket.keepalive.enable": "true"}. Values of '
        "credential-bearing keys (any with password, secret, token, credential or auth in the name, sasl.oauthbearer.x, "
        "ssl.key.x except ssl.key.location, sasl.jaas.config) are kept as secrets and printed masked.",
    )
    schema_registry_url: str | None = Field(
        None,
        description="Confluent-compatible schema registry. Set: events use the Confluent wire format; unset: Avro single-object "
        "encoding. A user:password@ in it moves to OPAL_KAFKA_SCHEMA_REGISTRY_AUTH (unless that is set).",
    )
    schema_registry_auth: SecretStr | None = Field(None, description="user:password for the schema registry (secret).")

    @model_validator(mode="before")
    @classmethod
    def _registry_userinfo_is_auth(cls, data: Any) -> Any:
        """``https://user:pw@registry`` -> url ``https://registry``, auth ``user:pw`` (an explicit auth wins)."""
        if isinstance(data, dict) and isinstance(data.get("schema_registry_url"), str):
            url, userinfo = split_userinfo(data["schema_registry_url"])
            if userinfo is not None:
                data = {**data, "schema_registry_url": url}
                if data.get("schema_registry_auth") is None:
                    data["schema_registry_auth"] = SecretStr(userinfo)
        return data

    @model_validator(mode="after")
    def _oidc_is_complete(self) -> KafkaSettings:
        if self.sasl_oauthbearer_method == "oidc":
            missing = [
                f"OPAL_KAFKA_{name.upper()}"
                for name in ("sasl_oauthbearer_client_id", "sasl_oauthbearer_client_secret", "sasl_oauthbearer_token_endpoint_url")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"OPAL_KAFKA_SASL_OAUTHBEARER_METHOD=oidc needs {', '.join(missing)}")
        return self

    def librdkafka_config(self, **extra: Any) -> dict[str, Any]:
        """Return a librdkafka dict for confluent-kafka, secrets revealed (the one place that does).

        Every field annotated with :class:`Librdkafka` and not None/"" is rendered under its
        property name; then ``extra`` (per-client settings such as ``group.id``), then
        :attr:`overrides`, so an operator override always wins. Raises ``ValueError``
        when :attr:`bootstrap` is unset (resolve the embedded broker first).
        """
        if not self.bootstrap:
            raise ValueError("kafka.bootstrap is not set (start the embedded stack or set OPAL_KAFKA_BOOTSTRAP)")
        conf: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            prop = next((m.key for m in info.metadata if isinstance(m, Librdkafka)), None)
            value = getattr(self, name)
            if prop is not None and value is not None and value != "":
                conf[prop] = _reveal(value)
        conf.update(extra)
        conf.update({k: _reveal(v) for k, v in self.overrides.items()})
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

    def url_display(self) -> str:
        """The URL with its password masked (:func:`mask_url`), for logs and consoles; "" if unset."""
        return "" if self.url is None else mask_url(self.url.get_secret_value())


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
    max_retries: int = Field(
        3, ge=0, description="Retries of standalone clients (CLI passes) on connection errors and 5xx; workers fail over only."
    )
    repetition_penalty: float = Field(
        1.0, gt=0, le=2.0, description="vLLM repetition_penalty on every request (1.0 = off); >1 stops small models looping."
    )
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI frequency_penalty on every request (0 = off).")
    # flags for the server process (`opal serve`); CPU defaults, GPU values in deploy/
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the server runs; selects the flag set.")
    dtype: str = Field("bfloat16", description="--dtype.")
    max_model_len: int = Field(2048, ge=256, description="--max-model-len.")
    max_num_seqs: int = Field(32, ge=1, description="--max-num-seqs.")
    tensor_parallel_size: int = Field(1, ge=1, description="--tensor-parallel-size (GPU).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="--gpu-memory-utilization (GPU).")
    cpu_kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE in GiB (CPU).")
    images_per_prompt: int = Field(1, ge=1, description="--limit-mm-per-prompt image count.")
    max_pixels: int | None = Field(
        None,
        ge=784,
        description="Pixel budget of the served model's image processor (its max_pixels): workers resize larger photos to "
        "exactly what the processor would, so the server decodes small images. Unset: read from the preprocessor_config.json "
        "of the model folder the server reports, when readable here; else photos are only capped at 1024 px a side.",
    )
    compile_cache_dir: Path = Field(
        Path(".opal/compile-cache"),
        description="Compiled kernels (vLLM, TorchInductor, Triton caches), one folder per served model, kept across restarts: "
        "a restart loads them instead of compiling (first request with logprobs on CPU: 11.6 s fresh, 1.4 s reused). "
        "Put it on a persistent volume in production.",
    )
    cpu_colocate_engine: bool = Field(
        True,
        description="CPU: pin vLLM's engine-core process to the model worker's cores so its busy-wait leaves the API server's cores free.",
    )


class OpalSettings(BaseSettings):
    """All OPAL settings. See the module docstring for the environment mapping."""

    model_config = SettingsConfigDict(
        env_prefix="OPAL_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        env_file=".env",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    schemas: SchemaSettings = Field(default_factory=SchemaSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)

    @field_validator("vllm")
    @classmethod
    def _endpoints_are_urls(cls, v: VllmSettings) -> VllmSettings:
        for e in v.endpoints:
            if not e.startswith(("http://", "https://")):
                raise ValueError(f"vllm endpoint {mask_url(e)!r} must start with http:// or https://")
        return v

    @field_validator("judge")
    @classmethod
    def _judge_endpoint_is_a_url(cls, v: JudgeSettings) -> JudgeSettings:
        if v.endpoint and not v.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"judge endpoint {mask_url(v.endpoint)!r} must start with http:// or https://")
        if v.endpoint and split_userinfo(v.endpoint)[1] is not None:  # it would show in every log and table
            raise ValueError(f"judge endpoint {mask_url(v.endpoint)!r} holds credentials: put the token in OPAL_JUDGE_API_KEY")
        return v

    def describe(self) -> list[tuple[str, str, str]]:
        """(env name, value, description) for every field; nothing secret in any of them.

        ``SecretStr`` values print as ``**********``, so do :attr:`KafkaSettings.overrides`
        values whose key :func:`is_secret_key` (the key shows) even when a copy made with
        ``model_copy(update=...)`` holds them as plain strings, and the userinfo and
        secret-looking query values of every URL (:func:`mask_url`). None prints as "".
        """
        rows: list[tuple[str, str, str]] = []
        for group_name, _group_field in type(self).model_fields.items():
            group = getattr(self, group_name)
            for name, f in type(group).model_fields.items():
                rows.append((f"OPAL_{group_name.upper()}_{name.upper()}", _shown(getattr(group, name)), f.description or ""))
        return rows
