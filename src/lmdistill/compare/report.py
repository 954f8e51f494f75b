"""The comparison report: ``report.md``, a self-contained ``report.html``, ``results.json`` and the plots.

* **Table**: one row per method setting, every metric as mean +- sample standard deviation over the finished
  seeds; the best mean of each column is marked (bold; lower is better for bits per byte, KL, time and memory,
  higher for agreement, ROUGE-L, exact match and tokens/s). The teachers' own bits per byte (and task scores)
  follow as reference rows (never marked).
* **Differences to the baseline row** (``baseline:``, plain forward KL by default) with the same other axes
  (for a row that changes another axis too, the baseline row closest to it: :func:`baseline_row`):
  mean difference over seeds paired by seed, its standard deviation and the two-sided p-value of the paired
  t-test (:mod:`lmdistill.report.stats`). Few seeds give wide intervals: read p as a screen, not a verdict.
* **Plots**: validation bits per byte against steps (mean over seeds, +- one standard deviation band), and
  per-method means of the quality metrics.
* **Provenance**: the compare config after overrides, each row's full run config, how the teachers were built,
  package versions, git commit, and the cells that were skipped or failed with their reasons.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from lmdistill.compare.cell import RESULT_NAME, cell_dir, corpus_name
from lmdistill.compare.grid import Cell, Row
from lmdistill.report.stats import PairedTest, Summary, paired_t_test, summarize

__all__ = ["MetricSpec", "metric_specs", "collect", "RowResults", "row_results", "best_rows", "baseline_row",
           "baseline_tests", "write_report", "environment"]


@dataclass(frozen=True)
class MetricSpec:
    key: str
    header: str
    fmt: str
    direction: int  # +1 higher is better, -1 lower is better, 0 not ranked
    quality: bool  # compared with the baseline by the paired test


_FIXED = [
    MetricSpec("bits_per_byte", "bits/byte", ".4f", -1, True),
    MetricSpec("top1_agreement", "top-1 agreement", ".4f", +1, True),
    MetricSpec("kl_to_teacher", "KL to teacher", ".4f", -1, True),
    MetricSpec("rouge_l", "ROUGE-L", ".4f", +1, True),
    MetricSpec("exact_match", "exact match", ".4f", +1, True),
    MetricSpec("steps", "steps", ".0f", 0, False),
    MetricSpec("tokens_per_second", "train tokens/s", ",.0f", +1, False),
    MetricSpec("train_seconds", "train s", ".1f", -1, False),
    MetricSpec("wall_seconds", "cell wall s", ".0f", -1, False),
    MetricSpec("peak_rss_mb", "peak memory MiB", ".0f", -1, False),
]


def metric_specs(keys: set[str], in_domain: str | None = None) -> list[MetricSpec]:
    """The report's columns for the metrics present: in-domain first, then out-of-domain, then the rest."""
    out = [MetricSpec(s.key, f"{in_domain} bits/byte" if in_domain else "validation bits/byte", s.fmt, s.direction, s.quality)
           for s in _FIXED[:1] if s.key in keys]
    out += [MetricSpec(k, f"{k.split('/', 1)[1]} bits/byte (OOD)", ".4f", -1, True) for k in sorted(keys) if k.startswith("ood/")]
    out += [s for s in _FIXED[1:] if s.key in keys]
    return out


@dataclass
class CellRecord:
    cell: Cell
    status: str  # done | failed | skipped | not run
    result: dict[str, Any] | None = None
    error: str | None = None


def collect(cells: list[Cell], output_dir: Path) -> list[CellRecord]:
    records = []
    for cell in cells:
        where = cell_dir(output_dir, cell.id)
        result_path, failure_path = where / RESULT_NAME, where / "failure.json"
        if cell.skip is not None:
            records.append(CellRecord(cell, "skipped", error=cell.skip))
        elif result_path.exists():
            records.append(CellRecord(cell, "done", result=json.loads(result_path.read_text(encoding="utf-8"))))
        elif failure_path.exists():
            records.append(CellRecord(cell, "failed", error=json.loads(failure_path.read_text(encoding="utf-8"))["error"]))
        else:
            records.append(CellRecord(cell, "not run"))
    return records


@dataclass
class RowResults:
    row: Row
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> seed -> value
    cell_ids: list[str] = field(default_factory=list)

    def summary(self, key: str) -> Summary | None:
        seeds = self.values.get(key)
        return summarize(list(seeds.values())) if seeds else None


