"""SFT with TRL on the tiny model: recipes chosen by the base, the loss falls, the vision tower stays frozen,
checkpoints resume bit-exactly, progress shows from the start, vLLM serves the result."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from rich.console import Console

from inference.client import ListingClient
from inference.prompt import COMPACT_CHAT_TEMPLATE
from opal.samples import SAMPLE_DIR, load_samples
from opal.vllm_server import start_vllm
from schemas.settings import VllmSettings
from tests.support import MODEL_PY, REPO, RUN, compare, opal_bin, served_prompt_ids, trl_prompt_ids
from training.progress import Reporter, eta_line, fmt_duration
from training.recipes import CONFIGS, PAPER_ZERO3, RECIPES, TINY_CPU, ZERO3, choose_recipe, load_recipe, recipe_file

# One short run with explicit overrides; the resume test repeats it with a stop in the middle.
# The vision stage has its own test (test_vision_stage.py): the 40 samples are too few for its heads anyway.
SFT_ARGS = ["--data", str(SAMPLE_DIR), "--max-steps", "16", "--lr", "2e-3", "--save-steps", "4", "--logging-steps", "4"]
SFT_ARGS += ["--vision-stage-steps", "0"]


def sft_cmd(base: Path, out: Path, *extra: str) -> list[str]:
    return [opal_bin(), "train", "sft", "--base", str(base), "--out", str(out), *SFT_ARGS, *extra]


def weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sft_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(model folder, the command's stdout) of one SFT run on the sample data."""
    out = tmp_path_factory.mktemp("sft")
    r = subprocess.run(sft_cmd(tiny_model, out), **RUN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "parameters trained / frozen" in r.stdout
    return out, r.stdout


@pytest.fixture(scope="module")
def sft_model(sft_run: tuple[Path, str]) -> Path:
    return sft_run[0]


@pytest.mark.model_env
def test_sft_lowers_the_loss_keeps_the_vision_tower_frozen_and_ships_the_compact_template(sft_model: Path, tiny_model: Path) -> None:
    log = json.loads((sft_model / "train_log.json").read_text())
    losses = [h["loss"] for h in log if "loss" in h]
    assert len(losses) >= 3 and losses[-1] < losses[0] * 0.8, losses
    card = json.loads((sft_model / "opal_model.json").read_text())
    base = json.loads((tiny_model / "opal_model.json").read_text())
    assert card["version"].startswith("sft-") and card["base_version"] == base["version"] and card["steps"] == "16"
    assert (sft_model / "loss.png").read_bytes()[:4] == b"\x89PNG"
    diff = compare(tiny_model, sft_model)
    assert diff["vision_keys"] > 0 and diff["vision_changed"] == 0, diff  # --vision-stage-steps 0 in SFT_ARGS: SFT alone
    assert diff["text_changed"] >= diff["text_keys"] // 2, diff
    assert card["prompt_style"] == "compact" and (sft_model / "chat_template.jinja").read_text() == COMPACT_CHAT_TEMPLATE


@pytest.mark.model_env
def test_sft_prints_the_recipe_and_progress_before_training_and_records_the_recipe(sft_run: tuple[Path, str], tiny_model: Path) -> None:
    out, stdout = sft_run
    base = json.loads((tiny_model / "opal_model.json").read_text())
    assert (base["recipe"], base["from_scratch"]) == ("tiny-cpu", "true")  # what init-tiny writes, and what chose the recipe
    assert "SFT recipe tiny-cpu" in stdout
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^[│|] (\w+)\s+[│|] (\S+)\s+[│|] (\S+)\s+[│|]$", stdout, re.M)}
    assert rows["learning_rate"] == ("0.002", "option") and rows["max_steps"] == ("16", "option")
    assert rows["batch_size"] == ("16", "tiny-cpu") and rows["epochs"] == ("4", "tiny-cpu")
    assert rows["freeze_vision"] == ("True", "tiny-cpu")
    assert rows["vision_stage_steps"] == ("0", "option") and rows["prompt_style"] == ("compact", "tiny-cpu")
    assert set(rows) >= {"lr_scheduler", "warmup", "grad_accumulation", "max_length", "bf16", "deepspeed", "save_steps", "seed"}

    def at(text: str) -> int:
        assert text in stdout, (text, stdout[-3000:])
        return stdout.index(text)

    # progress from the start: the table, then data preparation, then every logging step with an ETA
    assert at("SFT recipe") < at("reading listings from") < at("building rows: 0/") < at("training: 16 steps")
    steps = re.findall(r"step (\d+)/16  loss [\d.]+  lr \S+  elapsed \d+:\d\d  eta (\d+:\d\d|\?)", stdout)
    assert [int(s) for s, _ in steps] == [1, 4, 8, 12, 16] and steps[-1][1] == "0:00", steps
    assert at("checkpoint saved: ") < at("step 8/16")

    card = json.loads((out / "opal_model.json").read_text())
    settings = json.loads(card["sft_settings"])
    assert card["sft_recipe"] == "tiny-cpu" and (card["recipe"], card["from_scratch"]) == ("tiny-cpu", "true")
    assert settings["learning_rate"] == {"value": 0.002, "source": "option"}
    assert settings["batch_size"] == {"value": 16, "source": "tiny-cpu"}
    assert json.loads((out / "sft_run.json").read_text())["settings"]["learning_rate"] == 0.002
    assert not list(out.glob("checkpoint-*"))  # the final folder supersedes them


def run_until_first_checkpoint(cmd: list[str], timeout_s: float = 600) -> tuple[str, int]:
    """Start ``cmd``, kill its whole process group (kill -9) once it reports a checkpoint; (stdout so far, step)."""
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    watchdog = threading.Timer(timeout_s, lambda: os.killpg(p.pid, signal.SIGKILL))
    watchdog.start()
    seen, step = [], 0
    try:
        assert p.stdout is not None
        for line in p.stdout:
            seen.append(line)
            if m := re.search(r"checkpoint saved: .*checkpoint-(\d+)", line):
                step = int(m.group(1))
                os.killpg(p.pid, signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        p.wait()
    return "".join(seen), step


@pytest.mark.model_env
def test_a_stopped_run_leaves_a_checkpoint_and_resume_finishes_it_bit_exactly(tiny_model: Path, sft_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    stdout, step = run_until_first_checkpoint(sft_cmd(tiny_model, out))
    assert step == 4, stdout[-3000:]
    ckpt = out / "checkpoint-4"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 4
    assert not (out / "opal_model.json").exists()

    fresh = subprocess.run(sft_cmd(tiny_model, out), **RUN)  # without --resume the checkpoints are not thrown away
    assert fresh.returncode == 2 and "pass --resume" in " ".join(fresh.stdout.split()), fresh.stdout[-2000:]
    other = subprocess.run(sft_cmd(tiny_model, out, "--resume", "--batch-size", "4"), **RUN)
    assert other.returncode == 2 and "batch_size: 16 -> 4" in " ".join(other.stdout.split()), other.stdout[-2000:]

    r = subprocess.run(sft_cmd(tiny_model, out, "--resume"), **RUN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from" in r.stdout and "training: 16 steps, resuming at step 4" in r.stdout
    assert "step 1/16" not in r.stdout and "step 16/16" in r.stdout
    assert json.loads((out / "opal_model.json").read_text())["steps"] == "16"
    logged_steps = [h["step"] for h in json.loads((out / "train_log.json").read_text()) if "loss" in h]
    assert logged_steps == [1, 4, 8, 12, 16]  # the stopped run's history is kept
    assert weights_digest(out) == weights_digest(sft_model)  # same weights as the run that was never stopped
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.vllm
def test_vllm_serves_the_sft_model(sft_model: Path, tmp_path: Path) -> None:
    proc, url = start_vllm(sft_model, VllmSettings(), tmp_path, timeout_s=400)
    try:
        sample = load_samples()[0]

        async def one() -> tuple[str, bool]:
            async with ListingClient([url], timeout_s=120) as c:
                res = await c.generate([sample.image.read_bytes()], sample.product_type)
                return res.model.version, res.check.valid

        version, valid = asyncio.run(one())
        served_ids = served_prompt_ids(url, sample)
    finally:
        proc.stop()
    assert version == json.loads((sft_model / "opal_model.json").read_text())["version"] and valid
    # The compact chat template travels in the model folder: vLLM renders the serving request exactly as TRL rendered
    # the SFT row (image placeholders + category, no instruction), token for token.
    assert served_ids == trl_prompt_ids(sft_model, sample), "train and serve prompts differ"
    assert len(served_ids) < 40  # the compact prompt: no system prompt, no aspect list


@pytest.mark.model_env
def test_deepspeed_zero3_trains_and_saves_whole_weights(tiny_model: Path, tmp_path: Path) -> None:
    """The paper's ZeRO-3 config, single process on CPU (first run builds DeepSpeed's ops into .opal/, ~1 min)."""
    cmd = [opal_bin(), "train", "sft", "--base", str(tiny_model), "--data", str(SAMPLE_DIR), "--out", str(tmp_path), "--max-steps", "6"]
    cmd += ["--limit", "8"]
    r = subprocess.run([*cmd, "--lr", "2e-3", "--deepspeed", str(REPO / "training" / "configs" / "zero3.json")], **RUN)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert any("loss" in h for h in log)
    diff = compare(tiny_model, tmp_path)  # ZeRO-3 shards parameters; the saved folder must hold them whole
    assert diff["vision_keys"] > 0 and diff["vision_changed"] == 0 and diff["text_changed"] > 0, diff


def test_training_items_use_mace_lines_and_skip_a_torn_one(tmp_path: Path) -> None:
    from schemas.category import default_categories
    from training.sft import train_split_items

    cats = default_categories()
    rules = train_split_items(SAMPLE_DIR, cats)
    first = rules[0][0]
    mace = tmp_path / "mace.jsonl"
    good = {"item_id": first.item_id, "refined": {"title": "refined by the MLLM", "aspects": {"Color": "white"}}}
    mace.write_text(json.dumps(good) + "\n" + '{"item_id": "torn", "refi')
    items = train_split_items(SAMPLE_DIR, cats, mace=mace)
    assert (items[0][0].item_id, items[0][1], items[0][2]) == (first.item_id, "refined by the MLLM", {"Color": "white"})
    assert len(items) == len(rules)  # the other items fall back to the rules pass
    mace.write_text(json.dumps({**good, "item_id": "not-in-this-folder"}) + "\n")
    with pytest.raises(ValueError, match="refines none of the train items"):
        train_split_items(SAMPLE_DIR, cats, mace=mace)


def card(folder: Path, **fields: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "opal_model.json").write_text(json.dumps({"name": "m", "version": "v1", **fields}))
    return folder


def test_the_base_models_card_chooses_the_recipe(tmp_path: Path) -> None:
    assert choose_recipe(card(tmp_path / "tiny", recipe="tiny-cpu", from_scratch="true"))[0] is TINY_CPU
    assert choose_recipe(card(tmp_path / "scratch", from_scratch="true"))[0] is TINY_CPU
    assert choose_recipe(card(tmp_path / "old-tiny", version="tiny-seed0-abc"))[0] is TINY_CPU  # cards from before the field
    sft_of_tiny = card(tmp_path / "sft", version="sft-123", recipe="tiny-cpu", from_scratch="true")  # SFT cards pass it on
    assert choose_recipe(sft_of_tiny)[0] is TINY_CPU
    (tmp_path / "qwen2-vl-7b").mkdir()  # a downloaded backbone: no card
    recipe, why = choose_recipe(tmp_path / "qwen2-vl-7b")
    assert recipe is PAPER_ZERO3 and "no opal_model.json" in why
    assert choose_recipe(card(tmp_path / "large", parameters="8291375616"))[0] is PAPER_ZERO3
    assert choose_recipe(tmp_path / "tiny", "paper-zero3")[0] is PAPER_ZERO3  # --recipe wins over the card
    with pytest.raises(ValueError, match="unknown recipe"):
        choose_recipe(tmp_path / "tiny", "fast")


def test_the_recipes_hold_the_measured_and_the_papers_numbers() -> None:
    t = TINY_CPU
    assert (t.learning_rate, t.batch_size, t.use_cpu, t.bf16, t.deepspeed, t.freeze_vision) == (1e-3, 16, True, False, None, True)
    assert (t.vision_stage_steps, t.prompt_style) == (400, "compact")  # a random tower must learn to see first
    assert TINY_CPU.planned_steps(4082) == 1024  # the ABO train split: 4 epochs of batch 16
    assert TINY_CPU.planned_steps(5000) == 1252  # ~5k items: a few minutes on 2 cores
    assert TINY_CPU.planned_steps(20_000) == 2400  # capped
    assert (PAPER_ZERO3.vision_stage_steps, PAPER_ZERO3.prompt_style) == (0, "full")  # a pretrained encoder sees already
    p = PAPER_ZERO3
    assert (p.learning_rate, p.lr_scheduler, p.warmup, p.epochs) == (2e-5, "cosine", 0.1, 1.0)
    assert (p.bf16, p.use_cpu, p.freeze_vision, p.gradient_checkpointing) == (True, False, True, True)
    assert p.deepspeed == ZERO3 and ZERO3.is_file() and json.loads(ZERO3.read_text())["zero_optimization"]["stage"] == 3
    assert p.batch_size * p.grad_accumulation * 8 == 128 and p.max_length == 4096
    assert p.planned_steps(100_000, world_size=8) == 781
    for r in (TINY_CPU, p):
        assert r.save_steps > 0 and r.save_total_limit == 2 and r.step_cap in (None, 2400)
    assert TINY_CPU.summary.startswith("from-scratch tiny model on a 2-core CPU") and p.summary.startswith("the paper's SFT")


def test_recipes_are_yaml_files_checked_when_read(tmp_path: Path) -> None:
    """training/configs/<name>.yaml holds one config key per recipe field and `recipe: <name>`; its opening comment is
    the summary. A copy reads back the same; a file with a wrong name, an unknown or missing key, a value of the wrong
    type (PyYAML reads 1e-3 as a string) or no summary is refused, naming what is wrong."""
    assert set(RECIPES) == {"tiny-cpu", "paper-zero3"} and recipe_file("tiny-cpu") == CONFIGS / "tiny-cpu.yaml"
    text = recipe_file("tiny-cpu").read_text()
    (tmp_path / "tiny-cpu.yaml").write_text(text)
    assert load_recipe(tmp_path / "tiny-cpu.yaml") == TINY_CPU
    assert TINY_CPU.config()["per_device_train_batch_size"] == 16 and PAPER_ZERO3.config()["deepspeed"] == str(ZERO3)
    bad = {
        "other-name": (text, "`recipe: other-name`"),
        "unknown": (text + "adam_beta2: 0.9\n", "unknown keys ['adam_beta2']"),
        "missing": (text.replace("seed: 0\n", ""), "missing keys ['seed']"),
        "wrong-type": (text.replace("learning_rate: 1.0e-3", "learning_rate: 1e-3"), "learning_rate: '1e-3'"),
        "no-summary": (text[text.index("recipe: tiny-cpu") :], "no opening comment"),
    }
    for name, (body, why) in bad.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(body.replace("recipe: tiny-cpu", f"recipe: {name}") if name != "other-name" else body)
        with pytest.raises(ValueError, match=re.escape(why)):
            load_recipe(path)


PARSE = """
import json, sys
from training.recipes import recipe_rows
from training.trl_configs import parse_sft_args
try:
    config, why, overridden = parse_sft_args(sys.argv[1:])
except ValueError as e:
    print(json.dumps({"error": str(e)})); raise SystemExit(0)
rows = {n: [v, s] for n, v, s in recipe_rows(config.effective_recipe(), overridden)}
print(json.dumps({"recipe": config.recipe, "overridden": sorted(overridden), "rows": rows, "adam_beta2": config.adam_beta2,
                  "steps": config.effective_recipe().planned_steps(10_000), "optim": config.optim.value}))
"""


def _parse(*args: str) -> dict[str, object]:
    r = subprocess.run([str(MODEL_PY), "-c", PARSE, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


@pytest.mark.model_env
def test_trl_parses_the_options_and_the_recipe_fills_the_rest(tiny_model: Path, tmp_path: Path) -> None:
    base = ["--base", str(tiny_model), "--data", str(SAMPLE_DIR), "--out", str(tmp_path / "o")]
    # --deepspeed zero3.json: a bare name is the config shipped in training/configs/
    got = _parse(*base, "--lr", "5e-4", "--max-steps", "16", "--deepspeed", "zero3.json", "--adam_beta2", "0.95", "--optim", "adafactor")
    assert got["recipe"] == "tiny-cpu" and got["overridden"] == ["deepspeed", "learning_rate", "max_steps"]
    rows = got["rows"]
    assert isinstance(rows, dict)
    assert rows["learning_rate"] == ["0.0005", "option"] and rows["batch_size"] == ["16", "tiny-cpu"]
    assert rows["max_length"] == ["-", "tiny-cpu"] and rows["deepspeed"] == [str(ZERO3), "option"]
    assert rows["lr_scheduler"] == ["cosine", "tiny-cpu"] and set(rows) == set(TINY_CPU.values())
    assert got["steps"] == 16  # an explicit step count is exact: no epochs, no cap
    assert (got["adam_beta2"], got["optim"]) == (0.95, "adafactor")  # any TrainingArguments option reaches the run
    off = _parse(*base, "--deepspeed", "none", "--prompt_style", "full")
    assert off["overridden"] == ["deepspeed", "prompt_style"] and off["rows"]["deepspeed"] == ["-", "option"]  # type: ignore[index]
    assert "unknown prompt style" in str(_parse(*base, "--prompt_style", "short")["error"])
    assert "needs --base, --data and --out" in str(_parse("--base", str(tiny_model))["error"])
    # a --config of one's own lies over the recipe, the command line over both (TRL's precedence); its keys count as options
    own = tmp_path / "own.yaml"
    own.write_text("per_device_train_batch_size: 4\nlearning_rate: 3.0e-4\nadam_beta2: 0.9\n")
    mine = _parse(*base, "--config", str(own), "--lr", "5e-4")
    assert mine["overridden"] == ["batch_size", "learning_rate"] and mine["adam_beta2"] == 0.9
    assert mine["rows"]["learning_rate"] == ["0.0005", "option"] and mine["rows"]["batch_size"] == ["4", "option"]  # type: ignore[index]
    assert mine["rows"]["epochs"] == ["4", "tiny-cpu"]  # type: ignore[index]


TRL_ALONE = """
import json, sys
from trl import TrlParser
from training.trl_configs import SftRunConfig
(config,) = TrlParser((SftRunConfig,)).parse_args_and_config(args=sys.argv[1:])
print(json.dumps({"recipe": config.recipe, "lr": config.learning_rate, "batch": config.per_device_train_batch_size,
                  "cap": config.step_cap, "style": config.prompt_style, "max_length": config.max_length}))
"""


@pytest.mark.model_env
def test_a_recipe_file_is_a_config_trls_own_parser_reads() -> None:
    """No OPAL glue is needed to read a recipe: TRL's parser takes the file as --config, and its options win over it."""
    r = subprocess.run([str(MODEL_PY), "-c", TRL_ALONE, "--config", str(recipe_file("tiny-cpu")), "--lr", "5e-4"], **RUN)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"recipe": "tiny-cpu", "lr": 5e-4, "batch": 16, "cap": 2400, "style": "compact", "max_length": None}


def test_train_sft_has_no_toy_default_for_data(tmp_path: Path) -> None:
    r = subprocess.run([opal_bin(), "train", "sft", "--base", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "--data" in r.stdout, r.stdout + r.stderr


def test_progress_lines_and_eta_without_a_terminal() -> None:
    buf = io.StringIO()
    rep = Reporter(Console(file=buf, force_terminal=False, width=200), every_s=0.0)
    assert list(rep.track(iter([1, 2, 3]), 3, "loading images")) == [1, 2, 3]
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[0:00] loading images: 0/3" and "loading images: 1/3 (33%, eta" in lines[1], lines
    assert re.fullmatch(r"\[0:00\] loading images: 3/3 in 0:00", lines[-1]), lines
    assert eta_line(30, 120, 2.5, 1e-3, 60.0, 20) == "step 30/120  loss 2.5000  lr 1.00e-03  elapsed 1:00  eta 4:30"
    assert eta_line(0, 10, None, None, 0.0, 0).endswith("eta ?")
    assert (fmt_duration(3725), fmt_duration(59.6), fmt_duration(float("nan"))) == ("1:02:05", "1:00", "?")
