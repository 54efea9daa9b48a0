"""Inventory exports: the three formats give the same events (and event ids); bad rows are rejected with a reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from schemas.events import Lane
from workers.inventory import (
    InventoryError,
    Row,
    RowRejected,
    backfill_event_id,
    count_rows,
    detect_format,
    open_inventory,
    to_event,
    write_csv,
    write_parquet,
)

ROWS: list[dict[str, Any]] = [
    {"listing_id": "a1", "category": "SHOES", "image_uri": "https://img.example.com/a1.jpg", "title": "Red shoe"},
    {"listing_id": "a2", "category": "HANDBAG", "image_uris": ["images/a2.jpg", "file:///srv/img/a2b.jpg"], "aspects": {"Color": "Black"}},
    {"listing_id": "a3", "category": "SHOES", "image_uri": "ftp://host/a3.jpg"},
    {"listing_id": "", "category": "SHOES", "image_uri": "https://img.example.com/x.jpg"},
    {"listing_id": "a5", "category": "SHOES"},
]


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        write_csv(rows, path)
    else:
        write_parquet(rows, path)


def _outcomes(path: Path) -> list[tuple[int, str]]:
    out = []
    for row in open_inventory(path, detect_format(path.name)):
        try:
            ev = to_event(row, path.parent)
            out.append((row.row, ev.event_id))
        except RowRejected as e:
            out.append((row.row, f"rejected: {e}"))
    return out


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_every_format_gives_the_same_events_and_rejects(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"inv{suffix}"
    _write(ROWS, path)
    reference = tmp_path / "ref.jsonl"
    _write(ROWS, reference)
    assert count_rows(path, detect_format(path.name)) == len(ROWS)
    got = _outcomes(path)
    assert got == _outcomes(reference)
    assert [r for r, o in got if o.startswith("rejected")] == [3, 4, 5]
    assert "scheme 'ftp' not allowed" in got[2][1] and "listing_id missing" in got[3][1] and "image_uri" in got[4][1]
    ev = to_event(next(iter(open_inventory(path, detect_format(path.name), skip=1))), tmp_path)
    assert ev.lane is Lane.BACKFILL and ev.seller_aspects == {"Color": "Black"}
    assert [i.uri for i in ev.images] == [(tmp_path / "images/a2.jpg").resolve().as_uri(), "file:///srv/img/a2b.jpg"]


def test_event_ids_follow_the_content() -> None:
    row = Row(1, 1, {"listing_id": "a", "category": "c", "image_uri": "https://h/x.jpg", "title": "t"})
    first, again = to_event(row, None), to_event(row, None)
    assert first.event_id == again.event_id == backfill_event_id("a", "c", ["https://h/x.jpg"], "t", {})
    changed = to_event(Row(1, 1, {**row.data, "title": "t2"}), None)  # type: ignore[dict-item]
    assert changed.event_id != first.event_id


def test_lines_point_at_the_file(tmp_path: Path) -> None:
    p = tmp_path / "inv.jsonl"
    p.write_text('{"listing_id": "a", "category": "c", "image_uri": "https://h/a"}\n\n[1, 2]\n{broken\n')
    rows = list(open_inventory(p, "jsonl"))
    assert [(r.row, r.line) for r in rows] == [(1, 1), (2, 3), (3, 4)]
    with pytest.raises(RowRejected, match="not a JSON object"):
        to_event(rows[1], None)
    with pytest.raises(RowRejected, match="not JSON"):
        to_event(rows[2], None)
    csv = tmp_path / "inv.csv"
    csv.write_bytes(  # an Excel byte-order mark, a field over two lines, a blank line
        '\ufefflisting_id,category,image_uri,title\na,c,https://h/a,"two\nlines"\n\nb,c,https://h/b,x,extra\nc,c,https://h/c\n'.encode()
    )
    rows = list(open_inventory(csv, "csv"))
    assert [(r.row, r.line) for r in rows] == [(1, 2), (2, 5), (3, 6)]
    assert to_event(rows[0], None).seller_title == "two\nlines"
    with pytest.raises(RowRejected, match="more field"):
        to_event(rows[1], None)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"image_uris": "[not json"}, "not a JSON list"),
        ({"image_uris": []}, "image_uri"),
        ({"image_uri": "images/x.jpg"}, "relative image path"),
        ({"image_uri": "https:///nohost"}, "no host"),
        ({"image_uri": "https://h/" + "x" * 9000}, "longer than"),
        ({"image_uri": "https://h/a", "aspects": "[1]"}, "aspects must be an object"),
        ({"image_uri": "https://h/a", "aspects": {"Color": {"a": 1}}}, "must be text"),
        ({"image_uri": "https://h/a", "listing_id": "x" * 600}, "listing_id"),
        ({"image_uri": "https://h/a", "title": ["a"]}, "title must be text"),
        ({"image_uri": "https://h/a", "updated_at": "yesterday"}, "not an ISO 8601 time"),
    ],
)
def test_bad_rows_name_their_reason(data: dict[str, Any], reason: str) -> None:
    row = Row(1, 1, {"listing_id": "a", "category": "c", **data})
    with pytest.raises(RowRejected, match=reason):
        to_event(row, None)  # a remote inventory: relative paths cannot be resolved


def test_a_file_without_the_required_columns_fails_as_a_whole(tmp_path: Path) -> None:
    csv = tmp_path / "inv.csv"
    csv.write_text("id,category,image_uri\n1,c,https://h/a\n")
    with pytest.raises(InventoryError, match="listing_id"):
        list(open_inventory(csv, "csv"))
    pq = tmp_path / "inv.parquet"
    write_parquet([{"listing_id": "a", "category": "c"}], pq)
    with pytest.raises(InventoryError, match="image_uri or image_uris"):
        list(open_inventory(pq, "parquet"))
    notpq = tmp_path / "x.parquet"
    notpq.write_text("hello")
    with pytest.raises(InventoryError, match="not a readable Parquet"):
        list(open_inventory(notpq, "parquet"))
    with pytest.raises(InventoryError, match="--format"):
        detect_format("inventory.txt")


def test_updated_at_is_the_events_time() -> None:
    row = Row(1, 1, {"listing_id": "a", "category": "c", "image_uri": "https://h/a", "updated_at": "2026-03-01T10:00:00.123456"})
    ev = to_event(row, None)
    assert ev.created_at.isoformat() == "2026-03-01T10:00:00.123000+00:00"
    assert to_event(row, None).event_id == ev.event_id
