"""MACE and LACU endpoint passes: resumable JSONL, failures counted (never a crash), on garbage and on the real server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from inference.client import ListingClient
from schemas.category import default_categories
from tests.support import REPO, opal_bin
from training.abo import load_abo
from training.mllm_passes import run_lacu, run_mace

SAMPLE = REPO / "data" / "sample"
REG = default_categories()


def _records(n: int) -> list[Any]:
    return list(load_abo(SAMPLE))[:n]


def _fake(outputs: list[str]) -> ListingClient:
    """A client whose 'server' answers with the given contents in turn (pure-logic test of the runners)."""
    state = {"i": 0}

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "fake@1"}]})
        text = outputs[state["i"] % len(outputs)]
        state["i"] += 1
        return httpx.Response(200, json={"model": "fake@1", "choices": [{"message": {"content": text}}]})

    return ListingClient(["http://fake/v1"], transport=httpx.MockTransport(handler), logprobs=False, backoff_base_s=0.001)


def test_garbage_outputs_are_counted_and_reruns_resume(tmp_path: Path) -> None:
    recs = _records(6)
    good = json.dumps({"title": "a clean title", "aspects": {"Color": "black"}})
    out = tmp_path / "mace.jsonl"

    async def go(outputs: list[str]) -> Any:
        async with _fake(outputs) as c:
            return await run_mace(recs, c, out, REG, concurrency=3, progress=False)

    s1 = asyncio.run(go(["", "{not json", good]))  # two of every three answers are garbage
    assert s1.done + s1.failed == 6 and s1.failed >= 3 and s1.failures["invalid_output"] == s1.failed
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == s1.done
    assert {"original", "deterministic", "refined", "mllm_dropped"} <= set(lines[0])
    s2 = asyncio.run(go([good]))  # rerun: done items skipped, failed ones retried
    assert s2.skipped == s1.done and s2.done == s1.failed and s2.failed == 0
    assert len(out.read_text().splitlines()) == 6


def test_lacu_rejects_short_or_contradicting_conversations(tmp_path: Path) -> None:
    rows = [{"item_id": "1", "category": "shoes", "image": "", "refined": {"title": "white court shoes", "aspects": {"Color": "white"}}}]
    five = [{"buyer": f"Question {i}?", "seller": f"Answer {i}."} for i in range(5)]
    contradicting = [{"buyer": "What colour is it?", "seller": "It is black."}, *five]
    out = tmp_path / "lacu.jsonl"

    async def go(outputs: list[str]) -> Any:
        async with _fake(outputs) as c:
            return await run_lacu(rows, c, out, REG, progress=False)

    assert asyncio.run(go([json.dumps({"turns": five[:3]})])).failed == 1
    assert asyncio.run(go([json.dumps({"turns": contradicting})])).failed == 1
    assert asyncio.run(go([json.dumps({"turns": five})])).done == 1
    assert len(json.loads(out.read_text())["turns"]) == 5


@pytest.mark.vllm
def test_mace_and_lacu_against_the_real_server(vllm_url: str, tmp_path: Path) -> None:
    recs = _records(6)

    async def go() -> Any:
        async with ListingClient([vllm_url], max_concurrency=6, max_tokens=128) as c:
            mace = await run_mace(recs, c, tmp_path / "mace.jsonl", REG, progress=False)
            rows = [json.loads(x) for x in (tmp_path / "mace.jsonl").read_text().splitlines()]
            lacu = await run_lacu(rows, c, tmp_path / "lacu.jsonl", REG, progress=False)
            return mace, lacu

    mace, lacu = asyncio.run(go())
    assert mace.done + mace.failed == 6 and lacu.done + lacu.failed == mace.done
    for line in (tmp_path / "mace.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert REG.get(row["category"]).check(row["refined"]["aspects"]).unknown_keys == []  # constrained to the schema


@pytest.mark.vllm
def test_data_cli_through_the_endpoint(vllm_url: str, tmp_path: Path) -> None:
    import subprocess

    mace, lacu = tmp_path / "m.jsonl", tmp_path / "l.jsonl"
    r = subprocess.run(
        [opal_bin(), "data", "mace", "--endpoint", vllm_url, "--limit", "3", "--out", str(mace)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    s = json.loads((tmp_path / "m.summary.json").read_text())
    assert s["total"] == 3 and s["done"] + s["failed"] == 3 and len(mace.read_text().splitlines()) == s["done"]
    r = subprocess.run(
        [opal_bin(), "data", "lacu", "--endpoint", vllm_url, "--mace", str(mace), "--out", str(lacu)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((tmp_path / "l.summary.json").read_text())["total"] == s["done"]
