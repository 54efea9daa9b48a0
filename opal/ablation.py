"""The paper's ablation table by one command: baselines, untrained, SFT on raw / MACE-refined data, + LACU, + DPO.

Every row is trained and scored by the project's own commands, so the table measures what a user gets:

==========================  ==========================================================================
row                         how it is made
==========================  ==========================================================================
majority baseline           per category, fitted on the train split (:mod:`training.evaluate`)
retrieval baseline          nearest training photo of the same category, its listing copied
untrained                   the base model as built (``opal model init-tiny``), no training
SFT, raw listings           ``opal train sft --no-refine``: the catalogue's own titles and aspects
SFT, MACE-refined           ``opal train sft``: listings refined against the image (the recipe's default)
+ LACU                      ``opal train sft --lacu``: plus buyer/seller Q&A rows about the photo
+ DPO                       ``opal train dpo`` on pairs the + LACU model earns on training items
                            (``training.preferences``: its Mostly/Incorrectly Generated outputs)
==========================  ==========================================================================

Each model is served by vLLM (:func:`opal.vllm_server.start_vllm`) and scored by
:func:`training.evaluate.run_eval` on the grouped test split with the image-swap control, the
baselines fitted on the train split. Columns: ROUGE-L F1, aspect F1, colour accuracy, the
image-swap deltas (true minus swapped photos) of colour accuracy and aspect F1, JSON validity and
schema recall (marked: guaranteed by constrained decoding).

Contract
- Steps run in order and each leaves a completion marker: a model folder's ``opal_model.json``
  (written last by training), ``pairs.jsonl`` (written to a temporary name, then renamed), an
  evaluation's ``report.json``. A rerun with the same ``--out`` skips finished steps and continues
  a stopped training from its newest checkpoint (``--resume``), so a crash or Ctrl-C at any point
  loses at most the step in progress. ``ablation.json`` records the inputs; a rerun with other
  inputs into the same folder is refused.
- Progress: a line per step as it starts and ends (with its time), and the step's own progress
  (training steps with ETA, generation counts) as it goes.
- Writes ``report.md``, ``report.json`` and ``ablation.png`` in ``--out`` at the end (rewritten from
  the evaluations on every run, so they are idempotent).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from opal.vllm_server import start_vllm
from schemas.category import default_categories
from schemas.settings import OpalSettings
from training.eval_report import write_eval
from training.evaluate import MAJORITY, MODEL, RETRIEVAL, SWAPPED, EvalConfig, run_eval
from training.progress import Reporter, fmt_duration

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("rouge_l_f1", "aspect_f1", "colour_accuracy", "swap_delta_colour", "swap_delta_aspect_f1", "json_valid", "schema_recall")
GUARANTEED = ("json_valid", "schema_recall")
LABELS = {
    "rouge_l_f1": "ROUGE-L F1",
    "aspect_f1": "aspect F1",
    "colour_accuracy": "colour acc.",
    "swap_delta_colour": "swap Δ colour",
    "swap_delta_aspect_f1": "swap Δ aspect F1",
    "json_valid": "JSON valid †",
    "schema_recall": "schema recall †",
}


@dataclass(frozen=True)
class AblationConfig:
    """One ablation run; every field documents itself."""

    data: Path = field(metadata={"help": "ABO-format folder: its train split trains and fits, its test split is scored."})
    out: Path = field(metadata={"help": "Folder for models, pairs, evaluations and the report (rerun to resume)."})
    base: Path | None = field(default=None, metadata={"help": "Base model folder; None: `opal model init-tiny` into out/base."})
    seed: int = field(default=0, metadata={"help": "Seed of the tiny base model and of the image swap."})
    pairs_items: int = field(default=1000, metadata={"help": "Train items the + LACU model is judged on to build DPO pairs."})
    dpo_epochs: float = field(default=1.0, metadata={"help": "Passes over the DPO pairs."})
    concurrency: int = field(default=32, metadata={"help": "Requests in flight to vLLM during pairs and evaluations."})

    def record(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Row:
    """A row of the table: its label and the model folder (under ``out``) it evaluates; None for a baseline."""

    label: str
    model: str | None
    note: str


ROWS = (
    Row("majority baseline", None, "per category, fitted on the train split"),
    Row("retrieval baseline", None, "nearest training photo of the category, its listing copied"),
    Row("untrained", "base", "the base model as built"),
    Row("SFT, raw listings", "sft-raw", "train sft --no-refine"),
    Row("SFT, MACE-refined", "sft-mace", "train sft"),
    Row("+ LACU", "sft-lacu", "train sft --lacu"),
    Row("+ DPO", "dpo", "train dpo on the + LACU model's bottom-verdict pairs"),
)


@dataclass
class Step:
    name: str
    done: Callable[[], bool]
    run: Callable[[], None]


class StepFailed(RuntimeError):
    """A step's command failed; the message names it and its log."""