def row_results(records: list[CellRecord]) -> list[RowResults]:
    rows: dict[Row, RowResults] = {}
    for record in records:
        entry = rows.setdefault(record.cell.row, RowResults(record.cell.row))
        if record.result is None:
            continue
        entry.cell_ids.append(record.cell.id)
        for key, value in record.result["metrics"].items():
            if isinstance(value, (int, float)):
                entry.values.setdefault(key, {})[record.cell.seed] = float(value)
    return list(rows.values())


def best_rows(rows: list[RowResults], spec: MetricSpec) -> set[int]:
    """Indices of the rows whose mean is the best of the column (ties all marked; none when all tie)."""
    if spec.direction == 0:
        return set()
    means = {i: s.mean for i, r in enumerate(rows) if (s := r.summary(spec.key)) is not None}
    if len(means) < 2 or len(set(means.values())) == 1:
        return set()
    target = max(means.values()) if spec.direction > 0 else min(means.values())
    return {i for i, m in means.items() if m == target}


AXES = tuple(f.name for f in fields(Row))


def is_baseline(row: Row, baseline: dict[str, str]) -> bool:
    return all(row.axis(k) == v for k, v in baseline.items())


def baseline_row(row: Row, baseline: dict[str, str], present: set[Row]) -> Row | None:
    """The row ``row`` is compared with: the ``baseline`` axes' labels with ``row``'s other axes. Where the grid
    has no such row (a row that changes another axis too, e.g. a regime row with its own objective), the
    baseline row that shares most of ``row``'s other axes, when exactly one does. None for a baseline row
    itself and for a row with no (or no unique) closest baseline row."""
    if is_baseline(row, baseline):
        return None
    exact = Row(**{a: baseline.get(a, row.axis(a)) for a in AXES})
    if exact in present:
        return exact
    candidates = [r for r in present if is_baseline(r, baseline)]
    shared = {r: sum(r.axis(a) == row.axis(a) for a in AXES if a not in baseline) for r in candidates}
    closest = [r for r in candidates if shared[r] == max(shared.values())] if shared else []
    return closest[0] if len(closest) == 1 else None


def baseline_tests(rows: list[RowResults], baseline: dict[str, str], specs: list[MetricSpec]
                   ) -> dict[Row, tuple[Row, dict[str, PairedTest]]]:
    """For each row with a baseline row (:func:`baseline_row`): the paired test of each quality metric over
    the seeds both finished."""
    by_row = {r.row: r for r in rows}
    out = {}
    for r in rows:
        base_row = baseline_row(r.row, baseline, set(by_row))
        if base_row is None:
            continue
        base = by_row[base_row]
        tests = {}
        for spec in specs:
            if not spec.quality:
                continue
            mine, theirs = r.values.get(spec.key, {}), base.values.get(spec.key, {})
            seeds = sorted(set(mine) & set(theirs))
            if seeds:
                tests[spec.key] = paired_t_test([mine[s] for s in seeds], [theirs[s] for s in seeds])
        out[r.row] = (base_row, tests)
    return out


def _mean_sd(summary: Summary | None, fmt: str) -> str:
    if summary is None:
        return "-"
    if summary.std is None:
        return format(summary.mean, fmt)
    return f"{format(summary.mean, fmt)} ± {format(summary.std, fmt)}"


def _diff(test: PairedTest | None, fmt: str) -> str:
    if test is None:
        return "-"
    text = f"{test.mean_diff:+{fmt.lstrip(',')}}"
    if test.std_diff is not None:
        text += f" ± {format(test.std_diff, fmt.lstrip(','))}"
    return text + (f" (p={test.p:.3f})" if test.p is not None else " (1 seed)")


