"""The grids shipped under configs/compare: every cell runs (nothing skipped) and its complete run config validates,
so a typo in a shipped grid fails here, not an hour into someone's run; the regimes grid, whose rows each take
their own path through the trainer, also runs end to end at toy size."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lmdistill.compare import load_compare_config, plan_grid, run_compare
from lmdistill.compare.cell import RESULT_NAME, cell_dir
from lmdistill.compare.runner import _validate
from lmdistill.data.tokenizer import load_tokenizer
from lmdistill.generation.batching import encode_examples
from lmdistill.generation.metrics import evaluate_generation
from lmdistill.generation.sampling import SamplingParams
from lmdistill.generation.tasks import build_task
from lmdistill.models.loading import load_causal_lm
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
    # the teacher's own task scores, taken as the cells' are: response bits per byte on the validation examples the
    # trainer scores (eval.max_batches x eval.batch_size), summed here example by example without padding; ROUGE-L
    # and exact match of its greedy answers to the same test prompts
    reference = json.loads((plan.output_dir / "teachers" / "tiny" / "reference.json").read_text(encoding="utf-8"))
    task_config = _validate(next(iter(plan.specs.values()))["config"], "task", "cell")
    splits = build_task(task_config.regime.task)
    teacher_dir = Path(plan.teachers["tiny"].path)
    model, tokenizer = load_causal_lm(teacher_dir).eval(), load_tokenizer(teacher_dir)
    docs = splits["validation"][: task_config.eval.max_batches * task_config.eval.batch_size]
    nll = 0.0
    with torch.no_grad():
        for example in encode_examples(tokenizer, docs):
            ids = torch.tensor(example.prompt + example.response)
            logp = torch.log_softmax(model(input_ids=ids[None, :-1]).logits[0, :, : len(tokenizer)].double(), dim=-1)
            targets = ids[len(example.prompt):]
            nll -= logp[len(example.prompt) - 1:].gather(-1, targets[:, None]).sum().item()
    n_bytes = sum(len(d.response.encode("utf-8")) for d in docs)
    assert reference["task"]["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    direct = evaluate_generation(model, tokenizer, splits["test"][:8], params=SamplingParams(greedy=True, max_new_tokens=12),
                                 batch_size=8)
    assert (reference["task"]["rouge_l"], reference["task"]["exact_match"]) == pytest.approx((direct.rouge_l,
                                                                                               direct.exact_match))
    teacher_line = next(line for line in report.splitlines() if line.startswith("| *teacher tiny"))
    assert f"*{reference['task']['bits_per_byte']:.4f}*" in teacher_line
