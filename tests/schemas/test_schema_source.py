"""Schemas as versioned data: the bulk format round trip, import diffs and version bumps, locations that
override one another, a watcher that swaps sets, the shipped induced set covering the whole ABO catalogue."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from schemas.bulk import BULK_FORMAT, dump_bulk, is_bulk_file, read_bulk, to_bulk
from schemas.category import CATEGORY_DIR, CategoryRegistry, CategorySchema, default_categories
from schemas.schema_diff import bump_versions, diff_schemas
from schemas.schema_source import DEFAULT_LOCATIONS, INDUCED_DIR, SchemaWatcher, load_locations
from tests.support import REPO, opal_bin

ABO = REPO.parent / "shared" / "data" / "abo"


def _schema(slug: str, colours: list[str], version: int = 1, **extra: object) -> CategorySchema:
    return CategorySchema.model_validate(
        {
            "category": slug,
            "display_name": slug.title(),
            "version": version,
            "aspects": [
                {"name": "Color", "visual": True, "required": True, "values": colours},
                {"name": "Brand", "visual": True, "recommended": True, "suggested": ["acme"]},
                {"name": "Size", "visual": False, "multi": True},
                *extra.get("more", []),  # type: ignore[misc]
            ],
        }
    )


def test_the_bulk_format_round_trips_every_packaged_schema() -> None:
    schemas = default_categories().schemas
    doc = json.loads(dump_bulk(to_bulk(schemas.values(), "t1", "test")))
    assert doc["format"] == BULK_FORMAT and len(doc["categories"]) == len(schemas)
    assert read_bulk(doc) == schemas
    shoes = next(c for c in doc["categories"] if c["category_id"] == "shoes")
    color = next(a for a in shoes["aspects"] if a["name"] == "Color")
    assert (color["usage"], color["mode"], color["cardinality"]) == ("REQUIRED", "SELECTION_ONLY", "SINGLE")


def test_bulk_keeps_marketplace_semantics() -> None:
    s = _schema("mug", ["red", "blue"])
    back = read_bulk(to_bulk([s]))["mug"]
    assert back == s
    brand, size = back.aspect("Brand"), back.aspect("Size")
    assert brand is not None and brand.recommended and brand.values is None and brand.suggested == ["acme"]
    assert size is not None and size.multi and size.accepts("S, M") and not back.aspect("Color").accepts("red, blue")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="ebay/1"), "not an opal.category-schemas/1 document"),
        (lambda d: d["categories"].append(dict(d["categories"][0])), "appears twice"),
        (lambda d: d["categories"][0]["aspects"][0].update(values=[]), "SELECTION_ONLY without values"),
        (lambda d: d["categories"][0]["aspects"][0].update(usage="MANDATORY"), "usage"),
        (lambda d: d["categories"][0].update(category_id="Mugs!"), "category_id"),
    ],
)
def test_a_bad_bulk_file_is_refused_with_its_reason(mutate: object, message: str) -> None:
    doc = to_bulk([_schema("mug", ["red"])])
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message.replace("/", ".")):
        read_bulk(doc)


def test_diff_names_what_changed_and_bumps_versions_the_file_forgot() -> None:
    old = {"mug": _schema("mug", ["red", "blue"]), "cup": _schema("cup", ["red"]), "bowl": _schema("bowl", ["red"])}
    new = {
        "mug": _schema("mug", ["red", "green"], more=[{"name": "Handle", "visual": True}]),  # version not raised
        "cup": _schema("cup", ["red"], version=7),  # version only: unchanged content
        "plate": _schema("plate", ["white"]),
    }
    d = diff_schemas(old, new)
    assert (d.added, d.removed, d.unchanged) == (["plate"], ["bowl"], 1)
    (mug,) = d.changed
    assert mug.aspects_added == ["Handle"] and mug.values_added == {"Color": ["green"]} and mug.values_removed == {"Color": ["blue"]}
    bumped = bump_versions(old, new)
    assert bumped["mug"].version == 2 and bumped["cup"].version == 7 and bumped["plate"].version == 1
    assert bumped["mug"].key != old["mug"].key  # a cache keyed on it misses
    assert diff_schemas(bumped, bumped).empty


def test_an_edit_without_a_version_bump_still_changes_the_cache_key() -> None:
    a, b = _schema("mug", ["red"]), _schema("mug", ["blue"])
    assert a.ref == b.ref and a.key != b.key


def test_later_locations_override_earlier_ones(tmp_path: Path) -> None:
    bulk = tmp_path / "taxonomy.json"
    bulk.write_text(dump_bulk(to_bulk([_schema("shoes", ["red"], version=9), _schema("mug", ["red"])])))
    assert is_bulk_file(bulk)
    over = load_locations([bulk, CATEGORY_DIR])
    assert over.get("shoes") == default_categories().get("shoes") and "mug" in over
    under = load_locations([CATEGORY_DIR, bulk])
    assert under.get("shoes").version == 9
    with pytest.raises(ValueError, match="does not exist"):
        load_locations([tmp_path / "missing"])


def test_the_watcher_swaps_whole_sets_and_keeps_the_old_one_when_a_file_is_bad(tmp_path: Path) -> None:
    (tmp_path / "mug.json").write_text(_schema("mug", ["red"]).model_dump_json())
    now = [0.0]
    seen: list[CategoryRegistry] = []
    w = SchemaWatcher([tmp_path], reload_s=5.0, on_reload=seen.append, clock=lambda: now[0])
    assert not w.poll()  # nothing changed
    (tmp_path / "mug.json").write_text(_schema("mug", ["blue"], version=2).model_dump_json())
    now[0] = 1.0
    assert not w.poll() and w.registry.get("mug").version == 1  # not yet time to look
    now[0] = 6.0
    assert w.poll() and w.registry.get("mug").version == 2 and len(seen) == 1
    (tmp_path / "mug.json").write_text("{not json")
    now[0] = 12.0
    assert not w.poll() and w.registry.get("mug").version == 2 and w.failures == 1 and "mug.json" in (w.last_error or "")
    (tmp_path / "mug.json").write_text(_schema("mug", ["green"], version=3).model_dump_json())
    w.request_reload()  # SIGHUP: look now, whatever the clock says
    assert w.poll() and w.registry.get("mug").version == 3 and w.last_error is None


def test_every_abo_product_type_has_a_packaged_schema() -> None:
    assert DEFAULT_LOCATIONS[0] == INDUCED_DIR / "abo.json"
    reg = default_categories()
    induced = read_bulk(INDUCED_DIR / "abo.json")
    assert len(induced) == 298 and len(reg) == 298  # the hand-written 25 override their induced twins
    if (ABO / "listings.jsonl").is_file():
        types = {json.loads(line)["product_type"] for line in (ABO / "listings.jsonl").read_text().splitlines()}
        assert types <= set(reg.names), sorted(types - set(reg.names))[:5]


def test_import_reports_the_diff_and_writes_an_accepted_set(cli_env: dict[str, str], tmp_path: Path) -> None:
    exported = tmp_path / "all.json"
    r = subprocess.run([opal_bin(), "schemas", "export", "--out", str(exported)], capture_output=True, text=True, env=cli_env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(exported.read_text())
    clock = next(c for c in doc["categories"] if c["category_id"] == "clock")
    clock["aspects"].append({"name": "Dial Style", "usage": "OPTIONAL", "mode": "FREE_TEXT"})
    doc["categories"] = [c for c in doc["categories"] if c["category_id"] != "swatch"]
    doc["categories"].append({"category_id": "teapot", "aspects": [{"name": "Color", "values": ["white"], "mode": "SELECTION_ONLY"}]})
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    target = tmp_path / "accepted.json"
    r = subprocess.run(
        [opal_bin(), "schemas", "import", str(edited), "--json", "--write", str(target)], capture_output=True, text=True, env=cli_env
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[0])
    assert report["added"] == ["teapot"] and report["removed"] == ["swatch"]
    assert report["changed"] == {"clock": {"version": [1, 2], "summary": "+Dial Style"}}
    accepted = read_bulk(target)
    assert accepted["clock"].version == 2 and accepted["shoes"] == default_categories().get("shoes")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": BULK_FORMAT, "categories": [{"category_id": "x", "aspects": []}]}))
    r = subprocess.run([opal_bin(), "schemas", "import", str(bad)], capture_output=True, text=True, env=cli_env)
    assert r.returncode == 2 and "not imported" in r.stdout


def test_the_worker_settings_can_point_at_another_taxonomy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from schemas.schema_source import configured_categories
    from schemas.settings import OpalSettings

    bulk = tmp_path / "mine.json"
    bulk.write_text(dump_bulk(to_bulk([_schema("mug", ["red"])])))
    monkeypatch.setenv("OPAL_SCHEMAS_PATHS", json.dumps([str(bulk)]))
    s = OpalSettings()
    assert s.schemas.paths == [bulk]
    reg = configured_categories(s.schemas.paths)
    assert reg.names == ["mug"] and reg.resolve("shoes").generic
    monkeypatch.delenv("OPAL_SCHEMAS_PATHS")
    assert configured_categories(OpalSettings().schemas.paths) is default_categories()
