from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from opal.samples import load_samples
from schemas.category import CategoryRegistry, default_categories
from schemas.errors import ErrorKind, UnknownCategoryError


def test_shipped_schemas_cover_every_sample_category() -> None:
    reg = default_categories()
    assert len(reg) >= 20
    sample_types = {s.product_type for s in load_samples()}
    assert len(sample_types) == 20  # the 20 most common ABO product types
    assert sample_types <= set(reg.names)


@pytest.mark.parametrize("category", default_categories().names)
def test_json_schema_is_valid_and_tight(category: str) -> None:
    c = default_categories().get(category)
    schema = c.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    aspects = schema["properties"]["aspects"]
    assert aspects["additionalProperties"] is False
    assert set(aspects["properties"]) == {a.name for a in c.visual_aspects}
    assert not any(not a.visual and a.name in aspects["properties"] for a in c.aspects)
    # a listing built from the schema's own first values validates, and passes check()
    listing = {a.name: (a.values[0] if a.values else "something") for a in c.visual_aspects}
    jsonschema.validate({"title": "A title", "aspects": listing}, schema)
    assert c.check(listing).valid


def test_json_schema_rejects_what_check_rejects() -> None:
    shoes = default_categories().get("shoes")
    schema = shoes.json_schema()
    bad = [
        {"title": "x", "aspects": {"Color": "white", "Size": "42"}},  # non-visual
        {"title": "x", "aspects": {"Color": "white", "Flavour": "mint"}},  # unknown
        {"title": "x", "aspects": {"Color": "sky"}},  # outside closed set
        {"title": "x", "aspects": {"Material": "leather"}},  # missing required Color
        {"title": "", "aspects": {"Color": "white"}},
        {"title": "x", "aspects": {"Color": "white"}, "price": 3},
    ]
    for doc in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema)


def test_check_reports_each_problem() -> None:
    shoes = default_categories().get("shoes")
    r = shoes.check({"Color": "sky", "Size": "42", "Flavour": "mint", "Material": "leather", "Brand": " "})
    assert not r.valid
    assert r.unknown_keys == ["Size", "Flavour"]
    assert r.invalid_values == ["Color=sky", "Brand= "]
    assert r.missing_required == []
    r = shoes.check({"Material": "leather"})
    assert r.missing_required == ["Color"]
    seller = shoes.check({"Size": "42", "Color": "white"}, generated=False)
    assert seller.valid  # sellers may give non-visual aspects


def test_unknown_category_is_typed() -> None:
    with pytest.raises(UnknownCategoryError) as ei:
        default_categories().get("spaceship")
    assert ei.value.reason is ErrorKind.UNKNOWN_CATEGORY
    assert "spaceship" in str(ei.value) and "accessory" in str(ei.value)
    with pytest.raises(UnknownCategoryError, match=r"did you mean shoes"):
        default_categories().get("shoe")


def _write(d: Path, name: str, doc: dict) -> None:
    (d / f"{name}.json").write_text(json.dumps(doc))


def test_bad_schema_files_are_reported_by_name(tmp_path: Path) -> None:
    good = {"category": "mugs", "display_name": "Mugs", "aspects": [{"name": "Color", "visual": True}]}
    _write(tmp_path, "mugs", good)
    assert CategoryRegistry.load(tmp_path).names == ["mugs"]
    _write(tmp_path, "cups", good)
    with pytest.raises(ValueError, match=r"cups\.json"):
        CategoryRegistry.load(tmp_path)
    (tmp_path / "cups.json").unlink()
    dup = dict(good, aspects=[{"name": "Color", "visual": True}, {"name": "Color", "visual": False}])
    _write(tmp_path, "mugs", dup)
    with pytest.raises(ValueError, match="twice"):
        CategoryRegistry.load(tmp_path)
    _write(tmp_path, "mugs", dict(good, aspects=[{"name": "Size", "visual": False, "required": True}]))
    with pytest.raises(ValueError, match="required"):
        CategoryRegistry.load(tmp_path)


def test_a_category_without_a_schema_gets_the_generic_one_unless_refused() -> None:
    from schemas.category import generic_schema
    from schemas.errors import UnknownCategoryError

    reg = default_categories()
    shoes = reg.resolve("shoes")
    assert shoes is reg.get("shoes") and not shoes.generic and shoes.ref == "shoes@v1"
    assert shoes.key == f"shoes@v1#{shoes.digest}"
    g = reg.resolve("Space Ship-2")
    assert g.generic and g.category == "space_ship_2" and g.display_name == "space ship 2"
    assert (g.ref, g.key) == ("generic@v1", f"space_ship_2~generic@v1#{g.digest}")  # the prompt names the category: in the key
    # keys are computed once per schema and never carried over to a copy: each stand-in has its own
    assert generic_schema().key.startswith("generic@")  # computed (and kept) on the generic schema first
    assert reg.resolve("moon tent").key.startswith("moon_tent~generic@") and reg.resolve("Space Ship-2") is g
    assert g.names == generic_schema().names and {"Color", "Material", "Pattern", "Shape", "Style"} <= set(g.names)
    schema = g.json_schema()
    assert schema["properties"]["aspects"]["required"] == ["Color"]
    assert "black" in schema["properties"]["aspects"]["properties"]["Color"]["enum"]
    assert g.check({"Color": "black", "Material": "wood"}).valid and not g.check({"Color": "sky"}).valid
    assert reg.resolve("!!!").category == "item"  # nothing slug-safe left
    with pytest.raises(UnknownCategoryError):
        reg.resolve("spaceship", fallback=False)
    assert "generic" not in reg  # the fallback is not a category of the registry
