"""The evaluation run: baseline logic (pure) and `opal eval run` against the real tiny model on vLLM."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

import training.evaluate as ev
from opal.embedded import free_port
from opal.samples import SAMPLE_DIR
from tests.support import REPO, opal_bin
from training.abo import ListingRecord, load_abo, split_of
from training.eval_report import plot_series, write_eval
from training.evaluate import (
    MAJORITY,
    MODEL,
    RETRIEVAL,
    SWAPPED,
    EvalConfig,
    InSampleError,
    check_in_sample,
    derangement,
    majority_baseline,
    retrieval_predictions,
    select,
)
from training.metrics import aspect_accuracy, canonical_json, distinct_titles, parse_prediction, report_aspects
from training.retrieval import DIM, RetrievalBaseline, embed_image


def rec(i: int, category: str, title: str, image: Path = Path("x.jpg"), **aspects: str) -> ListingRecord:
    return ListingRecord(f"i{i}", image, title, category, dict(aspects))


def test_majority_baseline_uses_common_aspects_and_the_most_typical_title() -> None:
    train = [
        rec(1, "shoes", "white leather court shoe", Color="white", Material="leather"),
        rec(2, "shoes", "white court shoe", Color="white"),
        rec(3, "shoes", "black running shoe", Color="black"),
        rec(4, "rug", "red wool rug", Color="red"),
    ]
    predict = majority_baseline(train)
    title, aspects = parse_prediction(predict(rec(9, "shoes", "anything"))) or ("", {})
    assert aspects == {"Color": "white"}  # Material: only 1 of 3 shoes have it
    assert title == "white court shoe"  # highest mean ROUGE-L to the other titles
    assert parse_prediction(predict(rec(9, "boot", "unseen category"))) == ("", {})


def test_split_selection_is_deterministic_and_limited() -> None:
    records = list(load_abo(SAMPLE_DIR))
    assert select(records, "all", 5) == sorted(records, key=lambda r: r.item_id)[:5]
    assert all(split_of(r) == "train" for r in select(records, "train", None))
    assert select(records, "test", None) == select(list(reversed(records)), "test", None)


def sample_photos(n: int) -> list[Path]:
    return sorted((SAMPLE_DIR / "images").glob("*.jpg"))[:n]


def test_embedding_is_unit_norm_and_deterministic() -> None:
    photo = sample_photos(1)[0]
    a, b = embed_image(photo), embed_image(photo)
    assert a.shape == (DIM,) and a.dtype == np.float32
    assert np.array_equal(a, b) and abs(float(np.linalg.norm(a)) - 1.0) < 1e-5


def test_retrieval_finds_the_training_item_with_the_same_photo(tmp_path: Path) -> None:
    photos = sample_photos(12)
    train = [rec(i, "shoes", f"title {i}", p, Color=f"c{i}") for i, p in enumerate(photos)]
    train.append(rec(99, "rug", "the only rug", photos[0], Color="red"))
    baseline = RetrievalBaseline(train)
    assert len(baseline) == 13 and baseline.skipped == 0
    for i, p in enumerate(photos):  # the exact photo, copied elsewhere: found by content, not by path
        query = tmp_path / f"q{i}.jpg"
        shutil.copyfile(p, query)
        hit = baseline.nearest("shoes", query)
        assert hit is not None and hit.item_id == f"i{i}"
    outputs, neighbours = retrieval_predictions(baseline, [rec(200, "shoes", "?", photos[3]), rec(201, "boot", "?", photos[3])])
    assert outputs["i200"] == canonical_json("title 3", {"Color": "c3"}) and neighbours == {"i200": "i3"}
    assert outputs["i201"] == canonical_json("", {}) and "i201" not in neighbours  # no training item of the category
    assert baseline.nearest("shoes", tmp_path / "missing.jpg") is None


def test_derangement_moves_every_photo_within_its_category_deterministically() -> None:
    items = [rec(i, "shoes", "t") for i in range(7)] + [rec(10 + i, "rug", "t") for i in range(2)] + [rec(20, "boot", "t")]
    swap = derangement(items, seed=1)
    category = {r.item_id: r.category for r in items}
    assert set(swap) == {r.item_id for r in items} - {"i20"}  # alone in its category: keeps its photo
    assert all(donor != item for item, donor in swap.items())
    assert all(category[donor] == category[item] for item, donor in swap.items())
    assert sorted(swap.values()) == sorted(swap)  # a permutation: every photo is used once
    assert swap == derangement(list(reversed(items)), seed=1)  # independent of input order
    assert any(derangement(items, seed=s) != swap for s in range(2, 6))  # the seed matters


def test_aspect_accuracy_counts_only_references_with_the_aspect() -> None:
    refs = [
        {"id": "a", "category": "shoes", "title": "x", "aspects": {"Color": "White", "Material": "leather"}},
        {"id": "b", "category": "shoes", "title": "y", "aspects": {"Color": "black"}},
        {"id": "c", "category": "shoes", "title": "z", "aspects": {"Shoe Style": "court"}},
        {"id": "d", "category": "rug", "title": "w", "aspects": {"Color": "red"}},
    ]
    preds = {
        "a": canonical_json("x", {"color": " white.", "Material": "suede"}),  # names and values compared normalised
        "b": "{not json",  # unparseable: wrong
        "c": canonical_json("z", {"Color": "red"}),  # reference has no colour: not counted
        # d: no prediction at all: wrong
    }
    acc = aspect_accuracy(preds, refs, ["Color", "Material", "Pattern"])
    assert (acc["Color"].correct, acc["Color"].n, acc["Color"].accuracy) == (1, 3, 1 / 3)
    assert (acc["Material"].correct, acc["Material"].n) == (0, 1)
    assert acc["Pattern"].n == 0 and acc["Pattern"].accuracy is None
    assert report_aspects(refs, min_share=0.25) == ["Color", "Material", "Shoe Style"]
    assert report_aspects(refs, min_share=0.5) == ["Color", "Material"]


def test_distinct_titles_per_category() -> None:
    refs = [{"id": str(i), "category": "shoes" if i < 3 else "rug", "title": "", "aspects": {}} for i in range(5)]
    preds = {"0": canonical_json("Same", {}), "1": canonical_json("same.", {}), "2": canonical_json("other", {}), "3": "loop loop"}
    assert distinct_titles(preds, refs) == {"rug": (2, 2), "shoes": (2, 3)}  # "4" has no prediction: counts as ""


def test_in_sample_fitting_is_refused_unless_allowed() -> None:
    fit = [rec(i, "shoes", "t") for i in range(3)]
    assert check_in_sample(fit, [rec(7, "shoes", "t")], allow=False, source=Path("d")) == 0
    with pytest.raises(InSampleError, match="in-sample"):
        check_in_sample(fit, [rec(1, "shoes", "t"), rec(7, "shoes", "t")], allow=False, source=Path("d"))
    assert check_in_sample(fit, [rec(1, "shoes", "t")], allow=True, source=Path("d")) == 1


def test_run_eval_refuses_in_sample_before_any_request() -> None:
    down = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(InSampleError):
        asyncio.run(ev.run_eval(EvalConfig(data=SAMPLE_DIR, endpoint=down, split="all")))


def photo_reader(listing: Mapping[Path, str]) -> Callable[..., object]:
    """A fake `_generate_all`: a perfect photo reader that writes the listing of whichever item's photo it gets."""

    async def fake(config: EvalConfig, items: Sequence[ListingRecord], swap: Mapping[str, str], progress: object) -> ev._Generated:
        photo = {r.item_id: r.image for r in items}
        outputs = {MODEL: {r.item_id: listing[r.image] for r in items}, SWAPPED: {i: listing[photo[d]] for i, d in swap.items()}}
        return ev._Generated("fake@1", outputs, {MODEL: Counter(ok=len(items)), SWAPPED: Counter(ok=len(swap))})

    return fake