def _opal(args: Sequence[str], reporter: Reporter) -> None:
    """Run ``opal ARGS`` (this interpreter), streaming its output indented; :class:`StepFailed` on a non-zero exit."""
    cmd = [sys.executable, "-m", "opal.cli", *args]
    p = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert p.stdout is not None
    tail: list[str] = []
    for line in p.stdout:
        tail = [*tail[-40:], line]
        reporter.console.print("    " + line.rstrip(), highlight=False, markup=False, soft_wrap=True)
    if p.wait() != 0:
        raise StepFailed(f"`opal {' '.join(args)}` exited {p.returncode}:\n{''.join(tail)}")


class Ablation:
    """Plans and runs the steps (see the module contract)."""

    def __init__(self, config: AblationConfig, reporter: Reporter | None = None) -> None:
        self.c = config
        self.rep = reporter or Reporter(Console())
        self.settings = OpalSettings()

    # -- paths --------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        if name == "base" and self.c.base is not None:
            return self.c.base
        return self.c.out / name

    def eval_dir(self, name: str) -> Path:
        return self.c.out / "eval" / name

    @property
    def pairs(self) -> Path:
        return self.c.out / "pairs.jsonl"

    # -- steps --------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        data = str(self.c.data)
        out: list[Step] = []

        def trained(name: str) -> Callable[[], bool]:
            return lambda: (self.model_dir(name) / "opal_model.json").is_file()

        if self.c.base is None:
            base = str(self.model_dir("base"))
            out.append(
                Step("base", trained("base"), lambda: _opal(["model", "init-tiny", "--out", base, "--seed", str(self.c.seed)], self.rep))
            )
        base = str(self.model_dir("base"))
        for name, extra in (("sft-raw", ["--no-refine"]), ("sft-mace", []), ("sft-lacu", ["--lacu"])):
            args = ["train", "sft", "--base", base, "--data", data, "--out", str(self.model_dir(name)), "--resume", *extra]
            out.append(Step(name, trained(name), lambda a=args: _opal(a, self.rep)))  # type: ignore[misc]
        out.append(Step("pairs", self.pairs.is_file, self._pairs))
        dpo = ["train", "dpo", "--base", str(self.model_dir("sft-lacu")), "--pairs", str(self.pairs), "--out", str(self.model_dir("dpo"))]
        out.append(Step("dpo", trained("dpo"), lambda: _opal([*dpo, "--epochs", str(self.c.dpo_epochs)], self.rep)))
        for row in ROWS:
            if row.model is not None:
                name = row.model
                out.append(Step(f"eval {name}", (self.eval_dir(name) / "report.json").is_file, lambda n=name: self._eval(n)))  # type: ignore[misc]
        return out

    def _serve(self, name: str) -> tuple[Any, str]:
        run_dir = self.settings.embedded.run_dir.resolve()
        self.rep.note(f"starting vLLM on {self.model_dir(name)} ...")
        return start_vllm(self.model_dir(name), self.settings.vllm, run_dir, timeout_s=600)

    def _progress(self, what: str) -> Callable[[int, int], None]:
        last = [0.0]

        def show(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 10 or done == total:
                last[0] = now
                self.rep.note(f"    {what}: {done:,}/{total:,}")

        return show

    def _pairs(self) -> None:
        from inference.client import ListingClient
        from training.preferences import build_pairs, write_pairs
        from training.sft import train_split_items

        cats = default_categories()
        items = train_split_items(self.c.data, cats, limit=self.c.pairs_items)
        proc, url = self._serve("sft-lacu")
        try:

            async def go() -> Any:
                async with ListingClient([url], max_concurrency=self.c.concurrency, timeout_s=300) as client:
                    return await build_pairs(items, client, cats, progress=self._progress("judging train items"))

            summary = asyncio.run(go())
        finally:
            proc.stop()
        if summary.failed == summary.items:
            raise StepFailed(f"all {summary.items} generations failed while building pairs")
        tmp = self.pairs.with_suffix(".tmp")
        write_pairs(summary.pairs, tmp)
        tmp.replace(self.pairs)
        counts = ", ".join(f"{v}: {n}" for v, n in sorted(summary.verdicts.items()))
        self.rep.note(f"    {len(summary.pairs)} pairs from {summary.items} items ({counts}; failed {summary.failed})")

    def _eval(self, name: str) -> None:
        proc, url = self._serve(name)
        try:
            config = EvalConfig(
                data=self.c.data,
                endpoint=url,
                split="test",
                concurrency=self.c.concurrency,
                seed=self.c.seed,
                timeout_s=300,
                repetition_penalty=self.settings.vllm.repetition_penalty,
                frequency_penalty=self.settings.vllm.frequency_penalty,
            )
            result = asyncio.run(run_eval(config, progress=self._progress(f"generating for {name} (true and swapped photos)")))
        finally:
            proc.stop()
        write_eval(result, self.eval_dir(name))

    # -- run ----------------------------------------------------------------------------
    def check_inputs(self) -> None:
        """Write ``ablation.json``, or refuse when the folder holds a run with other inputs (``ValueError``)."""
        self.c.out.mkdir(parents=True, exist_ok=True)
        path = self.c.out / "ablation.json"
        if path.is_file():
            before = json.loads(path.read_text())
            if before != self.c.record():
                diff = ", ".join(f"{k}: {before.get(k)!r} -> {v!r}" for k, v in self.c.record().items() if before.get(k) != v)
                raise ValueError(f"{self.c.out} holds an ablation with other inputs ({diff}): use another --out or the same options")
        path.write_text(json.dumps(self.c.record(), indent=2) + "\n")

    def run(self) -> dict[str, Any]:
        """Run every unfinished step, then write and return the report (see the module contract)."""
        self.check_inputs()
        steps = self.steps()
        for i, step in enumerate(steps, 1):
            if step.done():
                self.rep.note(f"step {i}/{len(steps)} {step.name}: done earlier, skipped")
                continue
            t0 = time.monotonic()
            self.rep.note(f"step {i}/{len(steps)} {step.name} ...")
            step.run()
            self.rep.note(f"step {i}/{len(steps)} {step.name}: finished in {fmt_duration(time.monotonic() - t0)}")
        return self.write_report()

    # -- report -------------------------------------------------------------------------
    def table(self) -> list[dict[str, Any]]:
        """One dict per row: label, note, model version, and the columns (None where not applicable)."""
        reports = {r.model: json.loads((self.eval_dir(r.model) / "report.json").read_text()) for r in ROWS if r.model}
        any_report = next(iter(reports.values()))
        rows: list[dict[str, Any]] = []
        for r in ROWS:
            if r.model is None:
                system = {"majority baseline": MAJORITY, "retrieval baseline": RETRIEVAL}[r.label]
                s = any_report["systems"][system]
                rows.append({"row": r.label, "note": r.note, "model": "-", **_columns(s, None)})
            else:
                rep = reports[r.model]
                rows.append(
                    {"row": r.label, "note": r.note, "model": rep["model"], **_columns(rep["systems"][MODEL], rep["systems"].get(SWAPPED))}
                )
        return rows

    def write_report(self) -> dict[str, Any]:
        from opal.plots import bars_png

        rows = self.table()
        first = json.loads((self.eval_dir("base") / "report.json").read_text())
        report = {
            "date": time.strftime("%Y-%m-%d"),
            "data": str(self.c.data),
            "test_items": first["items"],
            "train_items": first["train_items"],
            "inputs": self.c.record(),
            "guaranteed_by_constrained_decoding": list(GUARANTEED),
            "rows": rows,
        }
        (self.c.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (self.c.out / "report.md").write_text(markdown(report))
        metrics = [c for c in COLUMNS if not c.startswith("swap_")]
        series = {r["row"]: [float(r[m] or 0.0) for m in metrics] for r in rows}
        bars_png([LABELS[m] for m in metrics], series, self.c.out / "ablation.png", f"ablation on {self.c.data.name}/test; † guaranteed")
        return report


def _columns(s: dict[str, Any], swapped: dict[str, Any] | None) -> dict[str, float | None]:
    def delta(k: str) -> float | None:
        if swapped is None or s.get(k) is None or swapped.get(k) is None:
            return None
        return float(s[k]) - float(swapped[k])

    return {
        "rouge_l_f1": s["rouge_l_f1"],
        "aspect_f1": s["aspect_f1"],
        "colour_accuracy": s["colour_accuracy"],
        "swap_delta_colour": delta("colour_accuracy"),
        "swap_delta_aspect_f1": delta("aspect_f1"),
        "json_valid": s["json_valid"],
        "schema_recall": s["schema_recall"],
    }


def fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """The ablation table as Markdown (report.md and docs)."""
    head = "| row | " + " | ".join(LABELS[c] for c in COLUMNS) + " | model |"
    lines = [
        f"# Ablation on {Path(report['data']).name} ({report['date']})",
        "",
        f"Scored on the grouped test split ({report['test_items']} items); baselines fitted on {report['train_items']} train items. "
        "Swap Δ: metric with true photos minus with photos permuted within category (a model that reads the photo loses).",
        "",
        head,
        "| --- |" + " ---: |" * len(COLUMNS) + " --- |",
    ]
    for r in report["rows"]:
        cells = [fmt(r[c], signed=c.startswith("swap_")) for c in COLUMNS]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {r['model']} |")
    lines += ["", "† guaranteed by constrained decoding (json_schema structured output): 1.0 for any weights.", ""]
    lines += ["| row | how it is made |", "| --- | --- |", *(f"| {r['row']} | {r['note']} |" for r in report["rows"]), ""]
    return "\n".join(lines)
