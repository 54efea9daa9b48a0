"""The paper's metrics, checked by hand on small cases and against rouge-score directly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from schemas.category import default_categories
from tests.support import REPO, opal_bin
from training.metrics import aspect_f1, canonical_json, norm, pairs, score

REG = default_categories()
REF = {"id": "1", "category": "shoes", "title": "White leather court shoes", "aspects": {"Color": "white", "Material": "leather"}}


def test_normalisation() -> None:
    assert norm("  Rose   Gold. ") == "rose gold"
    assert norm("Black!!") == "black"
    assert pairs({"Color ": " White.", "Heel  Type": "Kitten"}) == {("color", "white"), ("heel type", "kitten")}


def test_aspect_f1_by_hand() -> None:
    assert aspect_f1(set(), set()) == 1.0
    assert aspect_f1({("a", "1")}, set()) == 0.0
    assert aspect_f1(set(), {("a", "1")}) == 0.0
    # 1 of 2 predicted correct, 1 of 3 reference found: P=1/2, R=1/3, F1=0.4
    assert aspect_f1({("a", "1"), ("b", "2")}, {("a", "1"), ("c", "3"), ("d", "4")}) == pytest.approx(0.4)


def test_perfect_prediction_scores_one() -> None:
    out = json.dumps({"aspects": {"Material": "leather", "Color": "white"}, "title": "White leather court shoes"})
    r = score({"1": out}, [REF], REG)
    assert (r.rouge_l_f1, r.aspect_f1, r.schema_recall, r.json_valid, r.exact_match) == (1.0, 1.0, 1.0, 1.0, 1.0)


def test_every_category_is_scored_and_schema_recall_says_its_coverage() -> None:
    spaceship = {"id": "2", "category": "spaceship", "title": "Silver rocket", "aspects": {"Color": "silver"}}
    outs = {
        "1": json.dumps({"aspects": {"Color": "white", "Wingspan": "3 m"}, "title": "White shoes"}),  # half off the schema
        "2": json.dumps({"aspects": {"Color": "silver", "Thrust": "lots"}, "title": "Silver rocket"}),  # generic: Thrust is off it
    }
    r = score(outs, [REF, spaceship], REG)
    assert r.n == 2 and r.generic_items == 1 and r.schema_coverage == 0.5
    assert r.schema_recall == 0.5  # over the one reference with a category schema
    assert r.generic_schema_recall == 0.5  # the generic one, reported apart
    assert [e.generic for e in r.examples] == [False, True]


def test_rouge_matches_rouge_score_directly() -> None:
    pred = {"title": "White court shoes", "aspects": {"Color": "white", "Size": "42"}}
    r = score({"1": json.dumps(pred)}, [REF], REG)
    direct = (
        rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        .score(canonical_json(REF["title"], REF["aspects"]), canonical_json(pred["title"], pred["aspects"]))["rougeL"]
        .fmeasure
    )
    assert r.rouge_l_f1 == pytest.approx(direct)
    assert 0 < r.rouge_l_f1 < 1
    # aspects: {(color, white), (size, 42)} vs {(color, white), (material, leather)} -> P=R=1/2
    assert r.aspect_f1 == pytest.approx(0.5)
    assert r.schema_recall == pytest.approx(1.0)  # Size is declared for shoes (non-visual, still in the schema)


def test_schema_recall_and_invalid_outputs() -> None:
    refs = [REF, dict(REF, id="2"), dict(REF, id="3")]
    preds = {
        "1": json.dumps({"title": "x", "aspects": {"Color": "white", "Flavour": "mint", "Wheels": "two"}}),  # 1/3 allowed
        "2": "{not json",  # invalid: no pairs, no schema recall, raw text for ROUGE
        "3": json.dumps({"title": "x", "aspects": {}}),  # valid, no aspects: left out of schema recall
    }
    r = score(preds, refs, REG)
    assert r.schema_recall == pytest.approx(1 / 3)
    assert r.json_valid == pytest.approx(2 / 3)
    assert [e.aspect_f1 for e in r.examples] == [pytest.approx(0.4), 0.0, 0.0]
    assert r.per_aspect["color"] == (pytest.approx(1.0), pytest.approx(1 / 3), 1, 3)


def test_missing_prediction_counts_as_invalid() -> None:
    r = score({}, [REF], REG)
    assert r.missing_predictions == 1 and r.json_valid == 0.0 and r.aspect_f1 == 0.0


def test_cli_json_output(tmp_path: Path) -> None:
    pred = tmp_path / "p.jsonl"
    ref = tmp_path / "r.jsonl"
    pred.write_text(json.dumps({"id": "1", "output": json.dumps({"title": REF["title"], "aspects": REF["aspects"]})}) + "\n")
    ref.write_text(json.dumps(REF) + "\n")
    out = subprocess.run(
        [opal_bin(), "eval", "score", "--pred", str(pred), "--ref", str(ref), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "rouge_l_f1": 1.0,
        "aspect_f1": 1.0,
        "schema_recall": 1.0,
        "json_valid": 1.0,
        "n": 1,
        "schema_coverage": 1.0,
        "generic_items": 0,
        "generic_schema_recall": None,
    }
    table = subprocess.run(
        [opal_bin(), "eval", "score", "--pred", str(pred), "--ref", str(ref)], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert table.returncode == 0 and "rouge_l_f1" in table.stdout and "per aspect name" in table.stdout
