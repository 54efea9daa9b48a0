"""Model output parsing and normalisation (pure logic)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.output import InvalidOutputError, normalise_name, normalise_value, parse_listing
from schemas.category import default_categories
from schemas.errors import ErrorKind

SHOES = default_categories().get("shoes")


def test_valid_output_parses() -> None:
    listing, check = parse_listing('{"title":"White leather court shoes","aspects":{"Color":"white","Material":"leather"}}', SHOES)
    assert listing.title == "White leather court shoes"
    assert listing.aspects == {"Color": "white", "Material": "leather"}
    assert check.valid


def test_normalisation_of_names_values_and_whitespace() -> None:
    raw = (
        '{"title":"  White   court\\nshoes ","aspects":{"colour":" Gray ","HEEL TYPE":"Kitten","closure_type":"laces","Brand":"  Find. "}}'
    )
    listing, check = parse_listing(raw, SHOES)
    assert listing.title == "White court shoes"
    assert listing.aspects == {"Color": "grey", "Heel Type": "kitten", "Closure": "lace-up", "Brand": "Find."}
    assert check.valid
    assert normalise_name("main colour", SHOES) == "Color"
    assert normalise_value("Color", "MULTI", SHOES) == "multicolor"
    assert normalise_value("Brand", 42, SHOES) == "42"


def test_empty_values_mean_not_shown() -> None:
    listing, _ = parse_listing('{"title":"t","aspects":{"Color":"black","Pattern":"","Brand":null}}', SHOES)
    assert listing.aspects == {"Color": "black"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "not valid JSON"),
        ("garbage {", "not valid JSON"),
        ('{"title":"t","aspects":{"Color":"black"}', "not valid JSON"),
        ("[1,2]", "expected a JSON object"),
        ('{"aspects":{"Color":"black"}}', "missing or empty title"),
        ('{"title":"   ","aspects":{}}', "missing or empty title"),
        ('{"title":"t","aspects":["Color"]}', "aspects is not an object"),
        ('{"title":"t","aspects":{"Color":"black","Size":"42"}}', "unknown ['Size']"),
        ('{"title":"t","aspects":{"Color":"sky blue"}}', "invalid ['Color=sky blue']"),
        ('{"title":"t","aspects":{"Material":"leather"}}', "missing ['Color']"),
    ],
)
def test_bad_output_is_typed_and_keeps_raw(raw: str, message: str) -> None:
    with pytest.raises(InvalidOutputError) as ei:
        parse_listing(raw, SHOES)
    assert message in str(ei.value)
    assert ei.value.raw == raw
    assert ei.value.reason is ErrorKind.INVALID_OUTPUT


def test_lenient_mode_drops_offending_pairs_and_reports_them() -> None:
    listing, check = parse_listing('{"title":"t","aspects":{"Color":"black","Size":"42","Material":"wood"}}', SHOES, strict=False)
    assert listing.aspects == {"Color": "black"}
    assert not check.valid and check.unknown_keys == ["Size"] and check.invalid_values == ["Material=wood"]
    with pytest.raises(InvalidOutputError):  # a missing required aspect is never silently accepted
        parse_listing('{"title":"t","aspects":{"Size":"42"}}', SHOES, strict=False)


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_text_parses_or_raises_typed(raw: str) -> None:
    try:
        parse_listing(raw, SHOES)
    except InvalidOutputError as e:
        assert e.raw == raw
