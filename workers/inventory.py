"""Inventory exports for catalogue backfill: JSONL, CSV and Parquet, read row by row and validated.

One listing per line (JSONL), row (CSV, with a header) or row (Parquet). Columns:

- ``listing_id`` (required), ``category`` (required);
- ``image_uri`` (one URI) or ``image_uris`` (a list; in CSV a JSON list or URIs separated by ``|``);
  ``http(s)://`` or ``file://``; a relative path is read against the inventory's folder;
- ``title`` and ``aspects`` (an object of name -> value; in CSV a JSON object), optional;
- ``updated_at`` (ISO 8601; UTC when it names no zone), optional: the listing's own time,
  carried as the event's ``created_at`` (else the time the event is made).
  Other columns are ignored.

Contract
- :func:`open_inventory` checks the header (CSV) or schema (Parquet) before any row: a file
  without ``listing_id``/``category``/an image column raises :class:`InventoryError`, it does
  not turn every row into a reject.
- Rows come out in file order with an ordinal ``row`` (1, 2, ...) that a checkpoint can count,
  and the ``line`` a person looks up (JSONL, CSV: the line in the file, the header being line 1;
  Parquet: the row number). Blank JSONL lines are not rows.
- :func:`to_event` gives the same row the same ``event_id`` and content every time (the id is
  derived from the listing's content, so a re-run of the same inventory is recognisable
  downstream and a changed listing is not mistaken for a repeat); only ``published_at`` (and
  ``created_at`` without ``updated_at``) is the time it is made. A bad row
  raises :class:`RowRejected` with a reason for the rejects file; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from schemas.events import MAX_URI_CHARS, ImageRef, Lane, ListingImageEvent

Format = Literal["jsonl", "csv", "parquet"]
FORMATS: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
IMAGE_SCHEMES = ("http", "https", "file")
MAX_IMAGES = 24
"""Most images one listing may carry (the worker sends at most ``OPAL_VLLM_IMAGES_PER_PROMPT`` to the model)."""


class InventoryError(ValueError):
    """The inventory as a whole cannot be read (unknown format, no header, required column missing)."""


class RowRejected(ValueError):
    """One row is not a valid listing; the message is the reason recorded in the rejects file."""


@dataclass(frozen=True)
class Row:
    row: int  # ordinal, from 1: what a checkpoint counts
    line: int  # where a person finds it: the file line (JSONL, CSV) or the row number (Parquet)
    data: dict[str, Any] | None  # None: the line is not a JSON object
    error: str | None = None  # why ``data`` is None


def detect_format(name: str, explicit: str | None = None) -> Format:
    """The format named by ``explicit`` or by the file's suffix (a trailing ``.gz`` is not supported)."""
    if explicit:
        if explicit not in ("jsonl", "csv", "parquet"):
            raise InventoryError(f"unknown format {explicit!r}: use jsonl, csv or parquet")
        return explicit  # type: ignore[return-value]
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in FORMATS:
        raise InventoryError(f"cannot tell the format of {name!r} from its suffix: pass --format jsonl|csv|parquet")
    return FORMATS[suffix]


