"""Model registry: versioned model folders with their cards, an atomic "current" pointer per deployment, history, rollback.

Layout under the registry root (``OPAL_MODELS_REGISTRY``, default ``.opal/registry``)::

    models/<version>/            a model folder as vLLM serves it (weights, processor, opal_model.json, README.md)
    models/<version>/manifest.json   what was registered: card, file hashes, source, note, when
    deployments/<name>.json      {"deployment", "current", "history": [{"action", "version", "at", "reason"}, ...]}

Contract
- :meth:`ModelRegistry.register` copies a model folder in under its card's version
  (``opal_model.json``: ``version``) with a manifest of every file's SHA-256. Idempotent:
  registering the same weights again returns the existing entry; a different folder
  claiming a registered version is refused (``ValueError``).
- :meth:`ModelRegistry.promote` points a deployment at a registered version and appends to
  its history; the pointer file is replaced atomically (write, fsync, rename), so a reader
  sees the old or the new pointer, never half of one. Promoting the current version again
  changes nothing.
- :meth:`ModelRegistry.rollback` points the deployment back at the version that was
  current before the current one (history is kept, the rollback is itself an entry, so a
  second rollback undoes the first).
- Pure files and JSON (no torch): both environments use it. Single writer per deployment
  (the improvement round or an operator); concurrent readers are safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CARD = "opal_model.json"
MANIFEST = "manifest.json"
DEFAULT_DEPLOYMENT = "default"


@dataclass(frozen=True)
class ModelEntry:
    """One registered model version."""

    version: str
    path: Path
    card: dict[str, Any]
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.card.get("name", ""))

    @property
    def served_name(self) -> str:
        """``name@version``: what vLLM serves it as and what AspectEvents and cache keys carry."""
        return f"{self.name}@{self.version}"


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``folder`` (relative path -> hex), the manifest itself excluded."""
    out: dict[str, str] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[str(f.relative_to(folder))] = h.hexdigest()
    return out


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _card(folder: Path) -> dict[str, Any]:
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder} is not an OPAL model folder (no readable {CARD}: {e})") from None
    if not isinstance(card, dict) or not card.get("version") or not card.get("name"):
        raise ValueError(f"{folder / CARD} names no model name and version")
    return card


class ModelRegistry:
    """The registry at ``root`` (see the module contract)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()  # commands may run from another folder than the one that named it
        self.models = self.root / "models"
        self.deployments = self.root / "deployments"

    # -- models ------------------------------------------------------------------------------
    def register(self, folder: Path, note: str = "", extra: dict[str, Any] | None = None) -> ModelEntry:
        """Copy ``folder`` in under its card's version (idempotent for the same files)."""
        card = _card(folder)
        version = str(card["version"])
        hashes = file_hashes(folder)
        target = self.models / version
        if target.exists():
            existing = self.get(version)
            if existing.manifest.get("files") != hashes:
                raise ValueError(f"version {version} is registered with other files than {folder}")
            return existing
        tmp = self.models / f".{version}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder, tmp)
        manifest = {
            "version": version,
            "name": card["name"],
            "source": str(folder.resolve()),
            "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": note,
            "card": card,
            "files": hashes,
            **(extra or {}),
        }
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, target)
        return self.get(version)

    def get(self, version: str) -> ModelEntry:
        path = self.models / version
        if not (path / MANIFEST).is_file():
            raise ValueError(f"model version {version!r} is not registered in {self.root} (known: {', '.join(self.versions()) or 'none'})")
        manifest = json.loads((path / MANIFEST).read_text())
        return ModelEntry(version, path, dict(manifest.get("card", {})), manifest)

    def versions(self) -> list[str]:
        """Registered versions, oldest registration first."""
        found = [p for p in self.models.glob("*") if (p / MANIFEST).is_file()] if self.models.is_dir() else []
        stamped = [(json.loads((p / MANIFEST).read_text()).get("registered_at", ""), p.name) for p in found]
        return [v for _, v in sorted(stamped)]

    def verify(self, version: str) -> list[str]:
        """Files of a registered version whose content no longer matches its manifest (empty: intact)."""
        entry = self.get(version)
        now = file_hashes(entry.path)
        recorded: dict[str, str] = entry.manifest.get("files", {})
        return sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))

    # -- deployments -------------------------------------------------------------------------
    def _pointer(self, deployment: str) -> Path:
        return self.deployments / f"{deployment}.json"

    def state(self, deployment: str = DEFAULT_DEPLOYMENT) -> dict[str, Any]:
        path = self._pointer(deployment)
        if not path.is_file():
            return {"deployment": deployment, "current": None, "history": []}
        return dict(json.loads(path.read_text()))

    def current(self, deployment: str = DEFAULT_DEPLOYMENT) -> ModelEntry | None:
        version = self.state(deployment).get("current")
        return self.get(version) if version else None

    def history(self, deployment: str = DEFAULT_DEPLOYMENT) -> list[dict[str, Any]]:
        return list(self.state(deployment).get("history", []))

    def promote(self, version: str, deployment: str = DEFAULT_DEPLOYMENT, reason: str = "") -> bool:
        """Point ``deployment`` at ``version``; False when it already was (nothing written)."""
        self.get(version)  # must be registered
        state = self.state(deployment)
        if state.get("current") == version:
            return False
        return self._move(state, version, "promote", reason)

    def rollback(self, deployment: str = DEFAULT_DEPLOYMENT, reason: str = "") -> str:
        """Point ``deployment`` back at the version current before the current one; returns it."""
        state = self.state(deployment)
        current, history = state.get("current"), state.get("history", [])
        if len(history) < 2:
            raise ValueError(f"deployment {deployment!r} has no earlier version to roll back to")
        previous = history[-2]["version"]
        self._move(state, previous, "rollback", reason or f"rolled back from {current}")
        return str(previous)

    def _move(self, state: dict[str, Any], version: str, action: str, reason: str) -> bool:
        history = list(state.get("history", []))
        history.append({"action": action, "version": version, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "reason": reason})
        new = {"deployment": state["deployment"], "current": version, "history": history}
        _write_atomic(self._pointer(state["deployment"]), json.dumps(new, indent=2) + "\n")
        return True
