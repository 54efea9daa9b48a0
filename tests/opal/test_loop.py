"""An improvement round end to end on the tiny model: pairs -> DPO -> two vLLM evaluations -> gate -> registry.

Real vLLM and TRL through the CLI; the pairs are the judge's shape (chosen = reference, rejected = a wrong
listing) written where the preference builder writes them. A crash mid-round resumes; a second round with
no new pairs does nothing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from opal.demo import DEMO_MODEL
from opal.samples import SAMPLE_DIR
from tests.support import REPO, opal_bin, synthetic_pairs
from training.preferences import write_pairs
from training.registry import ModelRegistry
from training.rounds import shard_for

pytestmark = [pytest.mark.vllm, pytest.mark.model_env]


def test_a_round_trains_evaluates_gates_resumes_and_then_has_nothing_to_do(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = {**cli_env, "OPAL_MODELS_REGISTRY": str(tmp_path / "registry")}
    reg = ModelRegistry(tmp_path / "registry")
    current = reg.register(DEMO_MODEL, note="shipped")
    reg.promote(current.version)
    shards = tmp_path / "shards"
    write_pairs(synthetic_pairs(12, version=current.version), shard_for(shards, current.version))

    def round_(data: Path) -> subprocess.CompletedProcess[str]:
        cmd = [opal_bin(), "loop", "round", "--data", str(data), "--shards", str(shards), "--out", str(tmp_path / "rounds")]
        return subprocess.run([*cmd, "--min-pairs", "5"], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)

    crashed = round_(tmp_path / "no-such-data")  # DPO and registration happen, then the evaluation cannot start
    assert crashed.returncode == 2 and "step 2/5 dpo" in crashed.stdout, crashed.stdout[-3000:] + crashed.stderr[-2000:]
    r = round_(SAMPLE_DIR)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    for step in ("pairs", "dpo", "register"):
        assert re.search(rf"step \d/5 {step}: done earlier, skipped", r.stdout), r.stdout[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"round: 12 preference pairs, candidate (dpo-[0-9a-f]{12}) (promoted|kept)", last)
    assert m, last
    candidate, status = m.groups()
    manifest = reg.get(candidate).manifest
    assert candidate in reg.versions() and manifest["parent"] == current.version and manifest["pairs"] == 12
    assert len(manifest["pairs_file_sha256"]) == 64 and manifest["card"]["version"] == candidate
    assert reg.current().version == (candidate if status == "promoted" else current.version)  # type: ignore[union-attr]
    (folder,) = (tmp_path / "rounds").glob(f"{current.version}-*")
    report = (folder / "report.md").read_text()
    assert f"**Decision: {status}**" in report and "true minus swapped" in report and (folder / "metrics.png").is_file()
    again = round_(SAMPLE_DIR)  # the pairs are in the ledger now: nothing new for either version
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1].endswith("fewer than needed; nothing to do"), again.stdout
