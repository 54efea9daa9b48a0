"""Schema induction from a catalogue's own evidence: question parsing, closed sets, determinism, the shipped file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from schemas.bulk import read_bulk
from schemas.schema_source import INDUCED_DIR
from tests.support import REPO, opal_bin
from training.induce import induce, leading_brand, product_nouns, question_aspect

ABO = REPO.parent / "shared" / "data" / "abo"
SUITCASE = frozenset({"suitcase", "suitcases"})


@pytest.mark.parametrize(
    ("question", "aspect"),
    [
        ("What is the main color of the suitcase?", "Color"),
        ("What is the main color of the suitcases", "Color"),
        ("What color is the handle", "Handle Color"),
        ("What is the main color of the suitcase's frame", "Frame Color"),
        ("How many wheels does the suitcase have", "Number of Wheels"),
        ("How many suitcases are in the set", "Number of Items"),
        ("What type of handle does the suitcase have", "Handle Type"),
        ("What material appears to be the suitcase's shell", "Shell Material"),
        ("What is the shape of the suitcase", "Shape"),
        ("Does the suitcase appear smooth or rough", "Texture"),
        ("Does the suitcase have a lock", None),
        ("What is attached to the suitcase", None),
    ],
)
def test_questions_name_an_attribute_and_the_part_it_is_about(question: str, aspect: str | None) -> None:
    assert question_aspect(question, SUITCASE) == aspect


def test_product_nouns_come_from_the_slug_and_the_commonest_question_heads() -> None:
    nouns = product_nouns("drinking_cup", ["What is the shape of the glass"] * 9 + ["What color is the lid"])
    assert {"drinking", "cup", "glass"} <= nouns and "lid" not in nouns


def test_brands_lead_the_title() -> None:
    assert leading_brand("amazon brand - solimo 78 cm blue suitcase") == "solimo"
    assert leading_brand("amazonbasics premium hardside spinner") == "amazonbasics"
    assert leading_brand("12-inch wall clock") is None


def _rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(12):
        rows.append(
            {
                "item_id": f"s{i:02d}",
                "product_type": "suitcase",
                "title": f"acme spinner {i}",
                "color": ["navy blue", "black", "light grey"][i % 3],
                "qa": [
                    {"question": "How many wheels does the suitcase have", "answer": ["four", "two"][i % 2]},
                    {"question": "What type of handle does the suitcase have", "answer": f"telescopic model {i} extra long words"},
                    {"question": "What is the main material of the suitcase", "answer": "polycarbonate"},
                ],
            }
        )
    rows.append({"item_id": "t0", "product_type": "teapot", "title": "pot", "color": "plaid-ish", "qa": []})
    return rows


def test_induction_proposes_closed_sets_where_the_data_shows_them() -> None:
    by = {c.schema.category: c for c in induce(_rows())}
    suitcase = by["suitcase"].schema
    assert suitcase.names[0] == "Color" and suitcase.aspect("Color").required  # type: ignore[union-attr]
    assert by["suitcase"].evidence["Color"]["top_values"] == [["black", 4], ["grey", 4], ["navy", 4]]  # onto the vocabulary
    assert suitcase.aspect("Number of Wheels").values == ["2", "4"]  # type: ignore[union-attr]
    assert suitcase.aspect("Brand").values is None and suitcase.aspect("Brand").suggested == ["acme"]  # type: ignore[union-attr]
    assert suitcase.aspect("Handle Type") is None  # answers too long to be values: no evidence
    assert by["suitcase"].confidence == 0.6 and not by["suitcase"].review
    teapot = by["teapot"]  # one item and a colour off the vocabulary: an optional generic Color, marked for review
    assert teapot.schema.names == ["Color"] and not teapot.schema.aspects[0].required and teapot.review


def test_induction_is_deterministic_and_the_shipped_file_is_its_output(tmp_path: Path, cli_env: dict[str, str]) -> None:
    rows = _rows()
    assert induce(rows) == induce(list(reversed(rows)))
    if not (ABO / "listings.jsonl").is_file():
        pytest.skip(f"the ABO data is not at {ABO}: the shipped file cannot be re-derived here")
    out = tmp_path / "abo.json"
    cmd = [opal_bin(), "schemas", "induce", "--data", str(ABO), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == (INDUCED_DIR / "abo.json").read_bytes()  # `make schemas-abo` reproduces it byte for byte
    assert out.with_suffix(".review.md").read_text() == (INDUCED_DIR / "abo.review.md").read_text()
    induced = read_bulk(out)
    assert len(induced) == 298 and all(s.aspects for s in induced.values())
    doc = json.loads(out.read_text())
    assert all("evidence" in c and all("evidence" in a for a in c["aspects"]) for c in doc["categories"])
