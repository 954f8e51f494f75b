#!/usr/bin/env python
"""The trainer's step time at another commit against this tree, measured interleaved in one run.

For refactors that must not change speed ("within noise"): ``--base REV`` is checked out into a temporary git
worktree, and each round times the same steps with that tree's code and with this tree's, one after the other (a
machine whose load drifts hits both alike). Each measurement is a fresh process (``PYTHONPATH`` picks the tree) that
builds the trainer for a case and times ``Trainer.train_step``: label-only, forward KL on the plain and on the chunked
path, generalized JSD (beta 0.5) on the chunked path; the same random-init 6.9M GPT-2 teacher (weights do not change
speed), the 1.5M student preset, KJV blocks of 128, batch 16. Prints each round's medians and, per case, the median
over rounds of this tree over the base (1.00 = unchanged).

    python bench/step_ab.py --base 77a06aa [--rounds 3] [--steps 15] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CASES = {
    "label-only": ("cross_entropy", False, False),
    "forward KL, plain": ("forward_kl", True, False),
    "forward KL, chunked": ("forward_kl", True, True),
    "JSD 0.5, chunked": ({"name": "jsd", "beta": 0.5}, True, True),
}


def worker(teacher: str, out: str, steps: int, warmup: int, threads: int) -> None:
    """Runs inside one tree (its ``src`` first on ``PYTHONPATH``): median step seconds per case."""
    import torch

    from lmdistill.config import validate_config
    from lmdistill.train.run import build_trainer

    torch.set_num_threads(threads)
    medians = {}
    for name, (objective, with_teacher, chunked) in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            raw = {"output_dir": f"{tmp}/run", "data": {"corpus": "kjv", "block_size": 128},
                   "tokenizer": {"path": teacher}, "student": {"preset": "gpt2-student-1.5m"}, "objective": objective,
                   "train": {"steps": 10_000, "batch_size": 16, "warmup_steps": 0, "chunked_loss": chunked},
                   "eval": {"every": 100_000}, "checkpoint": {"every": 100_000}}
            if with_teacher:
                raw["teacher"] = {"path": teacher}
            trainer, _ = build_trainer(validate_config(raw, "step_ab"), show_progress=False)
            times = []
            for step in range(warmup + steps):
                start = time.perf_counter()
                trainer.train_step(step)
                if step >= warmup:
                    times.append(time.perf_counter() - start)
            close = getattr(trainer, "close", None)  # older commits' trainers hold no run-directory lock
            if close is not None:
                close()
            medians[name] = statistics.median(times)
    Path(out).write_text(json.dumps(medians))


def make_teacher(directory: Path) -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    from lmdistill.data.prepare import prepare_data
    from lmdistill.models.loading import build_from_preset

    tokenizer = prepare_data("kjv", block_size=128).tokenizer
    model = build_from_preset("gpt2-teacher-7m", tokenizer, max_positions=128, seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def measure(tree: Path, teacher: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--teacher", str(teacher),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the measurement in {tree} failed:\n{proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="the commit to compare this tree with (required)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.teacher, args.worker, args.steps, args.warmup, args.threads)
        return
    if not args.base:
        parser.error("--base REV is required (the commit to compare this tree with)")
    sys.path.insert(0, str(ROOT / "src"))
    from lmdistill.report.plots import markdown_table

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base_tree = tmp / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), args.base],
                       check=True)
        try:
            teacher = make_teacher(tmp / "teacher")
            with open("/proc/loadavg") as f:
                print(f"load average at start: {' '.join(f.read().split()[:3])}", flush=True)
            rounds: list[dict[str, dict[str, float]]] = []
            for r in range(args.rounds):
                base = measure(base_tree, teacher, tmp / f"base-{r}.json", args)
                this = measure(ROOT, teacher, tmp / f"this-{r}.json", args)
                rounds.append({"base": base, "this": this})
                print(f"round {r + 1}: " + "; ".join(f"{k} {base[k]:.3f} -> {this[k]:.3f} s" for k in CASES), flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    rows = []
    for name in CASES:
        base = [r["base"][name] for r in rounds]
        this = [r["this"][name] for r in rounds]
        rows.append({"case": name, "base": statistics.median(base), "this": statistics.median(this),
                     "ratio": statistics.median(this) / statistics.median(base),
                     "spread": (max(base + this) - min(base + this)) / statistics.median(base + this)})
    print(f"\n## Step time, this tree against {args.base} ({args.rounds} interleaved rounds, median of {args.steps} "
          f"steps after {args.warmup})\n")
    print(markdown_table(rows, [("case", "step", ""), ("base", f"{args.base} s", ".3f"), ("this", "this tree s", ".3f"),
                                ("ratio", "this / base", ".2f"), ("spread", "spread of all rounds / median", ".2f")]))


if __name__ == "__main__":
    sys.exit(main())
