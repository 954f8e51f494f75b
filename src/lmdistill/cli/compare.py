"""`lmdistill compare`: a thin wrapper over :mod:`lmdistill.compare`.

A plain function with typer parameter declarations; `lmdistill.cli` registers it as ``lmdistill compare``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer

SetOption = typer.Option(None, "--set", help="override a compare-config key: --set base.train.steps=100 (repeatable)")


def compare(
    config: Path = typer.Argument(..., help="YAML compare config (see configs/compare/objectives.yaml)"),
    set: Optional[list[str]] = SetOption,
    jobs: Optional[int] = typer.Option(
        None, "--jobs", "-j", min=0, help="cells at once, each its own process (default: the config's jobs; 0: in this process)"),
    report_only: bool = typer.Option(False, "--report-only", help="write the report from the finished cells; train nothing"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells (and why any would be skipped); train nothing"),
) -> None:
    """Train every cell of a grid (objectives x regimes x teachers x seeds) through the one trainer, resumably,
    and write report.md / report.html: mean ± sd over seeds, the best marked, paired t-tests against the
    baseline row, learning curves and per-method plots, the configs and versions that produced them. Rerun to continue:
    finished cells are skipped, interrupted ones resume from their checkpoints."""
    from lmdistill.compare import load_compare_config, plan_grid, run_compare

    cfg, raw = load_compare_config(config, list(set or []))
    plan = plan_grid(cfg, raw, str(config))
    plan.command = shlex.join(["lmdistill", "compare", str(config), *(f"--set={o}" for o in set or []),
                               *([f"--jobs={jobs}"] if jobs is not None else [])])
    if dry_run:
        from lmdistill.compare.cell import RESULT_NAME, cell_dir

        # a result from an earlier run: skipped when its settings hash still matches (checked when it runs, after
        # the teachers are prepared)
        has_result = {c.id for c in plan.cells if (cell_dir(plan.output_dir, c.id) / RESULT_NAME).exists()}
        for cell in plan.cells:
            note = f"  SKIPPED: {cell.skip.splitlines()[0]}" if cell.skip else ("  (finished earlier)" if cell.id in has_result else "")
            typer.echo(f"{cell.id}{note}")
        runnable = sum(c.skip is None for c in plan.cells)
        typer.echo(f"{len(plan.cells)} cells, {runnable} not skipped ({len(has_result)} finished earlier) -> "
                   f"{plan.output_dir}")
        return
    run_compare(plan, jobs=jobs, report_only=report_only)
