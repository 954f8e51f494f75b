#!/usr/bin/env python
"""SinKD's group size: student quality and step time with rows coupled in blocks of 16 vs 64 (and 4).

SinKD couples rows in one Sinkhorn problem; for language models the rows are tokens, coupled in
consecutive position blocks of ``group_size``. The cost per row grows with the group (each row is compared
with the group's other rows across the whole vocabulary), so the group is a speed/coupling trade-off.
This trains the demo student (1.5M GPT-2, demo recipe, seed 0) on the KJV Bible from the bench teacher
(see ``bench/cache.py``) with ``sinkd(group g) + cross-entropy`` (weights 0.5 / 0.5) for each g, plus the
label-only twin, and prints validation perplexity on the whole validation split and the median step time.
All measured in one run. Usage::

    python bench/sinkd_group.py                      # groups 16 and 64, 300 steps
    python bench/sinkd_group.py --groups 4,16,64 --steps 600
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cache as bench_cache  # noqa: E402  (bench/cache.py: teacher, recipe, logging and table helpers)


def sinkd_objective(group: int) -> dict:
    return {"mix": [{"name": "sinkd", "group_size": group, "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", default="16,64", help="comma-separated SinKD group sizes")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output", type=Path, default=bench_cache.ROOT / "runs" / "bench" / "sinkd_group")
    args = parser.parse_args(argv)
    groups = [int(g) for g in args.groups.split(",") if g.strip()]

    from lmdistill.data.cache import default_cache_dir
    from lmdistill.losses import fused
    from lmdistill.train.run import run_training

    teacher_dir, teacher_note = bench_cache.find_teacher(Path(default_cache_dir()))
    kernels = "compiled loss kernels" if fused.compile_enabled() else "eager loss kernels (LMDISTILL_COMPILE=0)"
    print(f"Teacher: {teacher_note}. {kernels}. At start: {bench_cache.load_note()}", flush=True)
    rows = []
    # (name, run directory, teacher section, objective)
    runs = [(f"sinkd(group {g}) + CE", f"sinkd-group{g}", {"path": str(teacher_dir)}, sinkd_objective(g)) for g in groups]
    runs.append(("label-only (CE)", "label-only", None, None))
    for name, run_dir, teacher, objective in runs:
        cfg = bench_cache.student_config(args.output / run_dir, teacher_dir, teacher, args.steps,
                                         objective=objective or "forward_kl")  # label-only: no objective used
        bench_cache.log(f"student: {name}, {args.steps} steps; {bench_cache.load_note()}")
        started = time.perf_counter()
        result = run_training(cfg, overwrite=True, show_progress=False)
        rows.append({"run": name, "ppl": result.final_metrics.get("perplexity"),
                     "tok_s": result.tokens_per_second, "minutes": (time.perf_counter() - started) / 60})
    print()
    print(bench_cache.markdown(rows, [("run", "student", ""), ("ppl", "val ppl", ".3f"),
                                      ("tok_s", "train tokens/s", ",.0f"), ("minutes", "minutes (with eval)", ".1f")]))
    print(f"\nAt the end: {bench_cache.load_note()}")


if __name__ == "__main__":
    main()
