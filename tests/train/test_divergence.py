"""The divergence guard: a huge learning rate, poisoned gradients or weights stop the run with
TrainingDiverged on every loss path, nothing non-finite is ever written, and the kept checkpoint
evaluates and resumes (with a lower lr) to finite numbers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmdistill.losses import fused
from lmdistill.train.checkpoint import CheckpointManager
from lmdistill.train.run import build_trainer, run_training
from lmdistill.train.trainer import TrainingDiverged
from tests.conftest import save_tiny_model
from tests.train.helpers import run_config

SRC = Path(__file__).parents[2] / "src"


@pytest.fixture()
def student_dir(tmp_path, small_tokenizer):
    return save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=2)


def nonfinite_tensors(root: Path) -> list[str]:
    """Every tensor under ``root`` (safetensors files and optimizer states) that holds a NaN or infinity."""
    bad = []

    def walk(name: str, value) -> None:
        if torch.is_tensor(value):
            if value.is_floating_point() and not torch.isfinite(value).all():
                bad.append(name)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{name}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{name}/{i}", v)

    for path in root.rglob("*.safetensors"):
        walk(str(path), load_file(str(path)))
    for path in root.rglob("optimizer.pt"):
        walk(str(path), torch.load(path, weights_only=True))
    return bad


def _huge_lr_config(tmp_path, corpus, cache_dir, student, teacher, chunked: bool, steps: int = 8):
    return run_config(tmp_path, corpus, cache_dir, student, teacher,
                      train={"steps": steps, "lr": 1e3, "warmup_steps": 0, "chunked_loss": chunked},
                      checkpoint={"every": 2, "keep": 2})


def _assert_stopped_cleanly_and_recoverable(tmp_path, cfg, corpus, cache_dir, student, teacher, chunked: bool):
    out = Path(cfg.output_dir)
    assert not (out / "final").exists()
    assert nonfinite_tensors(out) == []
    kept = CheckpointManager(out).latest()
    assert kept is not None
    # the kept checkpoint evaluates to finite numbers, and resuming it with a lower lr trains to the end
    calmer = run_config(tmp_path, corpus, cache_dir, student, teacher,
                        train={"steps": 8, "lr": 1e-3, "warmup_steps": 0, "chunked_loss": chunked},
                        checkpoint={"every": 2, "keep": 2})
    trainer, _ = build_trainer(calmer, show_progress=False, resume=True)
    assert trainer.resume()
    assert trainer.step == kept.step
    # the new peak lr is the one in use, at the schedule's position of the checkpoint
    schedule = trainer.scheduler.lr_lambdas[0](trainer.scheduler.last_epoch)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * schedule) and schedule > 0.5
    evaluated = trainer.evaluate()
    assert all(math.isfinite(v) for v in evaluated.values())
    result = trainer.train(resume=True)
    trainer.save_final()
    assert all(math.isfinite(v) for k, v in result.final_metrics.items() if isinstance(v, float))
    assert (out / "final" / "model.safetensors").exists()
    assert nonfinite_tensors(out) == []


@pytest.mark.parametrize("chunked", [False, True], ids=["plain", "chunked-eager"])
def test_huge_lr_stops_and_the_kept_checkpoint_is_finite(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher,
                                                         chunked, monkeypatch):
    monkeypatch.setenv(fused.ENV_VAR, "0")
    cfg = _huge_lr_config(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher, chunked)
    with pytest.raises(TrainingDiverged, match=r"at step \d+; stopped.*the last good checkpoint is .*step-000000"):
        run_training(cfg, show_progress=False)
    _assert_stopped_cleanly_and_recoverable(tmp_path, cfg, kjv_small_txt, cache_dir, student_dir, tiny_teacher, chunked)


def test_huge_lr_stops_on_the_compiled_kernels(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher, monkeypatch):
    monkeypatch.setenv(fused.ENV_VAR, "1")
    monkeypatch.setattr(fused, "_failed", set())
    cfg = _huge_lr_config(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher, chunked=True, steps=6)
    with pytest.raises(TrainingDiverged, match=r"at step \d+; stopped"):
        run_training(cfg, show_progress=False)
    assert "forward_kl_grad" in fused._compiled and not fused._failed  # the compiled kernels computed it
    out = Path(cfg.output_dir)
    assert not (out / "final").exists()
    assert nonfinite_tensors(out) == []
    assert CheckpointManager(out).latest() is not None


def test_nonfinite_gradients_with_a_finite_loss_stop_before_the_update(tmp_path, kjv_small_txt, cache_dir, student_dir):
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir, train={"grad_clip": None})
    trainer, _ = build_trainer(cfg, show_progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    weight = model.transformer.h[0].mlp.c_fc.weight
    calls = {"n": 0}

    def poison_third_step(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 3 else grad

    weight.register_hook(poison_third_step)
    before = {}
    original_step = trainer.train_step

    def remember(step):
        before.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original_step(step)

    trainer.train_step = remember
    with pytest.raises(TrainingDiverged, match="gradients became non-finite .* at step 3; stopped; its checkpoint of step 2 was removed"):
        trainer.train()
    after = model.state_dict()
    for key, value in before.items():  # the optimizer never applied the poisoned gradients
        assert torch.equal(after[key], value), key
    assert CheckpointManager(cfg.output_dir).latest() is None
    assert nonfinite_tensors(Path(cfg.output_dir)) == []


def test_nonfinite_weights_are_never_written(tmp_path, kjv_small_txt, cache_dir, student_dir):
    """An update can overflow from finite gradients; the checkpoint of those weights is refused."""
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir)
    trainer, _ = build_trainer(cfg, show_progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    optimizer_step = trainer.optimizer.step
    calls = {"n": 0}

    def overflowing_step(*args, **kwargs):
        out = optimizer_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                model.transformer.wte.weight[0, 0] = float("inf")
        return out

    trainer.optimizer.step = overflowing_step
    with pytest.raises(TrainingDiverged, match=r"non-finite values after step 4 \(transformer.wte.weight\); checkpoint step 4 was not written.*step-0000002"):
        trainer.train()
    assert [c.step for c in trainer.checkpoints.complete()] == [2]
    assert nonfinite_tensors(Path(cfg.output_dir)) == []


def test_nonfinite_final_evaluation_writes_no_final_model(tmp_path, kjv_small_txt, cache_dir, student_dir):
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir)
    trainer, _ = build_trainer(cfg, show_progress=False)
    evaluate = trainer.evaluate

    def nan_at_the_end():
        metrics = evaluate()
        return {**metrics, "loss": float("nan")} if trainer.step == cfg.train.steps else metrics

    trainer.evaluate = nan_at_the_end
    with pytest.raises(TrainingDiverged, match="validation loss became non-finite after step 6.*step-0000004"):
        run_training_with(trainer)
    out = Path(cfg.output_dir)
    assert not (out / "final").exists()
    assert [c.step for c in CheckpointManager(out).complete()] == [2, 4]  # 6 went; keep=2 good ones stay


def run_training_with(trainer):
    trainer.train()
    trainer.save_final()


def test_cli_huge_lr_is_one_line_and_resume_with_lower_lr_finishes(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher):
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": str(kjv_small_txt), "block_size": 32, "cache_dir": str(cache_dir)},
        "student": {"path": str(student_dir)}, "teacher": {"path": str(tiny_teacher)},
        "train": {"steps": 8, "batch_size": 4, "lr": 1e3, "warmup_steps": 0, "log_every": 1},
        "eval": {"every": 1000, "max_batches": 2, "batch_size": 8},
        "checkpoint": {"every": 2, "keep": 2},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(SRC), fused.ENV_VAR: "0"}
    out = subprocess.run([sys.executable, "-m", "lmdistill.cli", "distill", str(path)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "stopped" in error[0] and "--resume" in error[0]
    assert not (tmp_path / "run" / "final").exists()
    again = subprocess.run([sys.executable, "-m", "lmdistill.cli", "distill", str(path), "--resume", "--set", "train.lr=1e-3"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "train.lr: 1000.0 -> 0.001" in again.stdout
    assert nonfinite_tensors(tmp_path / "run") == []
