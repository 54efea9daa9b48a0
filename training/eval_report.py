"""Rendering of an evaluation run (:func:`training.evaluate.run_eval`): tables, report.md, report.json, plot series.

:func:`tables` gives the text tables shared by ``report.md`` and the CLI; :func:`markdown` and
:func:`report_json` the two reports; :func:`plot_series` the grouped bar chart's data; :func:`write_eval`
writes ``predictions.jsonl``, ``references.jsonl``, ``report.json`` and ``report.md`` under the output folder
(overwriting them: re-running is safe; report.json last and whole). Metrics guaranteed by constrained decoding
are marked in every table and report (see :mod:`training.evaluate`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from training.evaluate import GUARANTEED, GUARANTEED_NOTE, METRICS, MODEL, REFERENCE, RETRIEVAL, SWAPPED, EvalResult, Value


@dataclass(frozen=True)
class TextTable:
    """A rendered table (cells are strings) shared by report.md and the CLI."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def fmt(v: Value, signed: bool = False) -> str:
    """3 decimals for floats (``+`` sign with ``signed``), ints as is, ``–`` for None."""
    if v is None:
        return "–"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    x = round(float(v), 3) + 0.0  # + 0.0: no "-0.000"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def metric_label(metric: str) -> str:
    """Column label; metrics guaranteed by constrained decoding carry a dagger."""
    return f"{metric} †" if metric in GUARANTEED else metric


def fit_line(result: EvalResult) -> str:
    """One sentence on what the baselines were fitted on, flagging in-sample fitting."""
    line = f"Baselines fitted on {result.n_train} train items of `{result.fit_source}`"
    if result.in_sample:
        n = len(result.references)
        line += f": **baseline fitted in-sample** ({result.in_sample} of the {n} scored items are in it; baseline scores are inflated)"
    else:
        line += " (no scored item among them)"
    return line + f". Scored items whose title group occurs in the training data: {result.group_overlap}."


def swap_line(result: EvalResult) -> str:
    """One sentence on what the image-swap control did."""
    n = len(result.references)
    if SWAPPED not in result.predictions:
        return "Image-swap control: off."
    if not result.swap:
        return f"Image-swap control: none of the {n} items could be swapped (every category has one scored item); it says nothing here."
    return (
        f"Image-swap control (seed {result.config.seed}): {len(result.swap)} of {n} items generated again with another "
        f"item's photo of the same category ({n - len(result.swap)} alone in their category kept theirs); "
        f"{result.identical_under_swap} of the {len(result.swap)} swapped outputs are byte-identical to the true-photo ones; "
        f"failed {result.swapped_failed}, rejected {result.swapped_rejected}. "
        "A model that reads the photo loses when the photos are swapped."
    )


def coverage_line(result: EvalResult) -> str:
    """How many scored items had their own category schema (schema recall is computed over those)."""
    r = result.reports[MODEL]
    return (
        f"Schema recall over the {r.n - r.generic_items} items with a category schema ({r.schema_coverage:.0%}); "
        f"{r.generic_items} fell back to the generic schema."
    )


def tables(result: EvalResult) -> list[TextTable]:
    """Systems x metrics; swap deltas; per-aspect accuracy; distinct titles per category."""
    systems = list(result.predictions)
    rows = dict(result.table())
    out = [
        TextTable(
            f"{result.model}: {len(result.references)} items of {result.config.data.name}/{result.config.split}",
            ["system", *(metric_label(m) for m in METRICS), "distinct titles"],
            [[s, *(fmt(rows[s][m]) for m in METRICS), fmt(rows[s]["distinct_titles"])] for s in systems],
            f"† {GUARANTEED_NOTE} {coverage_line(result)}",
        )
    ]
    deltas = result.deltas()
    if deltas:
        out.append(
            TextTable(
                "image-swap control: true photos minus swapped photos",
                ["metric", "true photos", "photos swapped", "delta"],
                [[metric_label(m), fmt(rows[MODEL][m]), fmt(rows[SWAPPED][m]), fmt(deltas[m], signed=True)] for m in METRICS],
                swap_line(result),
            )
        )
    n_refs = {name: next(iter(result.accuracy.values()))[name].n for name in result.aspect_names}
    out.append(
        TextTable(
            "per-aspect accuracy (where the reference has the aspect; a missing prediction is wrong)",
            ["aspect", "references", *systems],
            [[name, str(n_refs[name]), *(fmt(result.accuracy[s][name].accuracy) for s in systems)] for name in result.aspect_names],
        )
    )
    cats = result.titles[REFERENCE]
    out.append(
        TextTable(
            "distinct titles per category (a collapsed or looping model writes 1)",
            ["category", "items", REFERENCE, *systems],
            [[cat, str(n), str(d), *(str(result.titles[s][cat][0]) for s in systems)] for cat, (d, n) in cats.items()],
        )
    )
    return out