def count_rows(path: Path, fmt: Format) -> int:
    """Rows in the file, cheaply (newlines, or Parquet metadata): the progress bar's total."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    n = 0
    last = b"\n"
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    n += last != b"\n"
    return max(0, n - 1) if fmt == "csv" else n


def open_inventory(path: Path, fmt: Format, skip: int = 0) -> Iterator[Row]:
    """The rows of the inventory at ``path`` after the first ``skip`` (which are read past, not validated)."""
    if fmt == "jsonl":
        return _jsonl(path, skip)
    if fmt == "csv":
        return _csv(path, skip)
    return _parquet(path, skip)


def _require_columns(columns: list[str], where: str) -> None:
    missing = [c for c in ("listing_id", "category") if c not in columns]
    if "image_uri" not in columns and "image_uris" not in columns:
        missing.append("image_uri or image_uris")
    if missing:
        raise InventoryError(f"{where} lacks the column(s) {', '.join(missing)} (has: {', '.join(columns[:20]) or 'none'})")


def _jsonl(path: Path, skip: int) -> Iterator[Row]:
    row = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            row += 1
            if row <= skip:
                continue
            try:
                data = json.loads(raw)
            except ValueError as e:
                yield Row(row, line_no, None, f"not JSON: {e}")
                continue
            if not isinstance(data, dict):
                yield Row(row, line_no, None, f"not a JSON object but {type(data).__name__}")
                continue
            yield Row(row, line_no, data)


def _csv(path: Path, skip: int) -> Iterator[Row]:
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(f)
        _require_columns(list(reader.fieldnames or []), f"the CSV header of {path.name}")
        row = 0
        for rec in reader:
            row += 1
            if row <= skip:
                continue
            fields = [v for v in rec.values() if isinstance(v, str)] + [x for x in rec.get(None) or [] if isinstance(x, str)]  # type: ignore[call-overload]
            line = reader.line_num - sum(v.count("\n") for v in fields)  # the row's first line (blank lines skipped)
            if None in rec:  # more fields than the header
                yield Row(row, line, None, f"{len(rec[None]) if isinstance(rec[None], list) else 1} more field(s) than the header")
                continue
            yield Row(row, line, {k: v for k, v in rec.items() if v not in (None, "")})


def _parquet(path: Path, skip: int) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InventoryError(f"{path.name} is not a readable Parquet file: {e}") from None
    _require_columns(list(pf.schema_arrow.names), f"the Parquet schema of {path.name}")
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        if row + batch.num_rows <= skip:
            row += batch.num_rows
            continue
        for rec in batch.to_pylist():
            row += 1
            if row <= skip:
                continue
            yield Row(row, row, {k: v for k, v in rec.items() if v is not None})


def _text(data: dict[str, Any], key: str, required: bool) -> str | None:
    v = data.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise RowRejected(f"{key} missing")
        return None
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise RowRejected(f"{key} must be text, not {type(v).__name__}")
    return str(v).strip()


def _image_uris(data: dict[str, Any]) -> list[str]:
    raw = data.get("image_uris")
    if raw is None or raw == "":
        one = data.get("image_uri")
        if one is None or one == "":
            raise RowRejected("image_uri (or image_uris) missing")
        raw = [one]
    elif isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            try:
                raw = json.loads(text)
            except ValueError as e:
                raise RowRejected(f"image_uris is not a JSON list: {e}") from None
        else:
            raw = [u for u in text.split("|") if u.strip()]
    if not isinstance(raw, list) or not raw:
        raise RowRejected("image_uris must be a non-empty list")
    if len(raw) > MAX_IMAGES:
        raise RowRejected(f"{len(raw)} images; at most {MAX_IMAGES}")
    if not all(isinstance(u, str) and u.strip() for u in raw):
        raise RowRejected("every image URI must be non-empty text")
    return [u.strip() for u in raw]


def _resolve_uri(uri: str, base: Path | None) -> str:
    if len(uri) > MAX_URI_CHARS:
        raise RowRejected(f"image URI longer than {MAX_URI_CHARS} characters")
    try:
        parsed = urllib.parse.urlsplit(uri)
        _ = parsed.port
    except ValueError as e:
        raise RowRejected(f"unparsable image URI {uri[:80]!r}: {e}") from None
    if not parsed.scheme:
        if base is None:
            raise RowRejected(f"relative image path {uri[:80]!r} in a remote inventory: use an absolute URI")
        return (base / uri).resolve().as_uri()
    if parsed.scheme not in IMAGE_SCHEMES:
        raise RowRejected(f"image URI scheme {parsed.scheme[:20]!r} not allowed (http, https, file)")
    if parsed.scheme in ("http", "https") and not parsed.hostname:
        raise RowRejected(f"image URI {uri[:80]!r} has no host")
    if parsed.scheme == "file" and not parsed.path.startswith("/"):
        raise RowRejected(f"file URI {uri[:80]!r} is not absolute")
    return uri


def _aspects(data: dict[str, Any]) -> dict[str, str]:
    raw = data.get("aspects")
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise RowRejected(f"aspects is not a JSON object: {e}") from None
    if not isinstance(raw, dict):
        raise RowRejected(f"aspects must be an object of name -> value, not {type(raw).__name__}")
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not k.strip():
            raise RowRejected("an aspect name is empty")
        if v is None:
            continue
        if isinstance(v, dict | list):
            raise RowRejected(f"aspect {k[:40]!r} must be text, not {type(v).__name__}")
        out[k.strip()] = str(v)
    return out


def _updated_at(data: dict[str, Any]) -> datetime | None:
    """The listing's own time (``updated_at``: ISO 8601, UTC when it names no zone): the event's ``created_at``."""
    raw = data.get("updated_at")
    if raw is None or raw == "":
        return None
    if isinstance(raw, datetime):  # Parquet timestamps
        when = raw
    elif isinstance(raw, str):
        try:
            when = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
        except ValueError:
            raise RowRejected(f"updated_at {raw[:40]!r} is not an ISO 8601 time") from None
    else:
        raise RowRejected(f"updated_at must be an ISO 8601 time, not {type(raw).__name__}")
    when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return when.astimezone(UTC).replace(microsecond=when.microsecond // 1000 * 1000)


def backfill_event_id(listing_id: str, category: str, uris: list[str], title: str | None, aspects: dict[str, str]) -> str:
    """Deterministic id of one listing's backfill event: the same content always gives the same id."""
    canonical = json.dumps([listing_id, category, uris, title, sorted(aspects.items())], ensure_ascii=False, separators=(",", ":"))
    return "backfill-" + hashlib.sha256(canonical.encode()).hexdigest()[:24]


