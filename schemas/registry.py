"""OPAL's access to a Confluent Schema Registry, on confluent-kafka's kept clients.

:class:`SchemaRegistryClient` wraps ``confluent_kafka.schema_registry.SchemaRegistryClient``
(blocking) and ``AsyncSchemaRegistryClient`` (asyncio) behind the three calls the
Confluent framing needs (:mod:`schemas.serde`): :meth:`~SchemaRegistryClient.register`,
:meth:`~SchemaRegistryClient.schema` and :meth:`~SchemaRegistryClient.schema_async`.

- ``confluent_kafka`` is imported when a client is first *used*, never at import time:
  ``schemas/`` is shared with the model environment, which has no Kafka client, and only
  the stream side (with ``OPAL_KAFKA_SCHEMA_REGISTRY_URL`` set) ever gets here.
- Errors: a missing schema id (HTTP 404) raises :class:`~schemas.errors.UnknownSchemaError`
  (not retriable: a worker dead-letters the record); anything else the registry or the
  network does (5xx, a refusal, a timeout, connection refused) raises
  :class:`~schemas.errors.SchemaRegistryError` (retriable: a worker waits the registry out).
- No retries of its own by default (``max_retries=0``): the caller's retry policy
  (:mod:`schemas.retry`, the dependency gate) decides when to try again.
- Basic auth: ``auth`` (``user:password``), or the ``user:password@`` of ``url``, which is
  taken off the URL so that no message, attribute or repr shows it.
- The asyncio client belongs to one event loop (its HTTP connection pool does): a call
  from another loop makes a new one for that loop.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from schemas.errors import OpalError, SchemaRegistryError, UnknownSchemaError
from schemas.settings import split_userinfo

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import AsyncSchemaRegistryClient, Schema
    from confluent_kafka.schema_registry import SchemaRegistryClient as BlockingClient


class SchemaRegistryClient:
    """Register writer schemas and fetch schemas by id (module docstring); subjects are chosen by the caller.

    Registry ids are immutable, so results are cached for the life of the client (by the confluent clients).
    Thread-safe for the blocking calls; :meth:`schema_async` runs on the caller's event loop.
    """

    def __init__(self, url: str, auth: SecretStr | None = None, timeout_s: float = 10.0, max_retries: int = 0) -> None:
        bare, userinfo = split_userinfo(url)
        self.url = bare.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._auth = auth if auth is not None or userinfo is None else SecretStr(userinfo)
        self._blocking: BlockingClient | None = None
        self._async: AsyncSchemaRegistryClient | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None

    def _conf(self) -> dict[str, Any]:
        conf: dict[str, Any] = {"url": self.url, "timeout": self.timeout_s, "max.retries": self.max_retries}
        if self._auth is not None:
            conf["basic.auth.user.info"] = self._auth.get_secret_value()
        return conf

    def _blocking_client(self) -> BlockingClient:
        if self._blocking is None:
            from confluent_kafka.schema_registry import SchemaRegistryClient as Blocking

            self._blocking = Blocking(self._conf())
        return self._blocking

    def _async_client(self) -> AsyncSchemaRegistryClient:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async_loop is not loop:
            from confluent_kafka.schema_registry import AsyncSchemaRegistryClient

            self._async, self._async_loop = AsyncSchemaRegistryClient(self._conf()), loop
        return self._async

    def register(self, subject: str, schema_str: str) -> int:
        """Register an Avro schema under ``subject`` (idempotent in the registry) and return its id. Blocks."""
        from confluent_kafka.schema_registry import Schema

        client = self._blocking_client()
        try:
            return int(client.register_schema(subject, Schema(schema_str, "AVRO")))
        except Exception as e:  # every failure of the request maps to a typed error (module docstring)
            raise self._error(e, "POST", f"/subjects/{subject}/versions") from None

    def schema(self, schema_id: int) -> dict[str, Any]:
        """The Avro schema with ``schema_id``, parsed from JSON. Blocks on a cache miss: not for an event loop."""
        client = self._blocking_client()
        try:
            found = client.get_schema(schema_id)
        except Exception as e:
            raise self._error(e, "GET", f"/schemas/ids/{schema_id}") from None
        return _avro(schema_id, found)

    async def schema_async(self, schema_id: int) -> dict[str, Any]:
        """:meth:`schema` without blocking the running event loop (the asyncio client)."""
        client = self._async_client()
        try:
            found = await client.get_schema(schema_id)
        except Exception as e:
            raise self._error(e, "GET", f"/schemas/ids/{schema_id}") from None
        return _avro(schema_id, found)

    async def aclose(self) -> None:
        """Close the asyncio client's connections (when it belongs to the running loop); the client stays usable."""
        client, self._async = self._async, None
        if client is not None and self._async_loop is asyncio.get_running_loop():
            await client.aclose()

    def _error(self, e: Exception, method: str, path: str) -> OpalError:
        from confluent_kafka.schema_registry.error import SchemaRegistryError as RegistryReply

        if isinstance(e, RegistryReply):
            status = e.http_status_code
            if status == 404:
                return UnknownSchemaError(f"schema registry has no {path} ({e.error_message})")
            kind = "failed on" if status >= 500 else "refused"
            return SchemaRegistryError(f"schema registry {kind} {method} {path}: HTTP {status} ({e.error_message})")
        return SchemaRegistryError(f"schema registry unreachable at {self.url} ({method} {path}): {type(e).__name__}: {e}")


def _avro(schema_id: int, found: Schema) -> dict[str, Any]:
    if (found.schema_type or "AVRO") != "AVRO":
        raise UnknownSchemaError(f"schema registry id {schema_id} is a {found.schema_type} schema, not Avro")
    try:
        raw = json.loads(found.schema_str or "")
    except ValueError:
        raise UnknownSchemaError(f"schema registry id {schema_id} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise UnknownSchemaError(f"schema registry id {schema_id} is not an Avro record schema")
    return raw
