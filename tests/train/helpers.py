"""Building small run configs for trainer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def interrupt_then_resume(config: RunConfig, monkeypatch: Any, *, dies_in_step: int) -> Any:
    """Train ``config`` until the process "dies" (KeyboardInterrupt) at the start of step ``dies_in_step`` (1-based),
    then build a new trainer on the same directory and finish with ``--resume``; returns that resumed trainer
    (trained, not closed)."""
    import pytest

    from lmdistill.train.run import build_trainer

    killed, _ = build_trainer(config, show_progress=False)
    original = killed.train_step

    def dies(step: int) -> float:
        if step == dies_in_step - 1:
            raise KeyboardInterrupt
        return original(step)

    monkeypatch.setattr(killed, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    killed.close()
    resumed, _ = build_trainer(config, show_progress=False)
    resumed.train(resume=True)
    return resumed
