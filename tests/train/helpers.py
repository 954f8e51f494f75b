"""Building small run configs for trainer tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lmdistill.config import RunConfig, validate_config


def run_config(tmp: Path, corpus: Path, cache_dir: Path, student: Path, teacher: Path | None = None, **sections: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "output_dir": str(tmp / "run"),
        "data": {"corpus": str(corpus), "block_size": 32, "cache_dir": str(cache_dir)},
        "student": {"path": str(student)},
        "objective": "cross_entropy" if teacher is None else "forward_kl",
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 2, "log_every": 1},
        "eval": {"every": 1000, "max_batches": 2, "batch_size": 8},
        "checkpoint": {"every": 2, "keep": 2},
    }
    if teacher is not None:
        raw["teacher"] = {"path": str(teacher)}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    return validate_config(raw, "test")


def interrupt_then_resume(config: Any, monkeypatch: Any, *, dies_in_step: int, build: Any = None) -> Any:
    """Train ``config`` until the process "dies" (KeyboardInterrupt) at the start of step ``dies_in_step`` (1-based),
    then build a new trainer on the same directory and finish with ``--resume``; returns that resumed trainer
    (trained, not closed). ``build(config)`` makes a trainer (default: the packed-text run's ``build_trainer``)."""
    import pytest

    if build is None:
        from lmdistill.train.run import build_trainer

        def build(cfg: RunConfig) -> Any:
            return build_trainer(cfg, show_progress=False)[0]

    killed = build(config)
    original = killed.train_step

    def dies(step: int) -> float:
        if step == dies_in_step - 1:
            raise KeyboardInterrupt
        return original(step)

    monkeypatch.setattr(killed, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    killed.close()
    resumed = build(config)
    resumed.train(resume=True)
    return resumed


def straight_and_resumed(straight_config: RunConfig, resumed_config: RunConfig, monkeypatch: Any, *,
                         dies_in_step: int = 3) -> tuple[Any, Any]:
    """Train ``straight_config`` without a break and ``resumed_config`` (same run, another directory) killed at
    ``dies_in_step`` then resumed; asserts the two students' weights are bitwise equal and returns both trainers
    (trained, not closed) for further checks."""
    import torch

    from lmdistill.train.run import build_trainer

    straight, _ = build_trainer(straight_config, show_progress=False)
    straight.train()
    resumed = interrupt_then_resume(resumed_config, monkeypatch, dies_in_step=dies_in_step)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    return straight, resumed


def distill_through_cli(tmp: Path, corpus: Path, cache_dir: Path, student: Path, teacher: dict[str, Any], objective: Any,
                        *, steps: int = 3, block_size: int = 32, **sections: Any) -> str:
    """``lmdistill distill`` on a small run config written to ``tmp/run.yaml`` (output ``tmp/run``); asserts it exits 0
    and saves the final model, and returns its output."""
    import yaml
    from typer.testing import CliRunner

    from lmdistill.cli import app

    cfg = {
        "output_dir": str(tmp / "run"),
        "data": {"corpus": str(corpus), "block_size": block_size, "cache_dir": str(cache_dir)},
        "teacher": teacher,
        "student": {"path": str(student)},
        "objective": objective,
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0},
        "eval": {"every": steps, "max_batches": 1, "batch_size": 4},
        "checkpoint": {"every": 100},
        **sections,
    }
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["distill", str(tmp / "run.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp / "run" / "final" / "model.safetensors").exists()
    return result.output


def relation_kl_reference(s, t, heads, mask):
    """MiniLMv2 written out: per token t, mean over relation heads of KL(R_T[t] || R_S[t]), with R = softmax over
    the real keys up to t of a_t . a_j / sqrt(d / heads)."""
    b_size, length = mask.shape
    out = np.zeros((b_size, length))
    for b in range(b_size):
        for i in range(length):
            if not mask[b, i]:
                continue
            keys = [j for j in range(i + 1) if mask[b, j]]
            kl = 0.0
            for h in range(heads):
                rel = []
                for x in (s, t):
                    dh = x.shape[-1] // heads
                    a = x[b, :, h * dh:(h + 1) * dh]
                    z = np.array([a[i] @ a[j] / math.sqrt(dh) for j in keys])
                    rel.append(z - z.max() - np.log(np.exp(z - z.max()).sum()))
                kl += (np.exp(rel[1]) * (rel[1] - rel[0])).sum()
            out[b, i] = kl / heads
    return out
