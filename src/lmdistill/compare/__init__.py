"""``lmdistill compare``: train a grid of distillation methods through the one trainer and report them side by side.

A compare config names a base run config, the teachers, and the grid's axes (objectives with their parameters,
regimes of task runs, teachers, seeds). Every combination is a *cell*, trained in its own process, evaluated on
the same validation blocks in-domain and on every other installed corpus, and summarised over seeds in
``report.md`` / ``report.html`` (tables with mean ± sd, the best of each column marked, paired t-tests against the
baseline row, learning curves, per-method plots, the configs and package versions that produced them).

Parts: :mod:`~lmdistill.compare.config` (the config), :mod:`~lmdistill.compare.grid` (expansion into cells),
:mod:`~lmdistill.compare.teachers` (teachers built once and shared), :mod:`~lmdistill.compare.cell` (one cell's
process), :mod:`~lmdistill.compare.runner` (resume, skip, parallel cells, equal-time budgets),
:mod:`~lmdistill.compare.evaluate` and :mod:`~lmdistill.compare.report`. Ready grids: ``configs/compare/``.
"""

from lmdistill.compare.config import CompareConfig, load_compare_config
from lmdistill.compare.grid import Cell, Row, expand_grid
from lmdistill.compare.runner import Plan, plan_grid, run_compare

__all__ = ["CompareConfig", "load_compare_config", "Cell", "Row", "expand_grid", "Plan", "plan_grid", "run_compare"]
