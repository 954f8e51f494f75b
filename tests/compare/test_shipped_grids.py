"""The grids shipped under configs/compare: every cell runs (nothing skipped) and its complete run config validates,
so a typo in a shipped grid fails here, not an hour into someone's run; the regimes grid, whose rows each take
their own path through the trainer, also runs end to end at toy size."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from lmdistill.compare import load_compare_config, plan_grid, run_compare
from lmdistill.compare.cell import RESULT_NAME, cell_dir
from lmdistill.compare.runner import _validate
from tests.compare.conftest import write_config

GRIDS_DIR = Path(__file__).resolve().parents[2] / "configs" / "compare"
GRIDS = sorted(GRIDS_DIR.glob("*.yaml"))


def test_the_three_ready_grids_are_shipped():
    assert {p.stem for p in GRIDS} >= {"objectives", "capacity_gap", "regimes"}


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_every_cell_of_a_shipped_grid_runs_and_validates(path: Path, tmp_path: Path):
    config, raw = load_compare_config(path)
    plan = plan_grid(config, raw, str(path))
    assert plan.cells and all(cell.skip is None for cell in plan.cells), [(c.id, c.skip) for c in plan.cells if c.skip]
    assert len(config.grid.seeds) >= 3
    teacher_dir = tmp_path / "teacher"  # the stand-in for the teacher the grid builds (only its existence is checked)
    teacher_dir.mkdir()
    store = tmp_path / "answers.jsonl"
    store.touch()
    for cell in plan.cells:
        cell_config = copy.deepcopy(cell.config)
        cell_config["output_dir"] = str(tmp_path / "cells" / cell.id)
        if cell.teacher is not None:
            cell_config["teacher"] = {"path": str(teacher_dir)}
        if (cell_config.get("regime") or {}).get("store"):
            cell_config["regime"]["store"] = str(store)
        _validate(cell_config, plan.kind, f"{path.name}: cell {cell.id}")


def test_the_objectives_grid_has_every_method_the_comparison_names():
    path = GRIDS_DIR / "objectives.yaml"
    config, raw = load_compare_config(path)
    objectives = {cell.row.objective.split("(")[0] for cell in plan_grid(config, raw, str(path)).cells}
    expected = {"forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "akl", "taid", "atkd",
                "sinkd + ce", "distillm2", "label-only"}
    assert expected <= objectives, expected - objectives


def test_the_shipped_regimes_grid_runs_every_row_at_toy_size(tmp_path: Path, compare_raw: dict):
    """The shipped rows and their settings, on the tiny teacher and student: 2 steps, a few prompts, one seed."""
    raw = yaml.safe_load((GRIDS_DIR / "regimes.yaml").read_text(encoding="utf-8"))
    base = raw["base"]
    base["student"] = compare_raw["base"]["student"]
    base["cache_dir"] = compare_raw["base"]["data"]["cache_dir"]
    base["regime"]["task"]["max_examples"] = {"train": 16, "validation": 8, "test": 8}
    base.update(train={"steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1},
                eval={"every": 100, "max_batches": 1, "batch_size": 8}, checkpoint={"every": 100})
    base["generation"].update(max_examples=8, batch_size=8)
    raw.update(output_dir=str(tmp_path / "grid"), teachers=compare_raw["teachers"], evaluation=compare_raw["evaluation"],
               jobs=0)
    raw["grid"]["seeds"] = [0]
    config, loaded = load_compare_config(write_config(tmp_path, raw))
    plan = plan_grid(config, loaded, "regimes (toy size)")
    run_compare(plan)
    rows = {cell.row.label for cell in plan.cells}
    assert len(rows) == len(raw["grid"]["regimes"]) == len(plan.cells)
    for cell in plan.cells:
        result = json.loads((cell_dir(plan.output_dir, cell.id) / RESULT_NAME).read_text(encoding="utf-8"))
        metrics = result["metrics"]
        assert 0.0 <= metrics["rouge_l"] <= 1.0 and 0.0 <= metrics["exact_match"] <= 1.0, cell.id
        assert metrics["bits_per_byte"] > 0, cell.id
    report = (plan.output_dir / "report.md").read_text(encoding="utf-8")
    assert all(label in report for label in ("MiniLLM", "SCRG", "KID", "sequence-level", "on-policy"))
