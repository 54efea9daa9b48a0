"""MACE deterministic rules on real ABO titles (data/sample): what must go, what must stay."""

from __future__ import annotations

import pytest

from schemas.category import default_categories
from training.mace import refine, refine_aspects, refine_title

REG = default_categories()

CASES = [
    # (category, real title, must be gone, must stay, reason of a removal)
    ("shoes", "find. women's kitten heel court, white, 7 uk", ["7 uk"], ["kitten heel court", "white"], "size"),
    (
        "shoes",
        "amazon essentials boys' rumor sneaker, black, 2 medium us big kid",
        ["2 medium us", "big kid"],
        ["sneaker", "black"],
        "size",
    ),
    (
        "home",
        "amazon brand - solimo printed fabric rectangular storage box, large, set of 6, medical blue",
        ["set of 6"],
        ["rectangular storage box", "medical blue"],
        "pack count",
    ),
    (
        "finenecklacebraceletanklet",
        '14k yellow gold 8mm round cubic zirconia solitaire pendant necklace (2 carat, diamond equivalent), 18"',
        ["14k", "8mm", "2 carat", '18"'],
        ["yellow gold", "round cubic zirconia solitaire pendant necklace"],
        "metal purity",
    ),
    (
        "finering",
        "sterling silver round and baguette diamond band (1/2 cttw, ij color, i2-i3 clarity)",
        ["1/2 cttw", "clarity"],
        ["sterling silver round and baguette diamond band"],
        "carat weight",
    ),
    ("finering", "10k gold swarovski crystal july birthstone ring, size 6", ["10k", "size 6"], ["gold swarovski crystal"], "size"),
    (
        "home_furniture_and_decor",
        'stone & beam lauren down filled oversized ottoman with hardwood frame, 46.5"w, pearl (renewed)',
        ["46.5", "renewed"],
        ["oversized ottoman", "pearl"],
        "condition",
    ),
    ("home_bed_and_bath", "amazonbasics pillowcase, dark grey, 50x75x2", ["50x75x2"], ["pillowcase", "dark grey"], "measurement"),
    (
        "accessory",
        "starter men's 2-pack golf web belt, amazon exclusive, black/vapor grey, one size",
        ["2-pack", "amazon exclusive", "one size"],
        ["golf web belt", "black/vapor grey"],
        "promotional",
    ),
    (
        "light_bulb",
        "amazonbasics 40 watt equivalent, clear, amber, dimmable, st19 led light bulb | 4-pack (renewed)",
        ["40 watt", "4-pack", "st19", "renewed"],
        ["clear", "amber", "led light bulb"],
        "model code",
    ),
    ("kitchen", "amazon brand - solimo 750-watt pop-up toaster (white)", ["750-watt"], ["pop-up toaster", "white"], "wattage"),
    ("kitchen", "amazonbasics induction cooktop 1300 watt", ["1300"], ["induction cooktop"], "wattage"),
    (
        "suitcase",
        "amazon brand - solimo 78 cm blue softsided check-in suitcase with wheels",
        ["78 cm"],
        ["blue softsided check-in suitcase with wheels"],
        "measurement",
    ),
    (
        "rug",
        "amazon basics modern plush high-pile shag area rug - 5x8 (4'11\" x 7'8\"), ivory",
        ["5x8", "4'11"],
        ["shag area rug", "ivory"],
        "measurement",
    ),
    (
        "cellular_phone_case",
        "amazon brand - solimo designer floral printed hard back case mobile cover formoto e5 plus (d386)",
        ["d386", " e5 "],
        ["floral printed hard back case"],
        "model code",
    ),
    (
        "office_products",
        "amazonbasics rubber bands (renewed) 25-pack size 19 tan",
        ["25-pack", "size 19", "renewed"],
        ["rubber bands", "tan"],
        "pack count",
    ),
    (
        "shoes",
        "nike air max 🔥🔥 SHIP FAST 50% OFF white sneakers",
        ["🔥", "SHIP FAST", "50% OFF"],
        ["nike air max", "white sneakers"],
        "emoji",
    ),
]


@pytest.mark.parametrize(("category", "title", "gone", "stay", "reason"), CASES, ids=[c[1][:40] for c in CASES])
def test_title_rules(category: str, title: str, gone: list[str], stay: list[str], reason: str) -> None:
    refined, removed = refine_title(title, REG.get(category))
    padded = f" {refined} "
    for g in gone:
        assert g not in padded, f"{g!r} survived in {refined!r}"
    for s in stay:
        assert s in refined, f"{s!r} was lost from {refined!r}"
    assert reason in {r.reason for r in removed}
    assert refined == refined.strip(" ,;-|")


def test_visible_codes_in_closed_sets_stay() -> None:
    refined, _ = refine_title("amazonbasics led e14 small edison screw candle bulb, a19 shape, 3d printed", REG.get("light_bulb"))
    assert "e14" in refined and "a19" in refined and "3d printed" in refined


def test_clean_titles_are_untouched() -> None:
    for title in ("franklin tailored men's flower textured tie, pink", "amazonbasics passage door knob, bell, antique brass"):
        refined, removed = refine_title(title)
        assert refined == title and removed == []


def test_aspects_keep_only_visual_declared_valid_pairs() -> None:
    shoes = REG.get("shoes")
    kept, dropped = refine_aspects(
        {"colour": "Gray", "Size": "7 UK", "Shipping": "fast", "Material": "unobtainium", "Heel Type": "kitten"}, shoes
    )
    assert kept == {"Color": "grey", "Heel Type": "kitten"}
    assert {(d.text.split("=")[0], d.reason) for d in dropped} == {
        ("Size", "not visually inferable"),
        ("Shipping", "not in the category schema"),
        ("Material", "value outside the schema"),
    }


def test_refine_keeps_provenance() -> None:
    r = refine("x1", "find. women's kitten heel court, white, 7 uk", {"Color": "white", "Size": "7"}, REG.get("shoes"))
    assert r.original_title.endswith("7 uk") and r.title == "find. women's kitten heel court, white"
    assert r.original_aspects == {"Color": "white", "Size": "7"} and r.aspects == {"Color": "white"}
    assert r.removed[0].reason == "size" and r.dropped_aspects[0].reason == "not visually inferable"
