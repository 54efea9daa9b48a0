"""`opal backfill` on the real broker: kill -9 and resume, rejects, lag-aware throttling, S3 (moto) and Parquet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import ListingImageEvent
from schemas.serde import EventCodec
from schemas.settings import OpalSettings
from tests.support import REPO, free_port, opal_bin, read_to_end, settings_env, wait_for
from topology.admin import apply_topology
from topology.declared import build_topology
from workers.backfill import AckWindow, BackfillError, _lock
from workers.inventory import backfill_event_id, write_parquet
from workers.kafka_clients import make_admin, make_consumer

CODEC = EventCodec(ListingImageEvent)


@given(st.integers(1, 60).flatmap(lambda n: st.permutations(range(1, n + 1))))
def test_the_checkpoint_is_the_longest_finished_prefix(order: list[int]) -> None:
    w = AckWindow(0)
    for r in range(1, len(order) + 1):
        w.start(r)
    finished: set[int] = set()
    for r in order:
        w.finish(r)
        finished.add(r)
        prefix = 0
        while prefix + 1 in finished:
            prefix += 1
        assert w.done_through == prefix
        assert w.in_flight == len(order) - len(finished)


def test_one_run_per_checkpoint(tmp_path: Path) -> None:
    held = _lock(tmp_path / "inv.lock", "inv.jsonl")
    try:
        with pytest.raises(BackfillError, match=r"another backfill of inv\.jsonl is running"):
            _lock(tmp_path / "inv.lock", "inv.jsonl")
    finally:
        held.close()
    _lock(tmp_path / "inv.lock", "inv.jsonl").close()  # free again once the first run ended


def _inventory(path: Path, n: int) -> tuple[dict[str, str], dict[int, str]]:
    """``n`` lines: (event id per valid listing, reason fragment per bad line)."""
    ids: dict[str, str] = {}
    bad: dict[int, str] = {}
    with path.open("w") as f:
        for i in range(1, n + 1):
            if i % 250 == 7:
                f.write('{"listing_id": "broken\n')
                bad[i] = "not JSON"
                continue
            rec: dict[str, Any] = {"listing_id": f"L{i}", "category": "SHOES", "title": f"shoe {i}"}
            if i % 250 == 9:
                bad[i] = "image_uri"
            else:
                rec["image_uri"] = f"https://img.example.com/{i}.jpg"
                ids[rec["listing_id"]] = backfill_event_id(rec["listing_id"], "SHOES", [rec["image_uri"]], rec["title"], {})
            f.write(json.dumps(rec) + "\n")
    return ids, bad


def _checkpoint(state: Path) -> dict[str, Any]:
    files = list(state.glob("*.checkpoint.json"))
    return json.loads(files[0].read_text()) if files else {}


def test_kill_9_and_rerun_publishes_every_listing_once_more_at_most_the_window(
    settings: OpalSettings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    s = settings
    apply_topology(make_admin(s.kafka), build_topology(s))
    inv = tmp_path / "inventory.jsonl"
    ids, bad = _inventory(inv, 5000)
    state = tmp_path / "state"
    window = 200
    cmd = [opal_bin(), "backfill", str(inv), "--state-dir", str(state), "--window", str(window), "--max-lag", "1000000"]
    env = settings_env(s, cli_env)
    first = subprocess.Popen([*cmd, "--rate", "1500"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _checkpoint(state).get("rows_done", 0) >= 1500, 60, "1,500 rows checkpointed")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    at_kill = _checkpoint(state)
    assert not at_kill["finished"] and at_kill["rows_done"] < 5000

    second = subprocess.run([*cmd, "--rate", "0"], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.strip().endswith(
        f"backfill: 5,000 rows, {len(ids):,} published to {s.topics.images_backfill}, {len(bad)} rejected"
    )

    sent = read_to_end(s, s.topics.images_backfill, CODEC)
    per_listing = Counter(ev.listing_id for _, ev in sent)
    assert set(per_listing) == set(ids), "every valid listing published, nothing else"
    resent = len(sent) - len(per_listing)
    assert resent <= window, f"{resent} re-sends; the window allows {window}"
    assert all(ev.event_id == ids[ev.listing_id] and key == ev.listing_id.encode() for key, ev in sent), "re-sends keep their ids"

    rejects = [json.loads(ln) for ln in next(state.glob("*.rejects.jsonl")).read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == sorted(bad), "each bad line reported once, also across the crash"
    assert all(bad[r["line"]] in r["reason"] for r in rejects)

    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already backfilled" in again.stdout, again.stdout
    assert len(read_to_end(s, s.topics.images_backfill, CODEC)) == len(sent), "a finished backfill sends nothing"

    with inv.open("a") as f:  # tomorrow's export at the same path: a new backfill, unchanged rows keep their ids
        f.write(json.dumps({"listing_id": "NEW", "category": "SHOES", "image_uri": "https://img.example.com/new.jpg"}) + "\n")
    new = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert new.returncode == 0 and f"5,001 rows, {len(ids) + 1:,} published" in new.stdout, new.stdout
    everything = read_to_end(s, s.topics.images_backfill, CODEC)
    assert Counter(ev.listing_id for _, ev in everything) - per_listing == Counter([*ids, "NEW"])
    assert all(ev.event_id == ids[ev.listing_id] for _, ev in everything if ev.listing_id != "NEW")


def test_throttles_while_the_enrichment_backlog_is_high(settings: OpalSettings, cli_env: dict[str, str], tmp_path: Path) -> None:
    """No enrichment worker consumes: the job stops near --max-lag; once the group catches up it finishes."""
    s = settings
    apply_topology(make_admin(s.kafka), build_topology(s))
    inv = tmp_path / "inventory.jsonl"
    ids, bad = _inventory(inv, 1500)
    state = tmp_path / "state"
    max_lag = 400
    cmd = [opal_bin(), "backfill", str(inv), "--state-dir", str(state), "--max-lag", str(max_lag), "--rate", "0", "--window", "100"]
    proc = subprocess.Popen(cmd, env=settings_env(s, cli_env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    group = make_consumer(s.kafka, f"{s.worker.group_id}.backfill")
    try:
        wait_for(lambda: _checkpoint(state).get("throttled"), 60, "the backfill to throttle")
        held = _checkpoint(state)
        bound = max_lag + max_lag // 10 + 10  # measured every max_lag // 10 rows; deliveries race the measurement
        assert held["sent_through"] <= bound + len(bad) and held["max_lag_seen"] <= bound, held  # rows sent (rejects included)
        # measured, not slept: while the backlog stays high, the checkpoint keeps reporting throttled and no progress
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            now = _checkpoint(state)
            assert now.get("throttled") and now["sent_through"] == held["sent_through"], now
            time.sleep(0.2)
        group.subscribe([s.topics.images_backfill])  # the enrichment group catches up: a real consumer commits
        consumed = 0

        def drained() -> bool:
            nonlocal consumed
            while (m := group.poll(0.2)) is not None:
                if not m.error():
                    consumed += 1
                    group.store_offsets(m)
            group.commit(asynchronous=True) if consumed else None
            return proc.poll() is not None

        wait_for(drained, 120, "the backfill to finish once the group consumed")
    finally:
        group.close()
        proc.kill()
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out
    assert out.strip().endswith(f"{len(ids):,} published to {s.topics.images_backfill}, {len(bad)} rejected"), out
    final = _checkpoint(state)
    assert final["throttle_episodes"] >= 1 and final["throttled_s"] > 1.5 and final["max_lag_seen"] <= bound


def test_s3_parquet_inventory_dry_run_then_publish(settings: OpalSettings, cli_env: dict[str, str], tmp_path: Path) -> None:
    """An s3:// Parquet inventory through a real moto S3 server: dry run sends nothing; --restart resends the same ids."""
    import boto3

    s = settings
    apply_topology(make_admin(s.kafka), build_topology(s))
    port = free_port()
    moto = subprocess.Popen(
        [str(Path(opal_bin()).parent / "moto_server"), "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        aws = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        rows = [
            {"listing_id": f"P{i}", "category": "LAMP", "image_uris": [f"https://img.example.com/{i}.jpg"], "aspects": {"Color": "white"}}
            for i in range(30)
        ]
        rows.append({"listing_id": "P-bad", "category": "LAMP", "image_uris": ["gopher://x/y"]})
        local = tmp_path / "inv.parquet"
        write_parquet(rows, local)

        def ready() -> bool:
            try:
                client = boto3.client(
                    "s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
                )
                client.create_bucket(Bucket="inventories")
                client.upload_file(str(local), "inventories", "2026/inv.parquet")
                return True
            except Exception:  # not listening yet
                return False

        wait_for(ready, 30, "the moto S3 server")
        env = settings_env(s, cli_env) | aws
        cmd = [opal_bin(), "backfill", "s3://inventories/2026/inv.parquet", "--state-dir", str(tmp_path / "state"), "--rate", "0"]
        dry = subprocess.run([*cmd, "--dry-run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0 and dry.stdout.strip().endswith("backfill: 31 rows, 30 valid, 1 rejected"), dry.stdout + dry.stderr
        assert "scheme 'gopher' not allowed" in dry.stdout
        assert read_to_end(s, s.topics.images_backfill, CODEC) == []
        run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stdout.strip().endswith("30 published to " + s.topics.images_backfill + ", 1 rejected"), (
            run.stdout
        )
        rerun = subprocess.run([*cmd, "--restart"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert rerun.returncode == 0, rerun.stdout
        sent = read_to_end(s, s.topics.images_backfill, CODEC)
        assert len(sent) == 60 and len({ev.event_id for _, ev in sent}) == 30, "a re-run carries the same event ids"
        assert all(ev.seller_aspects == {"Color": "white"} for _, ev in sent)
        missing = subprocess.run(
            [opal_bin(), "backfill", "s3://inventories/none.jsonl", "--dry-run"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert missing.returncode == 2 and "cannot read s3://inventories/none.jsonl" in missing.stdout
    finally:
        moto.kill()
        moto.wait(10)
