"""Helpers shared by the tests: plain functions and constants, importable from any test module and from the
scripts tests run in subprocesses (``from tests.support import ...``). Fixtures live in ``tests/conftest.py``;
no test module imports another test module."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from opal.embedded import ManagedProcess, free_port
from opal.embedded import settings_env as settings_env  # re-exported: the tests point CLI subprocesses at a stack with it
from opal.samples import SAMPLE_DIR, SampleListing, load_samples, sample_event
from schemas.events import Lane, ListingImageEvent, PreferencePair
from schemas.serde import EventCodec
from schemas.settings import OpalSettings

REPO = Path(__file__).resolve().parents[1]
STREAM_BIN = Path(sys.executable).parent
MODEL_PY = REPO / ".venv-model" / "bin" / "python"
"""The model-side interpreter (vllm, torch, transformers, trl)."""

T = TypeVar("T")


def opal_bin() -> str:
    return str(STREAM_BIN / "opal")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy (returned), or raise an AssertionError naming ``what``
    once ``timeout_s`` passed. For waits on a condition; never a fixed sleep hoping it happened."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


# -- Kafka ------------------------------------------------------------------------------------------
def publish(s: OpalSettings, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    """Produce (key, value) records (value None: a tombstone) and wait until all are acknowledged."""
    from workers.kafka_clients import make_producer

    p = make_producer(s.kafka)
    for k, v in records:
        p.produce(topic, key=k, value=v)
    assert p.flush(30) == 0


def read_topic(s: OpalSettings, topic: str, codec: EventCodec[Any], n: int, timeout_s: float = 30) -> list[tuple[Any, Any]]:
    """Read from the beginning until ``n`` records arrived (or ``timeout_s`` passed): for a topic still being written.
    Once nothing writes to the topic any more, :func:`read_to_end` reads all of it."""
    from workers.kafka_clients import make_consumer

    c = make_consumer(s.kafka, f"reader-{uuid.uuid4().hex[:6]}")
    c.subscribe([topic])
    out: list[tuple[Any, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        m = c.poll(0.3)
        if m is not None and not m.error():
            out.append((m.key(), codec.decode(m.value())))
    c.close()
    return out


def read_to_end(s: OpalSettings, topic: str, codec: EventCodec[Any], timeout_s: float = 60) -> list[tuple[Any, Any]]:
    """Every record ``topic`` holds now (:func:`workers.kafka_clients.messages_to_end`: each partition to the end it
    has when called; so call it once the writers stopped and their outputs were acknowledged), decoded. Raises
    TimeoutError when the end is not reached within ``timeout_s``; no waiting for silence."""
    from workers.kafka_clients import messages_to_end

    return [(m.key(), codec.decode(m.value())) for m in messages_to_end(s.kafka, topic, timeout_s)]


def worker_events(images: Path, n: int, lane: Lane = Lane.REALTIME, prefix: str = "l") -> list[ListingImageEvent]:
    """ListingImageEvents for the first ``n`` sample photos, pointing into the ``images`` root."""
    out = []
    for i, s in enumerate(load_samples()[:n]):
        local = SampleListing(s.item_id, images / s.image.name, s.title, s.product_type, s.color)
        out.append(sample_event(local, lane).model_copy(update={"listing_id": f"{prefix}-{i}-{s.item_id}"}))
    return out


# -- the model side -----------------------------------------------------------------------------------
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
    out = subprocess.run([str(MODEL_PY), "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(t) for t in json.loads(out.stdout.strip().splitlines()[-1])]


RUN: dict[str, Any] = {"capture_output": True, "text": True, "cwd": REPO, "timeout": 900}
"""subprocess.run options for a training command (SFT, DPO)."""

COMPARE = """
import json, sys
from safetensors.torch import load_file
base, trained = load_file(sys.argv[1] + '/model.safetensors'), load_file(sys.argv[2] + '/model.safetensors')
def same(k): return bool((base[k].float() == trained[k].float()).all())
def is_vision(k): return k.startswith('visual.') or '.visual.' in k
vision = [k for k in base if is_vision(k)]
text = [k for k in base if not is_vision(k)]
print(json.dumps({'vision_keys': len(vision), 'vision_changed': sum(not same(k) for k in vision),
                  'text_keys': len(text), 'text_changed': sum(not same(k) for k in text)}))
"""


def compare(base: Path, trained: Path) -> dict[str, int]:
    """How many vision and text tensors differ between two model folders (run in the model environment)."""
    r = subprocess.run([str(MODEL_PY), "-c", COMPARE, str(base), str(trained)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


# -- processes ---------------------------------------------------------------------------------------
def alive(pid: int) -> bool:
    """``pid`` runs and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def wait_dead(pids: list[int], timeout_s: float = 10) -> list[int]:
    """Wait up to ``timeout_s`` for every pid to be gone; returns the survivors."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def listening(port: int) -> bool:
    from opal.process_tree import listening as _listening

    return _listening(port)


# A server that ignores SIGTERM, holds a port, and starts a helper in a NEW session with an
# EMPTY environment (no tag: like vLLM's engine core, whose environ setproctitle overwrites).
STUBBORN = """
import os, signal, socket, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
helper = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
    start_new_session=True, env={},
)
print(helper.pid, flush=True)
time.sleep(600)
"""


def stubborn_service(tmp_path: Path, attached: bool = True) -> tuple[ManagedProcess, int, int]:
    """The :data:`STUBBORN` server as a ManagedProcess: (process, helper pid, port) once it listens and its helper runs."""
    port = free_port()
    log = tmp_path / "stubborn.log"
    mp = ManagedProcess("stubborn", [sys.executable, "-c", STUBBORN, str(port)], log, attached=attached, port=port).start()

    def helper_pid() -> int | None:
        # the pid is a line of its own: the log's "--- starting: ..." header ends in the port, also a number
        lines = [line.strip() for line in log.read_text().splitlines()] if log.exists() else []
        pids = [int(line) for line in lines if line.isdigit()]
        return pids[-1] if listening(port) and pids else None

    helper = wait_for(helper_pid, 10, "the stubborn server to listen and print its helper's pid")
    assert mp.pid and alive(mp.pid) and alive(helper) and listening(port)
    return mp, helper, port


def synthetic_pairs(n: int, version: str = "test") -> list[PreferencePair]:
    """chosen = the catalogue listing, rejected = a wrong one, for the first n sample items (by model ``version``)."""
    from inference.prompt import completion_json, instruction
    from schemas.category import default_categories
    from schemas.events import ImageRef, ModelInfo, Verdict
    from training.abo import load_abo

    cats = default_categories()
    out = []
    for r in list(load_abo(SAMPLE_DIR, cats))[:n]:
        cat = cats.get(r.category)
        out.append(
            PreferencePair(
                pair_id=f"p-{r.item_id}",
                listing_id=r.item_id,
                category=r.category,
                prompt=instruction(cat),
                image=ImageRef(uri=r.image.as_uri()),
                chosen=completion_json(r.title, r.aspects, cat),
                rejected=completion_json("dantur kite", {"Color": "clear"}, cat),
                verdict=Verdict.INCORRECT,
                model=ModelInfo(name="opal-tiny", version=version),
            )
        )
    return out
