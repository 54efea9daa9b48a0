"""One improvement round: the current model's own mistakes -> DPO -> evaluation gate -> promotion (or not).

``opal loop round`` (:func:`run_round`) closes the design's loop for one deployment of the model
registry (:mod:`training.registry`):

1. **pairs**: the preference builder's shard of the deployment's current version
   (``<shards>/pairs-<version>.jsonl``), minus pairs an earlier round used (the registry's
   ledger), deduplicated (:func:`training.rounds.new_pairs`). Fewer than ``min_pairs``: the
   round does nothing and says so (a second run with no new pairs does nothing).
2. **dpo**: ``opal train dpo`` from the current model on exactly those pairs (frozen into the
   round folder) -> the candidate, registered in the registry.
3. **evaluate**: ``opal eval run`` for the current model and the candidate on the same frozen
   evaluation set (``--data``/``--split``/``--limit``), with the image-swap control; the
   current model's evaluation is reused by later rounds of the same version.
4. **gate**: promote only if no headline metric (ROUGE-L F1, aspect F1, colour accuracy)
   falls by more than ``tolerance`` and JSON validity is 1.0 (:func:`training.rounds.gate`);
   otherwise the current model stays and the report says why.
5. **report**: ``report.md`` (headline metrics, JSON validity and the image-swap control's
   colour delta of both models: does the candidate still read the photo?) and ``metrics.png``
   (current vs candidate) in the round folder; the pairs are written to the ledger either way
   (they were tried).

Resumable: the round folder (``<rounds>/<current version>-<hash of the pair ids>``) holds each
step's output (each written whole: temporary file, then rename); a rerun after a crash at any
step skips what is done. The decision (``decision.json``), the ledger and the report are written
before the promotion, and a run that finds a decided but unfinished promotion of the current
version finishes it; a promotion once done (``promoted`` marker) is never repeated, so an
operator's rollback stays. An evaluation with failed requests fails its step (and is not kept):
an outage must not decide a gate. The round's last line
is ``round: <P> preference pairs, candidate <version> <promoted|kept>``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from opal.ablation import Step, StepFailed, _opal
from opal.plots import bars_png
from training.progress import Reporter
from training.registry import ModelRegistry
from training.rounds import (
    HEADLINE,
    append_ledger,
    gate,
    load_report_row,
    new_pairs,
    read_ledger,
    shard_for,
    summary,
    swap_delta,
    write_pairs_file,
)

LEDGER = "rounds-ledger.txt"
DECISION = "decision.json"
PROMOTED = "promoted"


@dataclass(frozen=True)
class RoundConfig:
    """One round; every field documents itself."""

    registry: Path  # the model registry (OPAL_MODELS_REGISTRY)
    deployment: str  # whose current version is improved (OPAL_MODELS_DEPLOYMENT)
    shards: Path  # the preference builder's folder of pairs-<version>.jsonl
    data: Path  # ABO-format folder of the frozen evaluation set
    out: Path  # where round folders go
    split: str = "test"  # evaluation split of --data
    limit: int | None = None  # evaluate at most this many items (first by id): faster rounds, noisier gate
    min_pairs: int = 20  # fewer new pairs than this: no round
    tolerance: float = 0.01  # largest fall of a headline metric the gate accepts
    dpo_epochs: float = 1.0  # passes over the pairs


@dataclass(frozen=True)
class RoundResult:
    status: str  # "nothing" (too few pairs), "promoted", "kept"
    pairs: int
    current: str
    candidate: str | None = None
    reasons: tuple[str, ...] = ()
    folder: Path | None = None

    def line(self) -> str:
        if self.status == "nothing":
            return f"round: {self.pairs} new preference pairs for {self.current}, fewer than needed; nothing to do"
        return f"round: {self.pairs} preference pairs, candidate {self.candidate} {self.status}"


def run_round(c: RoundConfig, rep: Reporter) -> RoundResult:
    """Run (or resume) one round; see the module docstring. ``ValueError`` without a current model."""
    reg = ModelRegistry(c.registry)
    current = reg.current(c.deployment)
    if current is None:
        raise ValueError(f"deployment {c.deployment!r} has no current model in {c.registry}: `opal model register DIR --promote` first")
    ledger = c.registry / LEDGER
    found = new_pairs(shard_for(c.shards, current.version), read_ledger(ledger))
    rep.note(
        f"{len(found.pairs)} new pairs for {current.served_name} in {shard_for(c.shards, current.version)} "
        f"({found.already_used} used by earlier rounds, {found.duplicates} duplicates, {found.torn} torn lines)"
    )
    pending = _pending_promotion(reg, c, current.version)
    if pending is not None:
        return pending
    if len(found.pairs) < c.min_pairs:
        return RoundResult("nothing", len(found.pairs), current.version)
    ids = sorted(p.pair_id for p in found.pairs)
    folder = c.out / f"{current.version}-{hashlib.sha256(' '.join(ids).encode()).hexdigest()[:10]}"
    pairs_file, candidate_dir = folder / "pairs.jsonl", folder / "candidate"
    eval_root = c.out / "eval"

    def eval_dir(version: str) -> Path:
        where = hashlib.sha256(str(c.data.resolve()).encode()).hexdigest()[:8]
        return eval_root / f"{c.data.resolve().name}-{where}-{c.split}-{c.limit or 'all'}" / version

    def evaluate(model_dir: Path, version: str) -> None:
        out = eval_dir(version)
        args = ["eval", "run", "--model", str(model_dir), "--data", str(c.data), "--split", c.split, "--out", str(out)]
        _opal([*args, *(["--limit", str(c.limit)] if c.limit else [])], rep)
        report = json.loads((out / "report.json").read_text())
        failed = int(report.get("failed", 0)) + int((report.get("swap_control") or {}).get("failed", 0))
        if failed:  # an infrastructure failure scores as invalid output: never gate (or cache) on it
            shutil.rmtree(out, ignore_errors=True)
            raise StepFailed(f"the evaluation of {version} had {failed} failed requests; rerun the round")

    def candidate_version() -> str:
        return str(json.loads((candidate_dir / "opal_model.json").read_text())["version"])

    dpo = ["train", "dpo", "--base", str(current.path), "--pairs", str(pairs_file), "--out", str(candidate_dir)]
    steps = [
        Step("pairs", pairs_file.is_file, lambda: write_pairs_file(pairs_file, found.pairs) and None),
        Step(
            "dpo",
            (candidate_dir / "opal_model.json").is_file,
            lambda: _opal([*dpo, "--epochs", str(c.dpo_epochs)], rep),
        ),
        Step("register", lambda: (folder / "registered").is_file(), lambda: _register(reg, candidate_dir, folder, current.version)),
        Step("eval current", (eval_dir(current.version) / "report.json").is_file, lambda: evaluate(current.path, current.version)),
        Step(
            "eval candidate",
            lambda: (eval_dir(candidate_version()) / "report.json").is_file(),
            lambda: evaluate(candidate_dir, candidate_version()),
        ),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "round.json").write_text(json.dumps({**asdict(c), "current": current.version, "pairs": len(ids)}, indent=2, default=str))
    for i, step in enumerate(steps, 1):
        if step.done():
            rep.note(f"step {i}/{len(steps)} {step.name}: done earlier, skipped")
            continue
        rep.note(f"step {i}/{len(steps)} {step.name} ...")
        step.run()
    cand = candidate_version()
    cur_report, cand_report = eval_dir(current.version) / "report.json", eval_dir(cand) / "report.json"
    cur_row, cand_row = summary(load_report_row(cur_report)), summary(load_report_row(cand_report))
    decision = gate(cur_row, cand_row, c.tolerance)
    result = RoundResult("promoted" if decision.promote else "kept", len(ids), current.version, cand, tuple(decision.reasons), folder)
    # decision, ledger and report first, the promotion last: a crash in between is finished by the next run
    _write_json(folder / DECISION, {"status": result.status, "candidate": cand, "parent": current.version, "reasons": decision.reasons})
    append_ledger(ledger, ids)
    swap = {"current": swap_delta(cur_report), "candidate": swap_delta(cand_report)}
    _report(folder, result, cur_row, cand_row, c, swap)
    if decision.promote:
        _promote(reg, c, folder, cand, decision.reasons)
    return result


def _write_json(path: Path, doc: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _promote(reg: ModelRegistry, c: RoundConfig, folder: Path, candidate: str, reasons: Sequence[str]) -> None:
    reg.promote(candidate, c.deployment, reason=f"round {folder.name}: " + "; ".join(reasons))
    (folder / PROMOTED).write_text(candidate + "\n")  # done: a later rollback is the operator's, never undone by a rerun


def _pending_promotion(reg: ModelRegistry, c: RoundConfig, current: str) -> RoundResult | None:
    """A round of ``current`` that decided to promote and crashed before it did: finish it."""
    for folder in sorted(c.out.glob(f"{current}-*")):
        path = folder / DECISION
        if not path.is_file() or (folder / PROMOTED).is_file():
            continue
        d = json.loads(path.read_text())
        if d.get("status") == "promoted" and d.get("parent") == current:
            _promote(reg, c, folder, str(d["candidate"]), d.get("reasons", []))
            pairs = len((folder / "pairs.jsonl").read_text().splitlines())
            return RoundResult("promoted", pairs, current, str(d["candidate"]), tuple(d.get("reasons", [])), folder)
    return None


def _register(reg: ModelRegistry, candidate_dir: Path, folder: Path, parent: str) -> None:
    pairs = folder / "pairs.jsonl"
    extra = {
        "parent": parent,
        "round": folder.name,
        "pairs_file_sha256": hashlib.sha256(pairs.read_bytes()).hexdigest(),  # the exact preference set it was tuned on
        "pairs": len(pairs.read_text().splitlines()),
    }
    entry = reg.register(candidate_dir, note=f"DPO round {folder.name} from {parent}", extra=extra)
    (folder / "registered").write_text(entry.version + "\n")


def _report(
    folder: Path,
    r: RoundResult,
    cur: dict[str, float | None],
    cand: dict[str, float | None],
    c: RoundConfig,
    swap: dict[str, float | None],
) -> None:
    keys = (*HEADLINE, "json_valid")
    rows = [f"| {k} | {_fmt(cur[k])} | {_fmt(cand[k])} |" for k in keys]
    rows.append(f"| colour: true minus swapped photos (reads the photo) | {_fmt(swap['current'])} | {_fmt(swap['candidate'])} |")
    lines = [
        f"# Improvement round {folder.name}",
        "",
        f"Current `{r.current}`, candidate `{r.candidate}` (DPO on {r.pairs} preference pairs of the current model's "
        f"bottom verdicts). Evaluated on `{c.data}` split `{c.split}`" + (f" (first {c.limit} items)" if c.limit else "") + ".",
        "",
        f"**Decision: {r.status}** (tolerance {c.tolerance:g}; JSON validity must be 1.0).",
        "",
        "| metric | current | candidate |",
        "| --- | ---: | ---: |",
        *rows,
        "",
        *(f"- {reason}" for reason in r.reasons),
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines))
    bars_png(
        list(keys),
        {r.current: [cur[k] or 0.0 for k in keys], str(r.candidate): [cand[k] or 0.0 for k in keys]},
        folder / "metrics.png",
        f"round {folder.name}: {r.status}",
    )


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


__all__ = ["RoundConfig", "RoundResult", "StepFailed", "run_round"]
