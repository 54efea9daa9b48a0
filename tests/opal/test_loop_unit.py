"""The round's crash recovery without models: a decided, unfinished promotion is finished once, never repeated."""

from __future__ import annotations

import json
from pathlib import Path

from opal.loop import DECISION, PROMOTED, RoundConfig, _pending_promotion
from training.registry import ModelRegistry


def _model(folder: Path, version: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "opal_model.json").write_text(json.dumps({"name": "opal-tiny", "version": version}))
    return folder


def test_a_crash_between_decision_and_promotion_is_finished_by_the_next_run_and_a_rollback_stays(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "registry")
    reg.register(_model(tmp_path / "a", "sft-1"))
    reg.register(_model(tmp_path / "b", "dpo-2"))
    reg.promote("sft-1")
    c = RoundConfig(registry=reg.root, deployment="default", shards=tmp_path, data=tmp_path, out=tmp_path / "rounds")
    folder = tmp_path / "rounds" / "sft-1-abc"
    folder.mkdir(parents=True)
    (folder / "pairs.jsonl").write_text("{}\n{}\n")
    (folder / DECISION).write_text(json.dumps({"status": "promoted", "candidate": "dpo-2", "parent": "sft-1", "reasons": ["ok"]}))
    done = _pending_promotion(reg, c, "sft-1")
    assert done is not None and (done.status, done.candidate, done.pairs) == ("promoted", "dpo-2", 2)
    assert reg.current().version == "dpo-2" and (folder / PROMOTED).is_file()  # type: ignore[union-attr]
    reg.rollback(reason="operator")
    assert _pending_promotion(reg, c, "sft-1") is None and reg.current().version == "sft-1"  # type: ignore[union-attr]