def environment() -> dict[str, str]:
    """Versions of what produced the numbers: Python, platform, key packages, the git commit of lmdistill."""
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor() or "-"}
    for package in ("lmdistill", "torch", "transformers", "tokenizers", "accelerate", "numpy", "safetensors"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = "not installed"
    import lmdistill

    repo = Path(lmdistill.__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, timeout=10)
        if commit.returncode == 0:
            env["git commit"] = commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    import os

    import torch

    env["torch threads"] = str(torch.get_num_threads())
    for name in sorted(os.environ):  # the settings the cells inherit that change speed or numerics
        if name.startswith("LMDISTILL_") or name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES"):
            env[f"${name}"] = os.environ[name]
    return env


def _curves(records: list[CellRecord], output_dir: Path) -> dict[str, dict[int, list[float]]]:
    series: dict[str, dict[int, list[float]]] = {}
    for record in records:
        if record.status != "done":
            continue
        path = cell_dir(output_dir, record.cell.id) / "metrics.jsonl"
        if not path.exists():
            continue
        points = series.setdefault(record.cell.row.label, {})
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("kind") == "eval" and "bits_per_byte" in entry:
                points.setdefault(int(entry["step"]), []).append(float(entry["bits_per_byte"]))
    return series


def _teacher_rows(output_dir: Path, in_domain: str | None) -> list[tuple[str, dict[str, float]]]:
    rows = []
    for path in sorted((output_dir / "teachers").glob("*/reference.json")):
        ref = json.loads(path.read_text(encoding="utf-8"))
        values = {("bits_per_byte" if corpus == in_domain else f"ood/{corpus_name(corpus)}"): s["bits_per_byte"]
                  for corpus, s in ref["scores"].items()}
        values.update({k: ref["task"][k] for k in ("bits_per_byte", "rouge_l", "exact_match") if k in ref.get("task", {})})
        rows.append((f"teacher {ref['teacher']} ({ref['params_m']:.1f}M params)", values))
    return rows


def _row_config(output_dir: Path, row_results_: RowResults) -> tuple[str, str] | None:
    """(cell id, its saved run config) of the row's first finished cell."""
    for cell_id in row_results_.cell_ids[:1]:
        path = cell_dir(output_dir, cell_id) / "config.yaml"
        if path.exists():
            return cell_id, path.read_text(encoding="utf-8")
    return None


def _teacher_lines(plan: Any, output_dir: Path) -> list[str]:
    """One line per teacher: where it is and how it was built (from the run, or the saved references)."""
    lines = []
    for name, teacher in sorted(plan.teachers.items()):
        text = f"{name}: {teacher.path}" + (f" (offline cache {teacher.cache})" if teacher.cache else "")
        for step in ("pretrain", "sft"):
            if teacher.built_from.get(step):
                text += f"; {step} run {teacher.built_from[step]['run_dir']}"
        lines.append(text)
    if not lines:
        for path in sorted((output_dir / "teachers").glob("*/reference.json")):
            ref = json.loads(path.read_text(encoding="utf-8"))
            lines.append(f"{ref['teacher']}: {ref['path']}")
    return lines


def write_report(plan: Any, *, run_seconds: float | None = None) -> Path:
    """Write ``report.md``, ``report.html``, ``results.json`` and the plots into the grid's output directory."""
    from lmdistill.report.html import details, escape, html_page, html_table, image_tag, preformatted
    from lmdistill.report.plots import plot_mean_curves, plot_metric_points

    output_dir: Path = plan.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    records = collect(plan.cells, output_dir)
    rows = row_results(records)
    rows = [r for r in rows if r.cell_ids]  # rows without a finished cell are listed under "Cells not in the table"
    keys = {k for r in rows for k in r.values}
    if len({v for r in rows for v in r.values.get("steps", {}).values()}) <= 1:
        keys.discard("steps")  # equal steps: the column says nothing
    in_domain = plan.evaluation.get("in_domain") if plan.evaluation else (
        (plan.base.get("data") or {}).get("corpus", "kjv") if plan.kind == "run" else None)
    in_domain_name = corpus_name(in_domain) if in_domain else \
        f"task {((plan.base.get('regime') or {}).get('task') or {}).get('name', '')} (responses)"
    specs = metric_specs(keys, in_domain_name)
    teacher_rows = _teacher_rows(output_dir, in_domain)
    tests = baseline_tests(rows, plan.config.baseline, specs)
    counts = {s: sum(r.status == s for r in records) for s in ("done", "failed", "skipped", "not run")}

    header = ["method", "seeds"] + [s.header for s in specs]
    table: list[list[str]] = []
    best: set[tuple[int, int]] = set()
    for i, r in enumerate(rows):
        table.append([r.row.label, str(len(r.cell_ids))] + [_mean_sd(r.summary(s.key), s.fmt) for s in specs])
    for j, spec in enumerate(specs):
        best |= {(i, j + 2) for i in best_rows(rows, spec)}
    reference_rows = [[name, "-"] + [format(values[s.key], s.fmt) if s.key in values else "-" for s in specs]
                      for name, values in teacher_rows]
    quality = [s for s in specs if s.quality]
    diff_header = ["method", "compared with"] + [f"Δ {s.header}" for s in quality]
    diff_table = [[r.row.label, base.label] + [_diff(t.get(s.key), s.fmt) for s in quality]
                  for r in rows if r.row in tests for base, t in [tests[r.row]]]

    curves = _curves(records, output_dir)
    curve_png = plot_mean_curves(curves, output_dir / "curves.png", ylabel="validation bits per byte",
                                 title="validation bits/byte during training (mean ± sd over seeds)") if curves else None
    panels = []
    for spec in quality:
        named = [(r.row.label, s) for r in rows if (s := r.summary(spec.key)) is not None]
        if named:
            panels.append((spec.header + (" (lower is better)" if spec.direction < 0 else " (higher is better)"),
                           [n for n, _ in named], [s.mean for _, s in named], [s.std for _, s in named]))
    methods_png = None
    if panels:
        methods_png = plot_metric_points(panels, output_dir / "per_method.png", title="per method: mean ± sd over seeds")

    problems = [(r.cell.id, r.status, r.error or "") for r in records if r.status in ("failed", "skipped")]
    notes = list(plan.notes)
    budget = plan.config.budget
    if budget.equal == "time":
        seconds = f"{budget.seconds:g} s" if budget.seconds else "the baseline row's time for base.train.steps"
        notes.append(f"equal wall time: each row trained for {seconds} of training at its own measured seconds per step "
                     f"(probe: {budget.probe_warmup} warm-up + {budget.probe_steps} timed steps; calibration.json)")
        for label, rate in sorted(plan.calibration.items()):
            notes.append(f"  {label}: {rate:.3f} s/step")
    else:
        notes.append("equal steps: every cell trained base.train.steps steps")
    notes.append("train s and tokens/s count the training loop only (first-step compilation and periodic evaluation "
                 "included; a resumed cell counts the attempts that finished: a killed attempt's steps and time are "
                 "not recorded); cell wall s the whole cell process (loading, training, final evaluation); peak memory is "
                 "the cell process's maximum resident set size (jobs: 0 runs cells in one process: then it is that "
                 "process's peak so far)")
    notes.append("the tables score every cell on the same validation blocks (evaluation.max_batches); the learning "
                 "curves show the trainer's periodic validation (base eval settings), so their last points may differ")
    unpaired = [r.row.label for r in rows if r.row not in tests and not is_baseline(r.row, plan.config.baseline)]
    if unpaired:
        notes.append("not compared with the baseline (no baseline row shares more of their other axes than another): "
                     + ", ".join(unpaired))
    # the environment the cells ran in (saved by the last run that trained), else this process's
    env_path = output_dir / "environment.json"
    env = json.loads(env_path.read_text(encoding="utf-8")) if env_path.exists() else environment()
    config_yaml = yaml.safe_dump(plan.raw, sort_keys=False)
    cell_wall = sum(r.result["metrics"].get("wall_seconds", 0.0) for r in records if r.result)
    summary_line = (f"{len(rows)} method(s), {len(plan.config.grid.seeds)} seed(s): {counts['done']} cells finished, "
                    f"{counts['failed']} failed, {counts['skipped']} skipped, {counts['not run']} not run; "
                    f"cells' wall time {cell_wall:.0f} s; "
                    + (f"this invocation {run_seconds:.0f} s; " if run_seconds is not None
                       else "report rewritten (--report-only); ")
                    + f"written {time.strftime('%Y-%m-%d %H:%M:%S')}")

    # ------------------------------------------------------------------------------------ markdown
    def md_table(head: list[str], body: list[list[str]], marks: set[tuple[int, int]] = frozenset()) -> str:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for i, row in enumerate(body):
            cells = [v.replace("|", "\\|") for v in row]
            lines.append("| " + " | ".join(f"**{v}**" if (i, j) in marks else v for j, v in enumerate(cells)) + " |")
        return "\n".join(lines)

    md = [f"# Method comparison: {output_dir.name}", "", summary_line, "",
          "## Results (mean ± sd over seeds; best of each column in bold)", "",
          md_table(header, table + [[f"*{c}*" if c != "-" else c for c in row] for row in reference_rows], best), ""]
    if diff_table:
        md += [f"## Differences to the baseline ({', '.join(f'{k}: {v}' for k, v in plan.config.baseline.items())}), "
               "paired over seeds", "",
               "Δ = method − baseline, mean ± sd over matched seeds, with the two-sided p-value of the paired t-test.", "",
               md_table(diff_header, diff_table), ""]
    if curve_png:
        md += ["## Learning curves", "", f"![learning curves]({curve_png.name})", ""]
    if methods_png:
        md += ["## Per method", "", f"![per-method means]({methods_png.name})", ""]
    if problems:
        md += ["## Cells not in the table", ""] + [f"- `{cid}` ({status}): {err.splitlines()[0] if err else ''}"
                                                    for cid, status, err in problems] + [""]
    md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    teacher_lines = _teacher_lines(plan, output_dir)
    if teacher_lines:
        md += ["## Teachers", ""] + [f"- {line}" for line in teacher_lines]
    command = plan.command or f"lmdistill compare {plan.source}"
    md += ["", "## Reproduce", "", f"Command: `{command}` "
           "(finished cells are reused; delete `cells/` to train again).", "",
           "Compare config (after overrides):", "", "```yaml", config_yaml.rstrip(), "```", "",
           "Each cell's complete run config: `cells/<cell>/config.yaml`; rows:", ""]
    md += [f"- {r.row.label}: " + ", ".join(f"`cells/{c}/config.yaml`" for c in r.cell_ids) for r in rows if r.cell_ids]
    md += ["", "Environment:", "", md_table(["package", "version"], [[k, v] for k, v in env.items()]), ""]
    md_path = output_dir / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")

    # ---------------------------------------------------------------------------------------- html
    parts = [f'<p class="note">{escape(summary_line)}</p>',
             "<h2>Results (mean ± sd over seeds; best of each column highlighted)</h2>",
             html_table(header, table + reference_rows, best=best,
                        row_classes=[None] * len(table) + ["reference"] * len(reference_rows))]
    if diff_table:
        parts += [f"<h2>Differences to the baseline ({escape(', '.join(f'{k}: {v}' for k, v in plan.config.baseline.items()))}), "
                  "paired over seeds</h2>",
                  "<p>Δ = method − baseline, mean ± sd over matched seeds, with the two-sided p-value of the paired "
                  "t-test.</p>",
                  html_table(diff_header, diff_table)]
    if curve_png:
        parts += ["<h2>Learning curves</h2>", image_tag(curve_png, "learning curves")]
    if methods_png:
        parts += ["<h2>Per method</h2>", image_tag(methods_png, "per-method means")]
    if problems:
        parts += ["<h2>Cells not in the table</h2>", "<ul>"] + [
            f"<li><code>{escape(cid)}</code> ({escape(status)}): {escape(err.splitlines()[0] if err else '')}</li>"
            for cid, status, err in problems] + ["</ul>"]
    parts += ["<h2>Notes</h2>", "<ul>"] + [f"<li>{escape(n)}</li>" for n in notes] + ["</ul>"]
    if teacher_lines:
        parts += ["<h2>Teachers</h2>", "<ul>"] + [f"<li>{escape(line)}</li>" for line in teacher_lines] + ["</ul>"]
    parts += ["<h2>Reproduce</h2>", f"<p>Command: <code>{escape(command)}</code></p>",
              details("compare config (after overrides)", preformatted(config_yaml))]
    for r in rows:
        found = _row_config(output_dir, r)
        if found:
            parts.append(details(f"run config of {r.row.label} ({found[0]})", preformatted(found[1])))
    parts += ["<h3>Environment</h3>", html_table(["package", "version"], [[k, v] for k, v in env.items()])]
    html_path = output_dir / "report.html"
    html_path.write_text(html_page(f"Method comparison: {output_dir.name}", parts), encoding="utf-8")

    results = {
        "rows": [{"method": r.row.label, "teacher": r.row.teacher, "regime": r.row.regime, "objective": r.row.objective,
                  "cells": r.cell_ids, "values": {k: {str(s): v for s, v in seeds.items()} for k, seeds in r.values.items()}}
                 for r in rows],
        "baseline_tests": [{"method": row.label, "baseline": base.label,
                            "tests": {k: t.__dict__ for k, t in t_.items()}} for row, (base, t_) in tests.items()],
        "cells": [{"id": r.cell.id, "status": r.status, "error": r.error} for r in records],
        "environment": env, "run_seconds": run_seconds,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print(f"report: {md_path} and {html_path}", flush=True)
    return md_path
