"""Running grids end to end on small real data: cells in their own processes with a failing one isolated,
finished cells skipped, an interrupted cell resumed to the same result as an uninterrupted one, equal-wall-time
budgets, task grids with the teacher's answers, teachers built once."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmdistill.compare import load_compare_config, plan_grid, run_compare
from lmdistill.compare.cell import seconds_per_step
from lmdistill.compare.runner import cell_action, prepare, steps_for
from tests.compare.conftest import write_config


def _plan(tmp_path: Path, raw: dict, name: str = "compare.yaml"):
    path = write_config(tmp_path, raw, name)
    cfg, loaded = load_compare_config(path)
    return plan_grid(cfg, loaded, str(path))


def _result(plan, cell_id: str) -> dict:
    return json.loads((plan.output_dir / "cells" / cell_id / "result.json").read_text())


def test_cells_in_processes_failure_isolated_metrics_real(tmp_path, compare_raw, fortunes_small):
    raw = copy.deepcopy(compare_raw)
    raw["grid"] = {"objectives": ["forward_kl", "not_installed",
                                  # fails in its process when the models are built: the widths do not allow it
                                  {"name": "forward_kl", "label": "broken", "set": ["student.init=teacher_layers"]}],
                   "seeds": [0]}
    raw["jobs"] = 2
    plan = _plan(tmp_path, raw)
    report = run_compare(plan)

    result = _result(plan, "tiny--forward_kl--seed0")
    metrics = result["metrics"]
    for key in ("bits_per_byte", "ood/fortunes_small", "top1_agreement", "kl_to_teacher", "tokens_per_second",
                "train_seconds", "wall_seconds", "peak_rss_mb"):
        assert metrics[key] > 0, key
    assert metrics["steps"] == 4 and result["attempts"][0]["start_step"] == 0
    # the numbers are those of the final model on the grid's streams, evaluated here independently
    from lmdistill.data.blocks import BlockDataset, TokenStream
    from lmdistill.eval.lm import evaluate_lm
    from lmdistill.models.loading import load_causal_lm

    spec = json.loads((plan.output_dir / "cells" / "tiny--forward_kl--seed0" / "spec.json").read_text())
    stream = TokenStream.load(Path(spec["evaluation"]["streams"][str(fortunes_small)]))
    model = load_causal_lm(plan.output_dir / "cells" / "tiny--forward_kl--seed0" / "final")
    again = evaluate_lm(model, BlockDataset(stream, 32), bytes_per_token=stream.bytes_per_target, batch_size=8, max_batches=2)
    assert metrics["ood/fortunes_small"] == pytest.approx(again["bits_per_byte"], rel=1e-6)

    failure = json.loads((plan.output_dir / "cells" / "tiny--broken--seed0" / "failure.json").read_text())
    assert "student.init=teacher_layers" in failure["error"] and failure["returncode"] == 2
    text = report.read_text()
    assert "`tiny--broken--seed0` (failed): student.init=teacher_layers" in text
    assert "`tiny--not_installed--seed0` (skipped)" in text and "| tiny / forward_kl | 1 |" in text


def test_finished_cells_skipped_interrupted_cell_resumes(tmp_path, compare_raw, capsys):
    from lmdistill.config import validate_config
    from lmdistill.train.run import run_training

    raw = copy.deepcopy(compare_raw)
    raw["grid"] = {"objectives": ["forward_kl"], "seeds": [0, 1]}
    plan = _plan(tmp_path, raw)
    prepare(plan)
    # seed 1 was interrupted after its checkpoint at step 2 (of 4): a run stopped there, no final model
    interrupted = copy.deepcopy(plan.specs["tiny--forward_kl--seed1"]["config"])
    interrupted["train"]["steps"] = 2
    run_training(validate_config(interrupted, "test"), show_progress=False)
    cell_dir = plan.output_dir / "cells" / "tiny--forward_kl--seed1"
    import shutil

    shutil.rmtree(cell_dir / "final")

    plan = _plan(tmp_path, raw)
    run_compare(plan)
    assert "2 cells: 0 finished, 2 to run (1 resuming)" in capsys.readouterr().out
    resumed = _result(plan, "tiny--forward_kl--seed1")
    assert [(a["start_step"], a["end_step"]) for a in resumed["attempts"]] == [(2, 4)]

    # the same cell never interrupted, in another grid: the trainer resumes exactly, so the results agree
    straight_raw = copy.deepcopy(raw)
    straight_raw["output_dir"] = str(tmp_path / "straight")
    straight_raw["grid"]["seeds"] = [1]
    straight = _plan(tmp_path, straight_raw, "straight.yaml")
    run_compare(straight)
    expected = _result(straight, "tiny--forward_kl--seed1")["metrics"]
    for key in ("bits_per_byte", "kl_to_teacher", "top1_agreement", "ood/fortunes_small"):
        assert resumed["metrics"][key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key

    # a rerun trains nothing: both cells are finished with these settings
    done = plan.output_dir / "cells" / "tiny--forward_kl--seed0" / "result.json"
    before = done.stat().st_mtime_ns
    capsys.readouterr()
    run_compare(_plan(tmp_path, raw))
    assert "2 cells: 2 finished, 0 to run" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == before

    # --report-only writes the report again from the finished cells, training nothing
    (plan.output_dir / "report.md").unlink()
    run_compare(_plan(tmp_path, raw), report_only=True)
    assert "| tiny / forward_kl | 2 |" in (plan.output_dir / "report.md").read_text()
    assert done.stat().st_mtime_ns == before

    # other evaluation settings: the finished cells no longer count and are trained again
    changed = copy.deepcopy(raw)
    changed["evaluation"]["max_batches"] = 1
    plan = _plan(tmp_path, changed)
    prepare(plan)
    from lmdistill.compare.grid import config_hash

    for spec in plan.specs.values():
        spec["config_hash"] = config_hash({"config": spec["config"], "evaluation": spec["evaluation"]})
        assert cell_action(spec) == "restart"


def test_offline_cache_teacher_and_an_unusable_teacher(tmp_path, compare_raw, tiny_teacher, kjv_small_txt):
    raw = copy.deepcopy(compare_raw)
    small = tmp_path / "kjv_60_chapters.txt"  # the cache covers the whole training split: keep it small
    small.write_text("\n\n".join(kjv_small_txt.read_text().split("\n\n")[:60]) + "\n")
    raw["base"]["data"]["corpus"] = str(small)
    raw["teachers"] = {"cached": {"path": str(tiny_teacher), "cache": {"mode": "lowrank", "k": 16, "batch_size": 8}},
                       "missing": {"path": str(tmp_path / "no-such-teacher")}}
    raw["grid"] = {"objectives": ["forward_kl"], "seeds": [0]}
    plan = _plan(tmp_path, raw)
    report = run_compare(plan).read_text()
    spec = json.loads((plan.output_dir / "cells" / "cached--forward_kl--seed0" / "spec.json").read_text())
    assert spec["config"]["teacher"] == {"cache": str(plan.output_dir / "teachers" / "cached" / "cache")}
    assert (plan.output_dir / "teachers" / "cached" / "cache" / "manifest.json").is_file()
    metrics = _result(plan, "cached--forward_kl--seed0")["metrics"]
    assert metrics["kl_to_teacher"] > 0 and 0 < metrics["top1_agreement"] <= 1  # scored with the live teacher
    assert "`missing--forward_kl--seed0` (skipped): teacher missing: teachers.missing.path" in report


def test_base_teacher_section_without_teacher_choices(tmp_path, compare_raw, tiny_teacher):
    raw = copy.deepcopy(compare_raw)
    del raw["teachers"]
    raw["base"]["teacher"] = {"path": str(tiny_teacher)}
    raw["grid"] = {"objectives": ["reverse_kl"], "seeds": [0]}
    plan = _plan(tmp_path, raw)
    report = run_compare(plan).read_text()
    metrics = _result(plan, "reverse_kl--seed0")["metrics"]
    assert metrics["top1_agreement"] > 0 and metrics["kl_to_teacher"] > 0
    assert "| *teacher teacher (" in report  # the base teacher's reference row
    # a reference cut short (a kill in an older version, a full disk) is computed again, not a crash
    reference = plan.output_dir / "teachers" / "teacher" / "reference.json"
    saved = json.loads(reference.read_text())
    reference.write_text(reference.read_text()[:40])
    prepare(_plan(tmp_path, raw))
    assert json.loads(reference.read_text())["scores"] == saved["scores"]


def test_seconds_per_step_by_hand():
    # 100 tokens a step; the loop's elapsed seconds after steps 1..4 were 5, 6, 7.5, 9 (step 1 paid a compile)
    elapsed = ((1, 5.0), (2, 6.0), (3, 7.5), (4, 9.0))
    records = [{"kind": "train", "step": s, "tokens_per_second": s * 100 / t} for s, t in elapsed]
    assert seconds_per_step(records, 100, warmup=1) == pytest.approx((9.0 - 5.0) / 3)
    assert seconds_per_step(records, 100, warmup=0) == pytest.approx(9.0 / 4)
    assert steps_for(10.0, 10.0 / 7) == 7 and steps_for(0.1, 5.0) == 1


def test_equal_wall_time_budget(tmp_path, compare_raw):
    raw = copy.deepcopy(compare_raw)
    raw["grid"] = {"objectives": ["forward_kl", "reverse_kl"], "seeds": [0]}
    raw["budget"] = {"equal": "time", "probe_steps": 2, "probe_warmup": 1}
    plan = _plan(tmp_path, raw)
    run_compare(plan)
    rates = {k: v["seconds_per_step"] for k, v in json.loads((plan.output_dir / "calibration.json").read_text()).items()}
    assert set(rates) == {"tiny / forward_kl", "tiny / reverse_kl"} and all(r > 0 for r in rates.values())
    # budget.seconds unset: every row gets the baseline's time for base.train.steps (4 steps of forward KL)
    seconds = 4 * rates["tiny / forward_kl"]
    assert _result(plan, "tiny--forward_kl--seed0")["metrics"]["steps"] == 4
    assert _result(plan, "tiny--reverse_kl--seed0")["metrics"]["steps"] == steps_for(seconds, rates["tiny / reverse_kl"])
    assert "equal wall time" in (plan.output_dir / "report.md").read_text()


def test_task_grid_with_teacher_answers(tmp_path, compare_raw, tiny_teacher):
    raw = copy.deepcopy(compare_raw)
    task = {"name": "kjv_continue", "prompt_words": 4, "response_words": 4,
            "max_examples": {"train": 24, "validation": 8, "test": 8}}
    raw["base"] = {"student": copy.deepcopy(raw["base"]["student"]), "objective": "forward_kl",
                   "regime": {"kind": "fixed", "max_length": 32, "task": task},
                   "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1},
                   "eval": {"every": 100, "max_batches": 1, "batch_size": 8}, "checkpoint": {"every": 100},
                   "generation": {"split": "test", "max_examples": 8, "batch_size": 8,
                                  "sampling": {"greedy": True, "max_new_tokens": 6}},
                   "cache_dir": raw["base"]["data"]["cache_dir"]}
    raw["grid"] = {"regimes": [{"kind": "fixed", "label": "off-policy"},
                               {"kind": "sequence_kd", "store": "teacher_answers", "label": "sequence-level"}], "seeds": [0]}
    raw["baseline"] = {"regime": "off-policy"}
    plan = _plan(tmp_path, raw)
    run_compare(plan)
    answers = list((plan.output_dir / "teachers" / "tiny").glob("answers-*.jsonl"))
    assert len(answers) == 1 and len(answers[0].read_text().splitlines()) == 24  # one answer per training prompt
    for cell in ("tiny--off-policy--forward_kl--seed0", "tiny--sequence-level--forward_kl--seed0"):
        metrics = _result(plan, cell)["metrics"]
        assert 0.0 <= metrics["rouge_l"] <= 1.0 and 0.0 <= metrics["exact_match"] <= 1.0
        assert metrics["bits_per_byte"] > 0 and metrics["ood/fortunes_small"] > 0
    spec = json.loads((plan.output_dir / "cells" / "tiny--sequence-level--forward_kl--seed0" / "spec.json").read_text())
    assert spec["config"]["regime"]["store"] == str(answers[0])
    assert "ROUGE-L" in (plan.output_dir / "report.md").read_text()


def test_pretrained_teacher_is_built_once(tmp_path, compare_raw, kjv_small_txt, cache_dir, tiny_student, capsys):
    from lmdistill.compare.config import TeacherChoice
    from lmdistill.compare.teachers import built_teacher_dir, prepare_teacher

    pretrain = tmp_path / "teacher_pretrain.yaml"
    write_config(tmp_path, {"data": {"corpus": str(kjv_small_txt), "block_size": 32, "cache_dir": str(cache_dir)},
                            "student": {"path": str(tiny_student)}, "objective": "cross_entropy",
                            "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
                            "eval": {"every": 100, "max_batches": 1}, "checkpoint": {"every": 100}}, pretrain.name)
    choice = TeacherChoice(pretrain={"config": str(pretrain), "set": ["train.lr=0.005"]})
    plan = _plan(tmp_path, compare_raw)
    first = prepare_teacher("built", choice, plan.config, plan.base, cache_root=tmp_path / "cache_root")
    run_dir, _, _ = built_teacher_dir(choice, tmp_path / "cache_root")
    assert first.path == run_dir / "final" and (first.path / "model.safetensors").is_file()
    assert run_dir.parent.name == "teachers" and run_dir.name.startswith("teacher_pretrain-")
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = prepare_teacher("built", choice, plan.config, plan.base, cache_root=tmp_path / "cache_root")
    assert again.path == first.path and (again.path / "model.safetensors").stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().out
    other = TeacherChoice(pretrain={"config": str(pretrain), "set": ["train.lr=0.002"]})
    assert built_teacher_dir(other, tmp_path / "cache_root")[0] != run_dir  # other settings, another teacher


def test_teacher_pretrained_then_fine_tuned_on_the_task(tmp_path, compare_raw, kjv_small_txt, cache_dir, tiny_student):
    from lmdistill.compare.config import TeacherChoice
    from lmdistill.compare.teachers import built_teacher_dir, prepare_teacher

    write_config(tmp_path, {"data": {"corpus": str(kjv_small_txt), "block_size": 32, "cache_dir": str(cache_dir)},
                            "student": {"path": str(tiny_student)}, "objective": "cross_entropy",
                            "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
                            "eval": {"every": 100, "max_batches": 1}, "checkpoint": {"every": 100}}, "pre.yaml")
    write_config(tmp_path, {"student": {"path": "replaced/by/the/pretrained/teacher"}, "objective": "cross_entropy",
                            "regime": {"kind": "fixed", "max_length": 32, "task": {
                                "name": "kjv_continue", "prompt_words": 4, "response_words": 4,
                                "max_examples": {"train": 16, "validation": 4, "test": 4}}},
                            "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
                            "eval": {"every": 100, "max_batches": 1}, "checkpoint": {"every": 100},
                            "generation": {"max_examples": 4, "sampling": {"greedy": True, "max_new_tokens": 4}},
                            "cache_dir": str(cache_dir)}, "sft.yaml")
    choice = TeacherChoice(pretrain={"config": str(tmp_path / "pre.yaml")}, sft={"config": str(tmp_path / "sft.yaml")})
    plan = _plan(tmp_path, compare_raw)
    teacher = prepare_teacher("sft", choice, plan.config, plan.base, cache_root=tmp_path / "root")
    sft_dir, _, sft_raw = built_teacher_dir(choice, tmp_path / "root")
    assert teacher.path == sft_dir / "final" and sft_dir.name.startswith("sft-")
    pretrained = Path(sft_raw["student"]["path"])
    assert (pretrained / "model.safetensors").is_file() and pretrained.parent.name.startswith("pre-")
    assert json.loads((sft_dir / "generation_metrics.json").read_text())["regime"] == "fixed"  # a real task run


def test_command_line(tmp_path, compare_raw):
    path = write_config(tmp_path, compare_raw)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    done = Path(compare_raw["output_dir"]) / "cells" / "tiny--forward_kl--seed1"
    done.mkdir(parents=True)
    (done / "result.json").write_text("{}", encoding="utf-8")  # a cell an earlier run finished
    listed = subprocess.run([sys.executable, "-m", "lmdistill.cli", "compare", str(path), "--dry-run",
                             "--set", "grid.objectives=[forward_kl,not_installed]"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "tiny--forward_kl--seed1  (finished earlier)" in listed.stdout
    assert "tiny--forward_kl--seed0\n" in listed.stdout and "(1 finished earlier)" in listed.stdout
    assert "tiny--not_installed--seed0  SKIPPED: objective: unknown objective" in listed.stdout
    bad = subprocess.run([sys.executable, "-m", "lmdistill.cli", "compare", str(path), "--set", "grid.sedes=[1]"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "grid.sedes: unknown key; did you mean 'seeds'?" in bad.stderr


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_cell_process_reports_its_own_peak_memory_not_its_parents():
    """A cell is a child process of the compare process, which may have pretrained a teacher: with 1 GiB touched
    here, a child that only imports the cell module must report its own peak (Linux carries ru_maxrss across
    exec, which made every cell of a grid report the compare process's peak)."""
    import subprocess
    import sys

    from lmdistill.compare.cell import peak_rss_mb

    ballast = bytearray(1024 * 2**20)
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # touch every page: resident
    assert peak_rss_mb() > 1024
    child = subprocess.run([sys.executable, "-c", "from lmdistill.compare.cell import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    del ballast
    assert 0 < float(child.stdout) < 512
