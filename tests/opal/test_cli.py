from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from opal import __version__
from opal.cli import COMMANDS, app
from schemas.category import generic_schema
from tests.support import REPO, opal_bin
from training.registry import ModelRegistry


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([opal_bin(), *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=timeout)


def test_help_lists_every_subcommand(cli_env: dict[str, str]) -> None:
    group: Any = typer.main.get_command(app)
    ctx = group.context_class(group)
    top = _run(["--help"], cli_env)
    assert top.returncode == 0
    for name in group.list_commands(ctx):
        assert name in top.stdout, name
        cmd = group.get_command(ctx, name)
        if hasattr(cmd, "list_commands"):
            sub = _run([name, "--help"], cli_env)
            assert sub.returncode == 0
            for subname in cmd.list_commands(ctx):
                assert subname in sub.stdout, f"{name} {subname}"


TOP_LEVEL = ["settings", "demo", "search", "serve", "generate", "backfill"]
GROUPS = ["dev", "topology", "schemas", "events", "model", "worker", "dlq", "eval", "data", "train", "experiment", "loop"]


def test_the_command_table_names_every_command_with_its_own_help() -> None:
    """opal/cli.py's table lists the commands `opal --help` shows (without importing them) in their order; each entry
    loads a command of that name whose own help starts with the table's line, so the listing cannot drift."""
    group: Any = typer.main.get_command(app)
    ctx = group.context_class(group)
    assert group.list_commands(ctx) == list(COMMANDS) == TOP_LEVEL + GROUPS
    for name, entry in COMMANDS.items():
        cmd = group.get_command(ctx, name)
        assert cmd.name == name and hasattr(cmd, "list_commands") == (name in GROUPS), name
        first = " ".join((cmd.help or "").split("\n\n")[0].split())
        assert first == entry.help, (name, first, entry.help)


def test_version_and_an_unknown_command() -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).stdout.strip() == f"opal {__version__}"
    typo = runner.invoke(app, ["sttings"])
    assert typo.exit_code == 2 and "Did you mean 'settings'" in typo.output, typo.output


def test_settings_table_masks_secrets(cli_env: dict[str, str]) -> None:
    env = dict(cli_env, OPAL_KAFKA_SASL_PASSWORD="hunter2", OPAL_KAFKA_BOOTSTRAP="kafka-1:9092")
    r = _run(["settings"], env)
    assert r.returncode == 0
    assert "kafka-1:9092" in r.stdout and "OPAL_WORKER_MAX_IN_FLIGHT" in r.stdout
    assert "hunter2" not in r.stdout and "**********" in r.stdout


def test_json_schema_command(cli_env: dict[str, str]) -> None:
    r = _run(["schemas", "json-schema", "handbag"], cli_env)
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert "Bag Style" in schema["properties"]["aspects"]["properties"]
    typo = _run(["schemas", "json-schema", "handbags"], cli_env)  # no schema: the generic one, and a hint on stderr
    assert typo.returncode == 0 and "did you mean handbag" in typo.stderr and "generic schema" in typo.stderr
    assert set(json.loads(typo.stdout)["properties"]["aspects"]["properties"]) == {a.name for a in generic_schema().visual_aspects}


def test_commands_needing_kafka_say_how_to_get_one(cli_env: dict[str, str]) -> None:
    r = _run(["events", "publish-samples"], cli_env)
    assert r.returncode == 2 and "opal dev up" in r.stdout


@pytest.mark.vllm
def test_demo_runs_end_to_end_then_closes_the_loop(cli_env: dict[str, str]) -> None:
    """`opal demo --loop`: the demo (its line second to last), then judge agent -> preference builder -> round -> promotion
    or not -> re-enrichment of every listing the old version made (the last line)."""
    r = _run(["demo", "--loop"], cli_env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    *_, demo_line, loop_line = r.stdout.strip().splitlines()
    loop_re = r"loop: (\d+) preference pairs, candidate (dpo-[0-9a-f]{12}) (promoted|kept), (\d+) listings re-enriched"
    looped = re.fullmatch(loop_re, loop_line)
    assert looped, loop_line
    pairs, candidate, status, reenriched = looped.groups()
    assert int(pairs) > 0 and (int(reenriched) == 41 if status == "promoted" else reenriched == "0"), loop_line
    registry = ModelRegistry(Path(cli_env["OPAL_EMBEDDED_RUN_DIR"]) / "demo" / "loop" / "registry")
    assert candidate in registry.versions() and (registry.current("demo").version == candidate) == (status == "promoted")  # type: ignore[union-attr]
    for step in ("7. judge agent", "8. preference builder", "9. registry", "10. improvement round"):
        assert step in r.stdout, r.stdout[-3000:]
    flat_out = " ".join(r.stdout.split())
    judged = re.search(r"7\. judge agent: \d+ listings judged, (\d+) bottom verdicts became preference pairs", flat_out)
    built = re.search(r"8\. preference builder: (\d+) pairs", flat_out)
    assert judged and built and judged.group(1) == built.group(1) == pairs, flat_out[-3000:]  # every pair reached the round
    last = demo_line
    m = re.fullmatch(r"demo: (\d+) listings in, (\d+) aspect events out, (\d+) dead letters", last)
    assert m, last
    assert m.groups() == ("44", "41", "3")
    for reason in ("malformed_event", "invalid_image"):
        assert reason in r.stdout
    assert "unknown_category" not in r.stdout  # the listing without a category schema is enriched with the generic one
    flat = " ".join(r.stdout.split())
    assert "schema-valid: 41/41 · generic schema (category without one): 1 ·" in flat, flat[-1500:]
    shipped = json.loads((REPO / "models" / "opal-tiny-abo" / "opal_model.json").read_text())["version"]
    assert f"model opal-tiny {shipped}" in flat, flat[-1500:]  # the trained model in the repository, not a random one
    assert "outside the model's training split (13 of 40)" in flat
    found = re.search(r"search index: (\d+) listings indexed; .+=.+ finds (\d+) of them", r.stdout)
    assert found and found.group(1) == "41" and 1 <= int(found.group(2)) <= 41, r.stdout[-2000:]
