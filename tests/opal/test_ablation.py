"""`opal experiment ablation`: finished steps are skipped on a rerun, the table is built from the evaluations,
a folder holding another run is refused. (The full run trains and serves seven systems: docs/ABLATION.md.)"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from opal.ablation import ROWS, Ablation, AblationConfig
from training.evaluate import MAJORITY, MODEL, RETRIEVAL, SWAPPED
from training.progress import Reporter


def system(rouge: float, f1: float, colour: float) -> dict[str, float]:
    return {"rouge_l_f1": rouge, "aspect_f1": f1, "colour_accuracy": colour, "json_valid": 1.0, "schema_recall": 1.0}


def finished_run(out: Path) -> None:
    """Every step's completion marker, as a run that got to the end leaves them."""
    for r in ROWS:
        if r.model is None:
            continue
        (out / r.model).mkdir(parents=True)
        (out / r.model / "opal_model.json").write_text(json.dumps({"name": "opal-tiny", "version": r.model}))
        score = 0.1 * (ROWS.index(r))
        report = {
            "model": f"opal-tiny@{r.model}",
            "items": 386,
            "train_items": 4082,
            "systems": {
                MODEL: system(score, score / 2, score / 3),
                SWAPPED: system(score, score / 2 - 0.01, score / 3 - 0.05),
                MAJORITY: system(0.368, 0.263, 0.304),
                RETRIEVAL: system(0.469, 0.330, 0.427),
            },
        }
        (out / "eval" / r.model).mkdir(parents=True)
        (out / "eval" / r.model / "report.json").write_text(json.dumps(report))
    (out / "pairs.jsonl").write_text("")


def test_a_finished_run_only_rewrites_the_report(tmp_path: Path) -> None:
    finished_run(tmp_path)
    buf = io.StringIO()
    report = Ablation(AblationConfig(data=tmp_path / "abo", out=tmp_path), Reporter(Console(file=buf, width=200))).run()
    log = buf.getvalue()
    assert log.count("done earlier, skipped") == 11 and not re.search(r"\.\.\.$", log, re.M), log  # nothing ran
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == [r.label for r in ROWS]
    assert rows["majority baseline"]["aspect_f1"] == 0.263 and rows["majority baseline"]["swap_delta_colour"] is None
    assert rows["+ LACU"]["swap_delta_colour"] == pytest.approx(0.05) and rows["+ LACU"]["model"] == "opal-tiny@sft-lacu"
    md = (tmp_path / "report.md").read_text()
    assert "| + DPO | 0.600 | 0.300 | 0.200 | +0.050 | +0.010 | 1.000 | 1.000 | opal-tiny@dpo |" in md, md
    assert "† guaranteed by constrained decoding" in md
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "report.json").read_text())["test_items"] == 386


def test_a_folder_holding_another_run_is_refused(tmp_path: Path) -> None:
    finished_run(tmp_path)
    Ablation(AblationConfig(data=tmp_path / "abo", out=tmp_path), Reporter(Console(file=io.StringIO()))).check_inputs()
    with pytest.raises(ValueError, match="pairs_items: 1000 -> 10"):
        Ablation(AblationConfig(data=tmp_path / "abo", out=tmp_path, pairs_items=10)).check_inputs()


def test_an_unfinished_step_is_the_next_to_run(tmp_path: Path) -> None:
    finished_run(tmp_path)
    (tmp_path / "sft-lacu" / "opal_model.json").unlink()  # stopped while training: only checkpoints would be there
    (tmp_path / "pairs.jsonl").unlink()
    steps = Ablation(AblationConfig(data=tmp_path / "abo", out=tmp_path)).steps()
    pending = [s.name for s in steps if not s.done()]
    assert pending == ["sft-lacu", "pairs"], pending
    sft = next(s for s in steps if s.name == "sft-lacu")
    assert sft.run is not None
