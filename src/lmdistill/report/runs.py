"""``lmdistill report RUN_DIRS...``: the demo's table and curves for any finished or running runs.

Each run directory is what ``lmdistill pretrain`` / ``distill`` / ``sft`` wrote: ``config.yaml`` and
``metrics.jsonl`` (the final evaluation is its last ``eval`` record). Nothing is recomputed: the report reads
what training logged, so it works on runs from other machines too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lmdistill.errors import DataError
from lmdistill.report.plots import markdown_table, plot_curves, read_metrics

COLUMNS = [
    ("run", "run", ""), ("objective", "objective", ""), ("steps", "steps", ""),
    ("perplexity", "val perplexity", ".2f"), ("bits_per_byte", "val bits/byte", ".4f"),
    ("top1_agreement", "top-1 agreement", ".3f"), ("kl_to_teacher", "KL to teacher", ".4f"),
    ("tokens_per_second", "train tokens/s", ",.0f"), ("status", "status", ""),
]


def _objective_label(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and "mix" in spec:
        return " + ".join(f"{part.get('weight', 1)}*{_objective_label(part)}" for part in spec["mix"])
    if isinstance(spec, dict):
        params = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("name", "weight"))
        return f"{spec.get('name')}({params})" if params else str(spec.get("name"))
    return str(spec)


def summarize_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One table row (the last evaluation and the training speed) and the metric records of a run directory."""
    run_dir = Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        final = run_dir.parent if run_dir.name == "final" else None
        hint = f"did you mean {final}?" if final is not None and (final / "metrics.jsonl").exists() else \
            "give the directory a pretrain/distill/sft run wrote (its output_dir)"
        raise DataError("not a run directory: no metrics.jsonl", path=run_dir, hint=hint)
    try:
        records = read_metrics(metrics_file)
    except json.JSONDecodeError as exc:
        raise DataError(f"metrics.jsonl line {exc.lineno} is not JSON", path=metrics_file) from None
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").exists():
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    evals = [r for r in records if r.get("kind") == "eval"]
    trains = [r for r in records if r.get("kind") == "train"]
    planned = (config.get("train") or {}).get("steps")
    last_step = max((r.get("step", 0) for r in records), default=0)
    row: dict[str, Any] = {
        "run": run_dir.name if run_dir.name != "run" else str(run_dir),
        "objective": _objective_label(config.get("objective", "?")),
        "steps": last_step,
        "status": "finished" if (run_dir / "final").is_dir() else f"at step {last_step}/{planned or '?'}",
    }
    if evals:
        row.update({k: evals[-1].get(k) for k in ("perplexity", "bits_per_byte", "top1_agreement", "kl_to_teacher")})
    if trains:
        row["tokens_per_second"] = trains[-1].get("tokens_per_second")
    return row, records


def report_runs(run_dirs: list[str | Path], output: str | Path, *, title: str = "") -> dict[str, Any]:
    """Write ``table.md``, ``results.json`` and ``curves.png`` for the runs into ``output``; returns the rows."""
    if not run_dirs:
        raise DataError("report needs at least one run directory")
    rows, curves = [], {}
    for run_dir in run_dirs:
        row, records = summarize_run(run_dir)
        name = row["run"]
        while name in curves:  # two runs with the same directory name
            name += "'"
        row["run"] = name
        rows.append(row)
        curves[name] = records
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, COLUMNS)
    (output / "table.md").write_text(table + "\n", encoding="utf-8")
    (output / "results.json").write_text(json.dumps({"rows": rows}, indent=2), encoding="utf-8")
    plot = plot_curves(curves, output / "curves.png", title=title)
    return {"rows": rows, "table": table, "files": [str(output / "table.md"), str(output / "results.json"), str(plot)]}
