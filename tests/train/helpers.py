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
