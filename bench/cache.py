#!/usr/bin/env python
"""PLACEHOLDER: being written."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH_TEACHER_STEPS = 400


def find_teacher(cache_root: Path) -> tuple[Path, str]:
    """The demo teacher when `lmdistill demo` has cached one, else a briefly pretrained bench teacher
    (same preset and recipe as the demo teacher, fewer steps), trained once and reused."""
    demo = sorted((cache_root / "demo").glob("teacher-*/final/model.safetensors"))
    if demo:
        return demo[-1].parent, f"demo teacher {demo[-1].parent}"
    from lmdistill.config import validate_config
    from lmdistill.report.demo import recipe
    from lmdistill.train.run import run_training

    raw = recipe("demo_teacher")
    raw["train"]["steps"] = BENCH_TEACHER_STEPS
    raw["checkpoint"] = {"every": 100, "keep": 1}
    key = hashlib.sha1(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:10]
    run_dir = cache_root / "bench" / f"cache-teacher-{key}"
    final = run_dir / "final"
    if not (final / "model.safetensors").exists():
        raw["output_dir"] = str(run_dir)
        config = validate_config(raw, "bench teacher")
        print(f"pretraining a bench teacher ({config.student.preset}, {BENCH_TEACHER_STEPS} steps) -> {final}", flush=True)
        run_training(config, resume=(run_dir / "checkpoints" / "latest").exists(), show_progress=False)
    return final, f"bench teacher {final} ({BENCH_TEACHER_STEPS} pretraining steps of the demo teacher recipe)"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher-only", action="store_true")
    args = parser.parse_args()
    from lmdistill.data.cache import default_cache_dir

    print(find_teacher(Path(default_cache_dir())))
