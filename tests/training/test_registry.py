"""The model registry: registration by card version with file hashes, atomic promotion, history, rollback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.registry import ModelRegistry


def _model(folder: Path, version: str, weights: bytes = b"w") -> Path:
    folder.mkdir(parents=True)
    (folder / "opal_model.json").write_text(json.dumps({"name": "opal-tiny", "version": version}))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_register_is_idempotent_and_refuses_a_different_folder_under_a_known_version(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "registry")
    a = reg.register(_model(tmp_path / "a", "sft-aaa"), note="first")
    assert a.served_name == "opal-tiny@sft-aaa" and (a.path / "model.safetensors").read_bytes() == b"w"
    assert a.manifest["note"] == "first" and set(a.manifest["files"]) == {"opal_model.json", "model.safetensors"}
    assert reg.register(tmp_path / "a").path == a.path  # same files: the existing entry
    with pytest.raises(ValueError, match="other files"):
        reg.register(_model(tmp_path / "a2", "sft-aaa", b"other"))
    with pytest.raises(ValueError, match="not an OPAL model folder"):
        reg.register(tmp_path)
    (a.path / "model.safetensors").write_bytes(b"tampered")
    assert reg.verify("sft-aaa") == ["model.safetensors"]


def test_promotion_history_and_rollback(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "registry")
    for v in ("v1", "v2"):
        reg.register(_model(tmp_path / v, v))
    assert reg.current() is None
    assert reg.promote("v1", reason="initial") and not reg.promote("v1")  # again: nothing written
    assert reg.promote("v2", reason="round 1")
    assert reg.current().version == "v2"  # type: ignore[union-attr]
    assert reg.rollback(reason="bad") == "v1" and reg.current().version == "v1"  # type: ignore[union-attr]
    assert reg.rollback() == "v2"  # a second rollback undoes the first
    moves = [(h["action"], h["version"]) for h in reg.history()]
    assert moves == [("promote", "v1"), ("promote", "v2"), ("rollback", "v1"), ("rollback", "v2")]
    assert reg.current("canary") is None and reg.versions() == ["v1", "v2"]
    with pytest.raises(ValueError, match="not registered"):
        reg.promote("v9")
    with pytest.raises(ValueError, match="no earlier version"):
        ModelRegistry(tmp_path / "empty").rollback()
    assert not list((tmp_path / "registry" / "deployments").glob("*.tmp*"))  # atomic writes leave nothing behind


def test_the_cli_registers_promotes_and_rolls_back(cli_env: dict[str, str], tmp_path: Path) -> None:
    import subprocess

    from tests.support import opal_bin

    env = {**cli_env, "OPAL_MODELS_REGISTRY": str(tmp_path / "registry"), "OPAL_MODELS_DEPLOYMENT": "prod"}

    def opal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([opal_bin(), "model", *args], capture_output=True, text=True, env=env, timeout=60)

    assert opal("register", str(_model(tmp_path / "a", "v1")), "--promote").returncode == 0
    assert opal("register", str(_model(tmp_path / "b", "v2")), "--note", "round 1").returncode == 0
    assert "v2 is now current" in opal("promote", "v2").stdout
    assert "rolled back to v1" in opal("rollback").stdout
    listed = opal("list").stdout
    assert "round 1" in listed and "history of prod" in listed
    assert ModelRegistry(tmp_path / "registry").current("prod").version == "v1"  # type: ignore[union-attr]
    bad = opal("promote", "v9")
    assert bad.returncode == 2 and "not registered" in bad.stdout
