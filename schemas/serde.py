"""Avro serialisation of OPAL events with fastavro, in a standard framing.

Framing
- :class:`SingleObjectFraming` (default): Avro single-object encoding,
  ``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema's
  parsing canonical form + the binary body. Needs no registry: readers resolve the
  fingerprint against the schema history shipped in ``schemas/avro/<name>/v<N>.avsc``.
- :class:`ConfluentFraming` (when ``OPAL_KAFKA_SCHEMA_REGISTRY_URL`` is set): ``00`` +
  4-byte big-endian registry id + body, the format Confluent tooling reads.

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
:class:`SchemaRegistryError`. ``encode`` raises ``ValueError`` for an event that
does not fit its schema (a bug, not bad input).
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from pydantic import SecretStr, ValidationError

from schemas.errors import DecodeError, InvalidEventError, SchemaRegistryError, UnknownSchemaError
from schemas.events import _Event
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


class SchemaRegistryClient:
    """Minimal Confluent Schema Registry client (stdlib HTTP; subjects by record name).

    Results are cached forever (registry ids are immutable). Network failures and
    5xx raise :class:`SchemaRegistryError` (retriable); a 404 for an id raises
    :class:`UnknownSchemaError`. A ``user:password@`` in ``url`` is taken off it (so no
    message or attribute shows it) and used as ``auth`` unless ``auth`` is given.
    """

    def __init__(self, url: str, auth: SecretStr | None = None, timeout_s: float = 10.0) -> None:
        from schemas.settings import split_userinfo

        bare, userinfo = split_userinfo(url)
        self.url = bare.rstrip("/")
        self.timeout_s = timeout_s
        self._auth = auth if auth is not None or userinfo is None else SecretStr(userinfo)
        self._ids: dict[str, int] = {}
        self._schemas: dict[int, dict[str, Any]] = {}

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        if self._auth is not None:
            token = base64.b64encode(self._auth.get_secret_value().encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise UnknownSchemaError(f"schema registry has no {path}") from None
            if e.code >= 500:
                raise SchemaRegistryError(f"schema registry {method} {path}: HTTP {e.code}") from None
            raise SchemaRegistryError(f"schema registry refused {method} {path}: HTTP {e.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise SchemaRegistryError(f"schema registry unreachable at {self.url}: {e}") from None

    def register(self, subject: str, schema: StoredSchema) -> int:
        """Register (idempotent in the registry) and return the schema id."""
        key = f"{subject}\0{schema.canonical}"
        if key not in self._ids:
            res = self._request("POST", f"/subjects/{subject}/versions", {"schema": json.dumps(schema.raw)})
            self._ids[key] = int(res["id"])
            self._schemas[int(res["id"])] = schema.raw
        return self._ids[key]

    def schema(self, schema_id: int) -> dict[str, Any]:
        if schema_id not in self._schemas:
            res = self._request("GET", f"/schemas/ids/{schema_id}")
            self._schemas[schema_id] = json.loads(res["schema"])
        return self._schemas[schema_id]


class ConfluentFraming:
    """Confluent wire format; subjects use the record-name strategy."""

    def __init__(self, registry: SchemaRegistryClient) -> None:
        self.registry = registry
        self._by_id: dict[int, StoredSchema] = {}

    def frame(self, schema: StoredSchema, body: bytes) -> bytes:
        schema_id = self.registry.register(schema.full_name, schema)
        return CONFLUENT_MAGIC + struct.pack(">I", schema_id) + body

    def unframe(self, data: bytes) -> tuple[StoredSchema, bytes]:
        if len(data) < 5:
            raise DecodeError(f"record too short for the Confluent wire format ({len(data)} bytes)")
        if data[:1] != CONFLUENT_MAGIC:
            raise DecodeError(f"bad Confluent magic byte {data[:1].hex()} (expected 00)")
        (schema_id,) = struct.unpack(">I", data[1:5])
        if schema_id not in self._by_id:
            raw = self.registry.schema(schema_id)
            self._by_id[schema_id] = StoredSchema.from_dict(f"registry:{schema_id}", schema_id, raw)
        return self._by_id[schema_id], data[5:]


E = TypeVar("E", bound=_Event)


class EventCodec(Generic[E]):
    """Encode/decode one event type. Stateless apart from caches; thread-safe."""

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

    def decode(self, data: bytes | None) -> E:
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
