"""Avro serialisation of OPAL events with fastavro, in a standard framing.

Framing
- :class:`SingleObjectFraming` (default): Avro single-object encoding,
  ``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
  parsing canonical form + the binary body. Needs no registry: readers resolve the
  fingerprint against the schema history shipped in ``schemas/avro/<name>/v<N>.avsc``.
- :class:`ConfluentFraming` (when ``OPAL_KAFKA_SCHEMA_REGISTRY_URL`` is set): ``00`` +
  4-byte big-endian registry id + body, the format Confluent tooling reads. The registry is
  reached through confluent-kafka's clients (:mod:`schemas.registry`; ``confluent_kafka`` is
  imported only when a registry is used);
  async callers ``await codec.warm(values)`` before decoding (:class:`EventCodec`).

Evolution rules (enforced by ``tests/schemas/test_serde.py`` over every pair of versions)
1. A new version goes in a new ``v<N+1>.avsc``; released files are never edited.
2. Only *add* fields, each with a default (e.g. ``["null", T]`` with ``null``);
   never remove or rename a field, change a type or reorder enum symbols.
3. Roll out readers before writers: a reader resolves data by the writer schema's
   fingerprint, so it must already ship the new ``.avsc``. An old reader whose
   history lacks the writer's schema raises :class:`UnknownSchemaError`, which a
   worker dead-letters rather than guessing. With a registry, readers fetch unknown
   ids themselves, so the order matters less.
Any version can then read data written by any other: new fields get their default,
unknown fields are skipped.

Errors: ``decode`` raises only :class:`DecodeError`, :class:`UnknownSchemaError`,
:class:`InvalidEventError` or (registry unreachable, retriable)
:class:`SchemaRegistryError` (also: a registry id not warmed, decoded inside a running
event loop). ``encode`` raises ``ValueError`` for an event that does not fit its schema (a
bug, not bad input) and, with a registry, the registry's errors.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from pydantic import SecretStr, ValidationError

from schemas.errors import DecodeError, InvalidEventError, OpalError, SchemaRegistryError, UnknownSchemaError
from schemas.events import _Event
from schemas.registry import SchemaRegistryClient
from schemas.settings import KafkaSettings

AVRO_ROOT = Path(__file__).parent / "avro"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"


@dataclass(frozen=True)
class StoredSchema:
    """One version of one record schema."""

    folder: str
    version: int
    raw: dict[str, Any] = field(repr=False)
    parsed: Any = field(repr=False, compare=False)
    canonical: str = field(repr=False)
    fingerprint: bytes  # 8 bytes, little-endian, as written in single-object frames

    @property
    def full_name(self) -> str:
        return f"{self.raw.get('namespace', '')}.{self.raw['name']}".lstrip(".")

    @classmethod
    def from_dict(cls, folder: str, version: int, raw: dict[str, Any]) -> StoredSchema:
        parsed = fastavro.parse_schema(raw)  # with the write hint: schemaless_reader/writer take it without parsing again
        canonical = to_parsing_canonical_form(parsed)
        fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))  # little-endian, per the Avro spec
        return cls(folder, version, raw, parsed, canonical, fp)


_VERSION_FILE = re.compile(r"^v(\d+)\.avsc$")


class SchemaStore:
    """Every known writer schema, indexed by folder/version and by fingerprint.

    Thread-safe for reads; :meth:`add` is for tests and registry look-ups.
    """

    def __init__(self, root: Path | None = AVRO_ROOT) -> None:
        self._by_folder: dict[str, dict[int, StoredSchema]] = {}
        self._by_fp: dict[bytes, StoredSchema] = {}
        self._lock = threading.Lock()
        if root is not None:
            for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                for f in sorted(folder.iterdir()):
                    m = _VERSION_FILE.match(f.name)
                    if m:
                        self.add(folder.name, int(m.group(1)), json.loads(f.read_text()))

    def add(self, folder: str, version: int, raw: dict[str, Any]) -> StoredSchema:
        s = StoredSchema.from_dict(folder, version, raw)
        with self._lock:
            self._by_folder.setdefault(folder, {})[version] = s
            self._by_fp[s.fingerprint] = s
        return s

    def latest(self, folder: str) -> StoredSchema:
        versions = self._by_folder.get(folder)
        if not versions:
            raise KeyError(f"no Avro schema folder {folder!r} in the store")
        return versions[max(versions)]

    def versions(self, folder: str) -> list[StoredSchema]:
        return [v for _, v in sorted(self._by_folder.get(folder, {}).items())]

    def folders(self) -> list[str]:
        return sorted(self._by_folder)

    def by_fingerprint(self, fp: bytes) -> StoredSchema:
        try:
            return self._by_fp[fp]
        except KeyError:
            raise UnknownSchemaError(
                f"unknown writer schema fingerprint {fp.hex()} (this reader ships {len(self._by_fp)} schema versions; "
                "deploy readers with the new .avsc before writers use it)"
            ) from None


class Framing(Protocol):
    """How a writer schema is identified in front of an Avro body."""

    def frame(self, schema: StoredSchema, body: bytes) -> bytes: ...

    def unframe(self, data: bytes) -> tuple[StoredSchema, bytes]: ...

    async def warm(self, values: Iterable[bytes | None]) -> None:
        """Learn, without blocking the running loop, every writer schema ``values`` name, so that :meth:`unframe`
        of them does no network I/O. Never raises for a value: what failed is raised by its :meth:`unframe`."""


class SingleObjectFraming:
    """Avro single-object encoding against a :class:`SchemaStore`."""

    def __init__(self, store: SchemaStore) -> None:
        self.store = store

    def frame(self, schema: StoredSchema, body: bytes) -> bytes:
        return SINGLE_OBJECT_MAGIC + schema.fingerprint + body

    def unframe(self, data: bytes) -> tuple[StoredSchema, bytes]:
        if len(data) < 10:
            raise DecodeError(f"record too short for an Avro single-object frame ({len(data)} bytes)")
        if data[:2] != SINGLE_OBJECT_MAGIC:
            raise DecodeError(f"bad single-object magic {data[:2].hex()} (expected c301)")
        return self.store.by_fingerprint(data[2:10]), data[10:]

    async def warm(self, values: Iterable[bytes | None]) -> None:
        """Nothing to fetch: every writer schema this framing reads is in the store already."""


class ConfluentFraming:
    """Confluent wire format (``00`` + 4-byte big-endian registry id + body); subjects use the record-name strategy.

    Writer schemas are learnt by id from the registry and kept (ids are immutable). How an id is learnt:

    - :meth:`warm` (``async``) fetches every unseen id among raw values with the asyncio client, concurrently, one
      request per id however many callers wait for it; it never raises for an id (a failure is kept and raised
      by that id's :meth:`unframe`) and re-fetches ids that failed before.
    - :meth:`unframe` of an unseen id with **no event loop running in this thread** fetches it with the
      blocking client (a worker thread, a script, the indexer's poll loop).
    - :meth:`unframe` of an unseen id **inside a running event loop** never blocks the loop: it raises
      :class:`SchemaRegistryError` (retriable) and starts fetching the id in the background on that loop, so a
      retry after the fetch finds it. An id whose last fetch failed raises that failure instead
      (:class:`UnknownSchemaError` for a 404: not retriable; :class:`SchemaRegistryError`: retriable, re-fetched
      in the background).

    :meth:`frame` registers the writer schema once per framing with the blocking client (the first encode of a
    type may block up to the registry timeout; the ids of schemas it registered decode without a fetch).
    """

    def __init__(self, registry: SchemaRegistryClient) -> None:
        self.registry = registry
        self._ids: dict[tuple[str, bytes], int] = {}  # (subject, fingerprint) -> id registered by frame()
        self._by_id: dict[int, StoredSchema] = {}
        self._failed: dict[int, OpalError] = {}  # the last fetch of these ids failed with this error
        self._fetching: dict[int, asyncio.Task[None]] = {}

    def frame(self, schema: StoredSchema, body: bytes) -> bytes:
        key = (schema.full_name, schema.fingerprint)
        schema_id = self._ids.get(key)
        if schema_id is None:
            schema_id = self.registry.register(schema.full_name, json.dumps(schema.raw))
            self._by_id.setdefault(schema_id, StoredSchema.from_dict(f"registry:{schema_id}", schema_id, schema.raw))
            self._ids[key] = schema_id
        return CONFLUENT_MAGIC + struct.pack(">I", schema_id) + body

    def unframe(self, data: bytes) -> tuple[StoredSchema, bytes]:
        if len(data) < 5:
            raise DecodeError(f"record too short for the Confluent wire format ({len(data)} bytes)")
        if data[:1] != CONFLUENT_MAGIC:
            raise DecodeError(f"bad Confluent magic byte {data[:1].hex()} (expected 00)")
        (schema_id,) = struct.unpack(">I", data[1:5])
        found = self._by_id.get(schema_id)
        return (found if found is not None else self._resolve(schema_id)), data[5:]

    async def warm(self, values: Iterable[bytes | None]) -> None:
        loop = asyncio.get_running_loop()
        unseen = {
            struct.unpack(">I", v[1:5])[0] for v in values if v is not None and len(v) >= 5 and v[:1] == CONFLUENT_MAGIC
        } - self._by_id.keys()
        if unseen:
            await asyncio.wait([self._fetch(schema_id, loop) for schema_id in sorted(unseen)])

    def _resolve(self, schema_id: int) -> StoredSchema:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop in this thread: blocking here blocks no one else
            return self._learn(schema_id, self.registry.schema(schema_id))
        failed = self._failed.get(schema_id)
        if failed is None or failed.retriable:
            self._fetch(schema_id, loop)
        if failed is not None:
            raise failed
        raise SchemaRegistryError(
            f"writer schema id {schema_id} is not known yet and an event loop is running: await codec.warm(values) "
            "before decoding them (fetching it in the background now; a retry will find it)"
        )

    def _fetch(self, schema_id: int, loop: asyncio.AbstractEventLoop) -> asyncio.Task[None]:
        task = self._fetching.get(schema_id)
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._fetching[schema_id] = loop.create_task(self._fetch_now(schema_id), name=f"schema-id-{schema_id}")
        return task

    async def _fetch_now(self, schema_id: int) -> None:
        try:
            self._learn(schema_id, await self.registry.schema_async(schema_id))
        except OpalError as e:
            self._failed[schema_id] = e
        finally:
            if self._fetching.get(schema_id) is asyncio.current_task():
                del self._fetching[schema_id]

    def _learn(self, schema_id: int, raw: dict[str, Any]) -> StoredSchema:
        try:
            stored = StoredSchema.from_dict(f"registry:{schema_id}", schema_id, raw)
        except Exception as e:  # fastavro's SchemaParseException, a KeyError for a record without a name, ...
            raise UnknownSchemaError(
                f"registry schema id {schema_id} is no Avro schema this reader can use: {type(e).__name__}: {e}"
            ) from None
        self._by_id[schema_id] = stored
        self._failed.pop(schema_id, None)
        return stored


E = TypeVar("E", bound=_Event)


class EventCodec(Generic[E]):
    """Encode/decode one event type. Stateless apart from caches; thread-safe.

    Decoding from async code (the contract of the non-blocking path):

    - ``await codec.warm(values)`` before ``codec.decode(v)`` for ``v`` in ``values``, on the loop that decodes:
      with a registry (:class:`ConfluentFraming`) it fetches the writer schemas of the ids it has not seen, with the
      asyncio client; afterwards ``decode`` of those values does no network I/O. With single-object framing (the
      default) it returns at once. ``warm`` never raises for a value: a failed fetch is raised by that value's
      ``decode`` (:class:`UnknownSchemaError`, or :class:`SchemaRegistryError`: retriable, warm again).
    - ``decode`` never blocks a running event loop: an id not warmed raises :class:`SchemaRegistryError`
      (retriable) and is fetched in the background, so a retry finds it. Without a running loop (a thread, a
      script) ``decode`` fetches an unseen id itself, blocking that thread up to the registry timeout.
    - ``encode`` registers the writer schema once per framing with the blocking client: with a registry, the first
      encode of a type may block up to the registry timeout.
    """

    def __init__(self, model: type[E], store: SchemaStore | None = None, framing: Framing | None = None) -> None:
        self.model = model
        self.store = store or default_store()
        self.framing = framing or SingleObjectFraming(self.store)
        self.writer = self.store.latest(model.AVRO_DIR)

    def encode(self, event: E) -> bytes:
        if not isinstance(event, self.model):
            raise TypeError(f"expected {self.model.__name__}, got {type(event).__name__}")
        buf = io.BytesIO()
        try:
            fastavro.schemaless_writer(buf, self.writer.parsed, event.model_dump(mode="python"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.model.__name__} does not fit {self.writer.full_name} v{self.writer.version}: {e}") from e
        return self.framing.frame(self.writer, buf.getvalue())

    async def warm(self, values: Iterable[bytes | None]) -> None:
        """Fetch, without blocking the running loop, the writer schemas ``values`` need (class docstring); never
        raises for a value. A no-op for single-object framing."""
        await self.framing.warm(values)

    def decode(self, data: bytes | None) -> E:
        """The event in ``data``; raises only the errors of the module docstring. No network I/O once the value's
        writer schema is known; never blocks a running event loop (class docstring)."""
        if data is None:
            raise DecodeError("record has no value (tombstone or null)")
        writer, body = self.framing.unframe(bytes(data))
        if writer.full_name != self.writer.full_name:
            raise DecodeError(f"record is a {writer.full_name}, expected {self.writer.full_name}")
        buf = io.BytesIO(body)
        try:
            record = fastavro.schemaless_reader(buf, writer.parsed, self.writer.parsed)
        except Exception as e:  # fastavro raises EOFError, ValueError, IndexError, UnicodeDecodeError, ...
            raise DecodeError(f"corrupt Avro body for {writer.full_name} v{writer.version}: {type(e).__name__}: {e}") from None
        if buf.tell() != len(body):
            raise DecodeError(f"{len(body) - buf.tell()} trailing bytes after the Avro body")
        try:
            return self.model.model_validate(record)
        except ValidationError as e:
            raise InvalidEventError(
                f"{self.model.__name__} breaks its contract: {e.errors(include_url=False, include_input=False)}"
            ) from None


_DEFAULT_STORE: SchemaStore | None = None


def default_store() -> SchemaStore:
    """The process-wide store of the shipped schema history (loaded once)."""
    global _DEFAULT_STORE
    if _DEFAULT_STORE is None:
        _DEFAULT_STORE = SchemaStore()
    return _DEFAULT_STORE


def framing_for(registry_url: str | None, auth: SecretStr | None = None, store: SchemaStore | None = None) -> Framing:
    """The framing the settings ask for: Confluent with a registry, single-object otherwise."""
    if registry_url:
        return ConfluentFraming(SchemaRegistryClient(registry_url, auth))
    return SingleObjectFraming(store or default_store())


class CodecSet:
    """Codecs for any event type sharing one framing: the settings' schema registry (one client) or single-object
    encoding. ``codecs = CodecSet.of(settings.kafka); codecs[AspectEvent].encode(ev)``. Codecs are made on first use."""

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        self._codecs: dict[type[Any], EventCodec[Any]] = {}

    @classmethod
    def of(cls, kafka: KafkaSettings) -> CodecSet:
        return cls(framing_for(kafka.schema_registry_url, kafka.schema_registry_auth))

    def __getitem__(self, model: type[E]) -> EventCodec[E]:
        codec = self._codecs.get(model)
        if codec is None:
            codec = self._codecs[model] = EventCodec(model, framing=self.framing)
        return codec
