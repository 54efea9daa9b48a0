"""The pure parts of an improvement round: which preference pairs it trains on, and whether its candidate is promoted.

A round (``opal loop round``, :mod:`opal.loop`) tunes the deployment's current model with DPO on
the pairs its own mistakes earned, evaluates candidate and current on a frozen evaluation set,
and promotes the candidate only if the gate passes. This module holds the decisions, so they
can be tested without a model:

- :func:`new_pairs`: the pairs of the current version's shards (``pairs-<version>.jsonl``, one
  ``PreferencePair`` JSON per line, written by the preference builder) that no earlier round
  used, deduplicated by pair id, in file order; torn lines (a crash mid-write) are skipped and
  counted.
- :func:`gate`: the candidate passes when, on every headline metric, it is no worse than the
  current model by more than ``tolerance``, and its JSON validity is 1.0. The reasons say
  which metric decided.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from schemas.events import PreferencePair

HEADLINE = ("rouge_l_f1", "aspect_f1", "colour_accuracy")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def shard_for(shard_dir: Path, version: str) -> Path:
    """The preference builder's shard of one model version (``workers.preference_builder.shard_path``)."""
    return shard_dir / f"pairs-{_UNSAFE.sub('_', version) or 'unversioned'}.jsonl"


@dataclass(frozen=True)
class PairSet:
    pairs: list[PreferencePair]
    torn: int = 0  # lines that were not a PreferencePair (a crash mid-write)
    already_used: int = 0  # pairs an earlier round trained on
    duplicates: int = 0


def new_pairs(shard: Path, used: Iterable[str]) -> PairSet:
    """The shard's pairs no earlier round used (module docstring). A missing shard has none."""
    if not shard.is_file():
        return PairSet([])
    seen = set(used)
    out: list[PreferencePair] = []
    torn = already = dupes = 0
    mine: set[str] = set()
    for line in shard.read_text().splitlines():
        if not line.strip():
            continue
        try:
            pair = PreferencePair.model_validate_json(line)
        except ValueError:
            torn += 1
            continue
        if pair.pair_id in seen:
            already += 1
        elif pair.pair_id in mine:
            dupes += 1
        else:
            mine.add(pair.pair_id)
            out.append(pair)
    return PairSet(out, torn, already, dupes)


@dataclass(frozen=True)
class GateResult:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def gate(current: Mapping[str, float | None], candidate: Mapping[str, float | None], tolerance: float = 0.01) -> GateResult:
    """Promote when no headline metric falls by more than ``tolerance`` and JSON validity is 1.0 (module docstring)."""
    reasons = []
    ok = True
    for m in HEADLINE:
        cur, cand = current.get(m), candidate.get(m)
        if cur is None or cand is None:
            continue
        if cand < cur - tolerance:
            ok = False
            reasons.append(f"{m} fell {cur:.3f} -> {cand:.3f} (more than {tolerance:g})")
        else:
            reasons.append(f"{m} {cur:.3f} -> {cand:.3f}")
    valid = candidate.get("json_valid")
    if valid is None or valid < 1.0:
        ok = False
        reasons.append(f"json_valid {valid} (must be 1.0)")
    return GateResult(ok, reasons)


def read_ledger(path: Path) -> set[str]:
    """Pair ids earlier rounds trained on (one per line)."""
    return set(path.read_text().split()) if path.is_file() else set()


def append_ledger(path: Path, pair_ids: Iterable[str]) -> None:
    """Record pair ids as used (appended; a rerun of the same round writes the same ids, harmless)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for pid in pair_ids:
            f.write(pid + "\n")


def write_pairs_file(path: Path, pairs: Iterable[PreferencePair]) -> int:
    """The round's frozen training set (what ``opal train dpo --pairs`` reads); returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [p.model_dump_json() for p in pairs]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)  # whole or absent: a resumed round never trains on half a set
    return len(lines)


def summary(metrics: Mapping[str, object]) -> dict[str, float | None]:
    """The headline metrics and JSON validity of an ``opal eval run`` report's model row."""
    keys = (*HEADLINE, "json_valid")
    return {k: (None if metrics.get(k) is None else float(metrics[k])) for k in keys}  # type: ignore[arg-type]


def load_report_row(report: Path, system: str = "model") -> dict[str, object]:
    """One system's summary row of an ``opal eval run`` ``report.json`` (``systems`` maps a system to its row)."""
    doc = json.loads(report.read_text())
    row = doc.get("systems", {}).get(system)
    if not isinstance(row, dict):
        raise ValueError(f"{report} has no {system!r} row")
    return dict(row)


def swap_delta(report: Path, metric: str = "colour_accuracy") -> float | None:
    """The image-swap control's delta (true photos minus swapped) of ``metric`` in an ``opal eval run`` report."""
    deltas = json.loads(report.read_text()).get("swap_control", {}).get("deltas") or {}
    value = deltas.get(metric)
    return None if value is None else float(value)