def _md_table(t: TextTable) -> list[str]:
    lines = [f"## {t.title}", "", "| " + " | ".join(t.headers) + " |", "| --- | " + " | ".join("---:" for _ in t.headers[1:]) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in t.rows]
    return lines + (["", t.note] if t.note else []) + [""]


def markdown(result: EvalResult) -> str:
    c = result.config
    lines = [
        f"# Evaluation: {result.model}",
        "",
        f"Data `{c.data}`, split `{c.split}` ({len(result.references)} items). {fit_line(result)} "
        f"Retrieval baseline: nearest training photo of the same category (16x16 thumbnail + HSV histogram, cosine); "
        f"unreadable training photos skipped: {result.retrieval_skipped}. "
        f"Model outputs rejected by the client: {result.rejected}; failed requests: {result.failed}.",
        "",
    ]
    if not result.deltas():  # otherwise the line is the note under the swap table
        lines += [swap_line(result), ""]
    for t in tables(result):
        lines += _md_table(t)
    lines += ["## Per aspect name (model): precision / recall (predicted, reference)", ""]
    for name, (p, r, n_p, n_r) in sorted(result.reports[MODEL].per_aspect.items(), key=lambda kv: -kv[1][3]):
        lines.append(f"- {name}: {p:.2f} / {r:.2f} ({n_p}, {n_r})")
    return "\n".join(lines) + "\n"


def plot_series(result: EvalResult) -> tuple[list[str], dict[str, list[float]]]:
    """(groups, system -> values) for a grouped bar chart: headline metrics, then per-aspect accuracies (None as 0).

    Metrics guaranteed by constrained decoding end in ``*`` (the PNG font has no dagger).
    """
    groups = [f"{m}*" if m in GUARANTEED else m for m in METRICS] + [f"acc {n}" for n in result.aspect_names]
    rows = dict(result.table())
    series = {}
    for s in result.predictions:
        values = [rows[s][m] for m in METRICS] + [result.accuracy[s][n].accuracy for n in result.aspect_names]
        series[s] = [float(v) if v is not None else 0.0 for v in values]
    return groups, series


def report_json(result: EvalResult) -> dict[str, object]:
    """The machine-readable report (written as report.json)."""
    c = result.config
    return {
        "model": result.model,
        "data": str(c.data),
        "split": c.split,
        "items": len(result.references),
        "train_data": str(result.fit_source),
        "train_items": result.n_train,
        "baseline_fitted_in_sample": bool(result.in_sample),
        "in_sample_items": result.in_sample,
        "group_overlap_items": result.group_overlap,
        "failed": result.failed,
        "rejected": result.rejected,
        "guaranteed_by_constrained_decoding": list(GUARANTEED),
        "systems": dict(result.table()),
        "swap_control": {
            "enabled": c.swap_control,
            "seed": c.seed,
            "swapped_items": len(result.swap),
            "identical_outputs": result.identical_under_swap,
            "failed": result.swapped_failed,
            "rejected": result.swapped_rejected,
            "deltas": result.deltas(),
        },
        "aspect_accuracy": {
            s: {n: {"accuracy": a.accuracy, "correct": a.correct, "n": a.n} for n, a in acc.items()} for s, acc in result.accuracy.items()
        },
        "distinct_titles": {s: {cat: {"distinct": d, "items": n} for cat, (d, n) in t.items()} for s, t in result.titles.items()},
        "retrieval_skipped_train_photos": result.retrieval_skipped,
    }


def _provenance(result: EvalResult, system: str, item_id: str) -> dict[str, str]:
    if system == SWAPPED:
        return {"photo_of": result.swap.get(item_id, item_id)}
    if system == RETRIEVAL and item_id in result.neighbours:
        return {"neighbour": result.neighbours[item_id]}
    return {}


def write_eval(result: EvalResult, out_dir: Path) -> list[Path]:
    """Write the run's files (see the module contract); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in ("predictions.jsonl", "references.jsonl", "report.json", "report.md")]
    with paths[0].open("w") as f:
        for system, preds in result.predictions.items():
            for item_id, output in preds.items():
                row = {"system": system, "id": item_id, "output": output, **_provenance(result, system, item_id)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths[1].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.references))
    paths[3].write_text(markdown(result))
    tmp = paths[2].with_suffix(".json.tmp")  # report.json last and whole: callers treat it as "the evaluation is done"
    tmp.write_text(json.dumps(report_json(result), indent=2) + "\n")
    tmp.replace(paths[2])
    return paths
