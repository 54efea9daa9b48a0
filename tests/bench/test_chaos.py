"""The fast subset of bench/chaos.py on the session's real stack and vLLM: a hostile flood of every
kind (each with its expected dead-letter reason) and kill -9 cycles of the worker under load."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import Harness, flood, kill9, table
from bench.hostile import hostile_records, prepare_root
from opal.embedded import EmbeddedStack

pytestmark = pytest.mark.vllm


@pytest.fixture
def harness(stack: EmbeddedStack, vllm_url: str, tmp_path: Path) -> Harness:
    prepare_root(tmp_path / "images", 2_000_000)
    return Harness(stack.settings, vllm_url, tmp_path / "images", tmp_path)


def test_hostile_kinds_cover_the_issue_list(tmp_path: Path) -> None:
    prepare_root(tmp_path, 2_000_000)
    recs = hostile_records(tmp_path, 1)
    assert len({r.kind for r in recs}) >= 20
    assert {"uri-1mb", "aspect-event-over-1mb", "decompression-bomb", "cloud-metadata-ssrf", "prompt-injection"} <= {r.kind for r in recs}


def test_flood_every_record_one_output_with_the_right_reason(harness: Harness) -> None:
    r = flood(harness, per_kind=2, good=20, oversize=1)
    assert r.ok and r.lost == 0 and r.dependency_dead_letters == 0 and r.wrong_reason == 0, table([r])
    assert r.duplicates == 0 and r.outputs == r.records_in, table([r])


def test_kill9_cycles_lose_nothing(harness: Harness) -> None:
    r = kill9(harness, cycles=2, good=60)
    assert r.ok and r.lost == 0 and r.dependency_dead_letters == 0, table([r])
