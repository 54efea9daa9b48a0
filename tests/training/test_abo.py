"""ABO loader: aspects derived from catalogue + Q&A respect the schema; splits are deterministic and grouped."""

from __future__ import annotations

from schemas.category import default_categories
from tests.support import REPO
from training.abo import ListingRecord, aspects_from_catalogue, group_key, load_abo, split_of

SAMPLE = REPO / "data" / "sample"
REG = default_categories()


def test_sample_loads_with_schema_valid_aspects() -> None:
    recs = list(load_abo(SAMPLE))
    assert len(recs) == 40
    for r in recs:
        assert r.image.exists()
        check = REG.get(r.category).check(r.aspects)
        assert not check.unknown_keys and not check.invalid_values, (r.item_id, r.aspects)
    first = recs[0]
    assert first.item_id == "00020b5a"
    assert first.aspects == {"Color": "white", "Toe Shape": "pointed", "Material": "leather", "Heel Type": "kitten"}
    assert sum(len(r.aspects) for r in recs) >= 80  # the Q&A adds aspects beyond colour


def test_qa_mapping_rules() -> None:
    shoes = REG.get("shoes")
    qa = [
        ("What colour is the shoe", "Gray"),
        ("What type of heel does it have", "block"),
        ("What is the upper made of", "suede"),
        ("How many shoes are shown", "two"),
        ("What is the shape of the toe", "round"),
        ("What is the brand", "nike"),
    ]
    assert aspects_from_catalogue(None, qa, shoes) == {"Color": "grey", "Heel Type": "block", "Material": "suede", "Toe Shape": "round"}
    # the catalogue colour wins over a Q&A colour; values outside closed sets are dropped
    assert aspects_from_catalogue("black", [("main color?", "white"), ("material?", "unobtainium")], shoes) == {"Color": "black"}


def test_splits_are_deterministic_and_keep_variants_together() -> None:
    recs = list(load_abo(SAMPLE))
    assert [split_of(r) for r in recs] == [split_of(r) for r in list(load_abo(SAMPLE))]
    a = ListingRecord("id-1", SAMPLE, "find. women's kitten heel court, white, 7 uk", "shoes", {})
    b = ListingRecord("id-2", SAMPLE, "find. women's kitten heel court, black, 5 uk", "shoes", {})
    assert group_key(a.title) == group_key(b.title) == "find women s kitten"
    assert split_of(a) == split_of(b)
    # every bucket is reachable; the item split sends these two variants wherever their ids hash
    splits = [split_of(ListingRecord(f"x{i}", SAMPLE, "same title", "shoes", {}), by="item") for i in range(300)]
    assert {"train", "validation", "test"} == set(splits) and 0.7 < splits.count("train") / 300 < 0.9
