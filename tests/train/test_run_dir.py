"""The output directory: an earlier run is never silently mixed with a new one (refused without
--resume/--overwrite, settings checked on --resume), one run at a time (lock), a read-only location
refused before any model loads, and redone steps logged once."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmdistill.config import validate_config
from lmdistill.errors import ConfigError
from lmdistill.train import run as train_run
from lmdistill.train.checkpoint import CheckpointManager
from lmdistill.train.run import build_trainer, run_training
from lmdistill.train.rundir import OutputDirError, RunDirectory, check_resume_settings
from tests.conftest import save_tiny_model
from tests.train.helpers import run_config

SRC = Path(__file__).parents[2] / "src"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "LMDISTILL_COMPILE": "0"}
    return subprocess.run([sys.executable, "-m", "lmdistill.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def _error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-2000:]
    return errors[0]


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and "tensorboard" not in p.parts and p.name != ".lock"}


def _steps(run: Path, kind: str = "train") -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == kind]


@pytest.fixture()
def student_dir(tmp_path, small_tokenizer):
    return save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=2)


@pytest.fixture()
def finished(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher):
    """A finished 6-step distillation run and its YAML config."""
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher)
    run_training(cfg, show_progress=False)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, path


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(finished):
    cfg, path = finished
    run = Path(cfg.output_dir)
    assert [c.step for c in CheckpointManager(run).complete()] == [4, 6]  # keep=2 after the final evaluation
    before = _snapshot(run)
    error = _error_line(_cli("distill", str(path)))
    assert str(run) in error and "already holds a run" in error and "--resume" in error and "--overwrite" in error
    assert _snapshot(run) == before


def test_resume_refuses_changed_settings_and_allows_more_steps(finished):
    cfg, path = finished
    run = Path(cfg.output_dir)
    before = _snapshot(run)
    error = _error_line(_cli("distill", str(path), "--resume", "--set", "objective=reverse_kl", "--set", "train.seed=1"))
    assert "objective: 'forward_kl' -> 'reverse_kl'" in error and "train.seed: 0 -> 1" in error and "--overwrite" in error
    assert _snapshot(run) == before
    longer = _cli("distill", str(path), "--resume", "--set", "train.steps=8")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "train.steps: 6 -> 8" in longer.stdout
    assert _steps(run) == list(range(1, 9))  # each step logged once
    assert [c.step for c in CheckpointManager(run).complete()] == [6, 8]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 8  # what the next resume compares


def test_resume_on_an_empty_directory_says_no_checkpoint(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher):
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    error = _error_line(_cli("distill", str(path), "--resume"))
    assert "no checkpoint found" in error and str(Path(cfg.output_dir) / "checkpoints") in error


def test_overwrite_replaces_only_the_runs_files(finished):
    cfg, path = finished
    run = Path(cfg.output_dir)
    (run / "notes.txt").write_text("mine")
    stale = run / "checkpoints" / "step-0000006"
    (stale / "marker").write_text("from the old run")
    out = _cli("distill", str(path), "--overwrite", "--set", "checkpoint.every=3")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run / "notes.txt").read_text() == "mine"
    assert [c.step for c in CheckpointManager(run).complete()] == [3, 6] and not (stale / "marker").exists()
    assert _steps(run) == list(range(1, 7))


def test_redone_steps_are_logged_once_after_a_resume(tmp_path, kjv_small_txt, cache_dir, student_dir):
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir, eval={"every": 1})
    trainer, _ = build_trainer(cfg, show_progress=False)
    original = trainer.train_step

    def dies_in_step_6(step):
        if step == 5:  # steps 1-5 logged, the checkpoint is at 4
            raise KeyboardInterrupt
        return original(step)

    trainer.train_step = dies_in_step_6
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert _steps(Path(cfg.output_dir)) == [1, 2, 3, 4, 5]
    (Path(cfg.output_dir) / "metrics.jsonl").open("a").write('{"kind": "train", "st')  # a line cut by the kill
    resumed, _ = build_trainer(cfg, show_progress=False, resume=True)
    resumed.train(resume=True)
    run = Path(cfg.output_dir)
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert _steps(run, "eval") == [1, 2, 3, 4, 5, 6]


def test_a_second_run_on_a_locked_directory_stops_at_once(tmp_path, kjv_small_txt, cache_dir, student_dir):
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir)
    first, _ = build_trainer(cfg, show_progress=False)
    with pytest.raises(OutputDirError, match=f"in use by another run \\(pid {os.getpid()} "):
        build_trainer(cfg, show_progress=False)
    first.train()
    first.save_final()  # the run is over: the directory is free again (for --resume/--overwrite)
    build_trainer(cfg, show_progress=False, resume=True)[0].close()


def test_the_lock_holds_across_processes_and_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lmdistill.train.rundir import RunDirectory; "
         f"held = RunDirectory({str(run)!r}); held.acquire(); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match=f"pid {holder.pid} "):
            RunDirectory(run).acquire()
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the lock
        holder.wait()
    mine = RunDirectory(run)
    mine.acquire()
    assert mine.locked
    mine.release()


@pytest.fixture()
def read_only_dir(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
        return
    if os.system(f"mount -t tmpfs -o ro,size=64k tmpfs {target} 2>/dev/null") != 0:
        pytest.skip("root cannot be denied by permissions, and no read-only tmpfs can be mounted here")
    yield target
    os.system(f"umount {target}")


def test_a_read_only_output_directory_is_refused_before_models_load(read_only_dir, kjv_small_txt, cache_dir, student_dir, monkeypatch):
    cfg = run_config(read_only_dir, kjv_small_txt, cache_dir, student_dir)

    def must_not_load(*args, **kwargs):
        raise AssertionError("data and models must not load for an unwritable output directory")

    monkeypatch.setattr(train_run, "prepare_data", must_not_load)
    monkeypatch.setattr(train_run, "build_models", must_not_load)
    with pytest.raises(OutputDirError, match=f"output_dir {read_only_dir / 'run'} is not writable \\((Read-only file system|Permission denied)\\)"):
        run_training(cfg, show_progress=False)


def test_resume_settings_rules():
    saved = validate_config({"objective": "forward_kl", "teacher": None}).model_dump(mode="json")

    def changes(**sections):
        raw = {"objective": "forward_kl"}
        raw.update(sections)
        return check_resume_settings(saved, validate_config(raw), checkpoint_step=100)

    assert changes() == []
    allowed = changes(train={"steps": 900, "lr": 1e-4, "log_every": 5}, eval={"every": 7}, checkpoint={"keep": 4})
    assert "train.steps: 500 -> 900" in allowed and "train.lr: 0.003 -> 0.0001" in allowed and len(allowed) == 5
    for unsafe, key in [({"objective": "reverse_kl"}, "objective"), ({"train": {"batch_size": 8}}, "train.batch_size"),
                        ({"train": {"seed": 3}}, "train.seed"), ({"data": {"corpus": "gcide"}}, "data.corpus"),
                        ({"data": {"block_size": 64}}, "data.block_size"), ({"student": {"preset": "gpt2-teacher-7m"}}, "student.preset"),
                        ({"train": {"steps": 50}}, "train.steps")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            changes(**unsafe)


def test_constructing_a_trainer_writes_nothing_into_the_directory(tmp_path, kjv_small_txt, cache_dir, student_dir):
    """Refusing an earlier run must not leave a new tensorboard file or metrics beside it."""
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir)
    trainer, _ = build_trainer(cfg, show_progress=False)
    assert sorted(p.name for p in Path(cfg.output_dir).iterdir()) == [".lock"]
    trainer.close()
    time.sleep(0)  # nothing asynchronous was started either
    assert sorted(p.name for p in Path(cfg.output_dir).iterdir()) == [".lock"]


def test_sft_refuses_a_finished_run_and_overwrite_replaces_it(tmp_path, student_dir):
    """Task runs (sft, distill with a regime) go through the same directory rules; --overwrite reaches them."""
    from lmdistill.config import load_config
    from lmdistill.generation.run import run_task
    from lmdistill.generation.run_config import TaskRunConfig

    raw = {
        "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "student": {"path": str(student_dir)},
        "objective": "cross_entropy",
        "regime": {"kind": "fixed", "max_length": 48,
                   "task": {"name": "kjv_continue", "prompt_words": 4, "response_words": 6,
                            "max_examples": {"train": 200, "validation": 20, "test": 20}}},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "log_every": 1},
        "eval": {"every": 1000, "max_batches": 1, "batch_size": 4}, "checkpoint": {"every": 1, "keep": 4},
        "generation": {"max_examples": 4, "batch_size": 4, "sampling": {"greedy": True, "max_new_tokens": 4}},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_task(load_config(path, model=TaskRunConfig), show_progress=False)
    run = tmp_path / "run"
    assert [c.step for c in CheckpointManager(run).complete()] == [1, 2, 3, 4]
    before = _snapshot(run)
    error = _error_line(_cli("sft", str(path)))
    assert "already holds a run" in error and "--overwrite" in error
    assert _snapshot(run) == before
    out = _cli("sft", str(path), "--overwrite", "--set", "checkpoint.every=2", "--set", "checkpoint.keep=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [c.step for c in CheckpointManager(run).complete()] == [2, 4]
    assert _steps(run) == [1, 2, 3, 4]