def to_event(row: Row, base: Path | None) -> ListingImageEvent:
    """The backfill-lane ListingImageEvent for ``row``; raises :class:`RowRejected` with the reason."""
    if row.data is None:
        raise RowRejected(row.error or "unreadable row")
    data = row.data
    listing_id = _text(data, "listing_id", required=True)
    category = _text(data, "category", required=True)
    assert listing_id is not None and category is not None
    uris = [_resolve_uri(u, base) for u in _image_uris(data)]
    title = _text(data, "title", required=False)
    aspects = _aspects(data)
    updated = _updated_at(data)
    try:
        return ListingImageEvent(
            event_id=backfill_event_id(listing_id, category, uris, title, aspects),
            listing_id=listing_id,
            category=category,
            images=[ImageRef(uri=u) for u in uris],
            seller_title=title,
            seller_aspects=aspects,
            lane=Lane.BACKFILL,
            **({"created_at": updated} if updated is not None else {}),
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise RowRejected(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Write ``rows`` as a Parquet inventory (lists stay lists, objects become JSON text): for tests and examples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist would take the first row's keys only
    norm = [{k: (json.dumps(r[k]) if isinstance(r.get(k), dict) else r.get(k)) for k in cols} for r in rows]
    pq.write_table(pa.Table.from_pylist(norm), path)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Write ``rows`` as a CSV inventory (lists and objects as JSON text)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in r.items()})
    path.write_text(buf.getvalue())


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def fetch_s3(uri: str, dest: Path) -> dict[str, Any]:
    """Download the S3 object ``uri`` to ``dest`` unless ``dest`` already holds that version; returns its fingerprint.

    Uses boto3's usual configuration (credentials chain, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for
    S3-compatible stores such as MinIO or moto). Raises :class:`InventoryError` when the object cannot be read.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    parsed = urllib.parse.urlsplit(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key:
        raise InventoryError(f"{uri!r} is not s3://BUCKET/KEY")
    try:
        s3 = boto3.client("s3")
        head = s3.head_object(Bucket=bucket, Key=key)
        fp = {"uri": uri, "etag": str(head.get("ETag", "")).strip('"'), "size": int(head["ContentLength"])}
        marker = dest.with_name(dest.name + ".json")
        if not (dest.exists() and marker.exists() and json.loads(marker.read_text()) == fp):
            tmp = dest.with_name(dest.name + ".part")
            s3.download_file(bucket, key, str(tmp))
            os.replace(tmp, dest)
            marker.write_text(json.dumps(fp))
    except (BotoCoreError, ClientError) as e:
        raise InventoryError(f"cannot read {uri}: {e}") from None
    return fp
