"""The evaluation run: baseline logic (pure) and `opal eval run` against the real tiny model on vLLM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from opal.embedded import free_port
from opal.samples import SAMPLE_DIR
from tests.conftest import REPO, opal_bin
from training.abo import ListingRecord, load_abo, split_of
from training.evaluate import majority_baseline, select
from training.metrics import parse_prediction


def rec(i: int, category: str, title: str, **aspects: str) -> ListingRecord:
    return ListingRecord(f"i{i}", Path("x.jpg"), title, category, dict(aspects))


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


def eval_run(endpoint: str, out: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [opal_bin(), "eval", "run", "--endpoint", endpoint, "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.mark.vllm
def test_eval_run_scores_the_model_and_the_baseline(vllm_url: str, tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "eval"
    r = eval_run(vllm_url, out, cli_env, "--split", "all", "--limit", "12")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == 12 and report["failed"] == 0 and set(report["systems"]) == {"model", "majority baseline"}
    model = report["systems"]["model"]
    assert model["json_valid"] == 1.0 and model["schema_recall"] == 1.0  # schema-constrained decoding
    assert all(0.0 <= v <= 1.0 for s in report["systems"].values() for k, v in s.items() if k != "n")
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 24 and {json.loads(x)["system"] for x in lines} == {"model", "majority baseline"}
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| majority baseline |" in (out / "report.md").read_text()
    assert "majority baseline" in r.stdout


def test_eval_run_with_the_endpoint_down_is_a_clear_error(tmp_path: Path, cli_env: dict[str, str]) -> None:
    down = f"http://127.0.0.1:{free_port()}/v1"
    r = eval_run(down, tmp_path, cli_env, "--limit", "2", "--split", "all")
    assert r.returncode == 2 and "failed after" in r.stdout, r.stdout + r.stderr