def test_report_has_baselines_swap_deltas_aspect_accuracy_and_titles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    records = list(load_abo(SAMPLE_DIR))
    monkeypatch.setattr(ev, "_generate_all", photo_reader({r.image: canonical_json(r.title, r.aspects) for r in records}))
    result = asyncio.run(ev.run_eval(EvalConfig(data=SAMPLE_DIR, endpoint="http://unused/v1", split="all", allow_in_sample=True)))
    rows = dict(result.table())
    assert list(result.predictions) == [MODEL, SWAPPED, MAJORITY, RETRIEVAL]
    assert len(result.swap) == 40 and result.in_sample == result.n_train == 27
    assert rows[MODEL]["exact_match"] == 1.0 and rows[MODEL]["colour_accuracy"] == 1.0
    deltas = result.deltas()
    assert deltas["exact_match"] == 1.0 - float(rows[SWAPPED]["exact_match"] or 0) and (deltas["colour_accuracy"] or 0) > 0
    assert result.aspect_names[:2] == ["Color", "Material"]
    assert rows[MAJORITY]["distinct_titles"] <= len(result.titles["reference"])  # one title per category
    write_eval(result, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["baseline_fitted_in_sample"] is True and report["swap_control"]["swapped_items"] == 40
    assert set(report["aspect_accuracy"][RETRIEVAL]) >= {"Color", "Material"}
    assert report["guaranteed_by_constrained_decoding"] == ["json_valid", "schema_recall"]
    md = (tmp_path / "report.md").read_text()
    for text in ("baseline fitted in-sample", "guaranteed by constrained decoding", "| retrieval baseline |", "true photos minus swapped"):
        assert text in md, text
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(x["photo_of"] != x["id"] for x in lines if x["system"] == SWAPPED)
    groups, series = plot_series(result)
    assert set(series) == set(result.predictions) and all(len(v) == len(groups) for v in series.values())


def eval_run(endpoint: str, out: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [opal_bin(), "eval", "run", "--endpoint", endpoint, "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.mark.vllm
def test_eval_run_scores_the_model_baselines_and_the_swap_control(vllm_url: str, tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "eval"
    r = eval_run(vllm_url, out, cli_env, "--data", str(SAMPLE_DIR), "--split", "all", "--allow-in-sample")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == 40 and report["failed"] == 0 and report["swap_control"]["failed"] == 0
    assert list(report["systems"]) == [MODEL, SWAPPED, MAJORITY, RETRIEVAL]
    assert report["baseline_fitted_in_sample"] is True and report["swap_control"]["swapped_items"] == 40
    model = report["systems"][MODEL]
    assert model["json_valid"] == 1.0 and model["schema_recall"] == 1.0  # schema-constrained decoding
    assert set(report["swap_control"]["deltas"]) >= {"rouge_l_f1", "aspect_f1", "colour_accuracy"}
    assert all(0.0 <= v <= 1.0 for s in report["systems"].values() for k, v in s.items() if k not in ("n", "distinct_titles"))
    assert set(report["aspect_accuracy"][MODEL]) >= {"Color", "Material"}
    assert set(report["distinct_titles"]) == {"reference", MODEL, SWAPPED, MAJORITY, RETRIEVAL}
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 160
    train_ids = {x["id"] for x in lines if x["system"] == MODEL} & {r.item_id for r in load_abo(SAMPLE_DIR) if split_of(r) == "train"}
    assert all(x["neighbour"] == x["id"] for x in lines if x["system"] == RETRIEVAL and x["id"] in train_ids)  # in-sample: itself
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| retrieval baseline |" in md and "baseline fitted in-sample" in md and "guaranteed by constrained decoding" in md
    for text in (SWAPPED, RETRIEVAL, "colour_accuracy", "true photos minus swapped", "per-aspect accuracy", "distinct titles"):
        assert text in r.stdout, text

    held_out = tmp_path / "held-out"
    r = eval_run(vllm_url, held_out, cli_env, "--data", str(SAMPLE_DIR), "--train-data", str(SAMPLE_DIR), "--no-swap-control")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((held_out / "report.json").read_text())
    assert report["split"] == "test" and report["baseline_fitted_in_sample"] is False and SWAPPED not in report["systems"]


def test_eval_run_refuses_in_sample_baselines_and_needs_data(tmp_path: Path, cli_env: dict[str, str]) -> None:
    down = f"http://127.0.0.1:{free_port()}/v1"
    r = eval_run(down, tmp_path, cli_env, "--data", str(SAMPLE_DIR), "--split", "all")
    assert r.returncode == 2 and "in-sample" in r.stdout and "--allow-in-sample" in r.stdout, r.stdout + r.stderr
    r = eval_run(down, tmp_path, cli_env, "--split", "test")
    assert r.returncode == 2 and "--data" in r.stdout + r.stderr, r.stdout + r.stderr


def test_eval_run_with_the_endpoint_down_is_a_clear_error(tmp_path: Path, cli_env: dict[str, str]) -> None:
    down = f"http://127.0.0.1:{free_port()}/v1"
    r = eval_run(down, tmp_path, cli_env, "--data", str(SAMPLE_DIR), "--limit", "2", "--split", "all", "--allow-in-sample")
    assert r.returncode == 2 and "failed after" in r.stdout, r.stdout + r.stderr
