"""Embedding and matching distillation on the GCIDE retrieval task, in one run.

Rows: BM25 (bm25s), all-MiniLM-L6-v2 zero-shot (the teacher), a 2-layer student trained with in-batch
InfoNCE (the plain baseline) and with Margin-MSE from the teacher, a decoder LM of ours zero-shot and
after flipped KD (LoRA encoder + MCL), and the M3 self-distilled model's three heads and their
combination. Columns: Recall@1/10, MRR@10, nDCG@10 on held-out queries, encode throughput (texts/s, on
corpus documents), model size and training time. Settings come from configs/embed/*.yaml; --steps and
--set override them for every method.

    .venv/bin/python bench/embed.py [--lm DIR] [--steps N] [--set key=value ...]

The LM for flipped KD: --lm DIR, else the cached `make demo` teacher, else runs/demo/teacher/final,
else a small stand-in pretrained here on KJV (a few minutes once, then cached in the project cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "embed"


def log(msg: str) -> None:
    print(msg, flush=True)


def find_lm(explicit: str | None) -> tuple[str | None, str]:
    """(path, how it was found) of the decoder LM for flipped KD."""
    if explicit:
        return explicit, "given with --lm"
    from lmdistill.data.cache import default_cache_dir

    cached = sorted((Path(default_cache_dir()) / "demo").glob("teacher-*/final/model.safetensors"))
    if cached:
        return str(cached[-1].parent), "cached demo teacher"
    if (ROOT / "runs/demo/teacher/final/config.json").is_file():
        return str(ROOT / "runs/demo/teacher/final"), "runs/demo/teacher/final"
    standin = Path(default_cache_dir()) / "embed" / "standin-lm-gpt2-1.5m-200"
    if (standin / "final" / "model.safetensors").is_file():
        return str(standin / "final"), "stand-in: gpt2-student-1.5m, 200 KJV steps (cached)"
    try:  # a small stand-in so the row exists; pretrained once with lmdistill's own trainer, then cached
        from lmdistill.config import validate_config
        from lmdistill.report.demo import recipe
        from lmdistill.train.run import run_training

        raw = recipe("demo_teacher")
        raw.update(output_dir=str(standin))
        raw["student"] = {"preset": "gpt2-student-1.5m"}
        raw["train"] = {**raw.get("train", {}), "steps": 200, "warmup_steps": 20}
        raw["eval"] = {"every": 1000, "max_batches": 2}
        raw["checkpoint"] = {"every": 1000, "keep": 1}
        log("no trained LM found: pretraining a 1.5M GPT-2 stand-in on KJV for 200 steps")
        run_training(validate_config(raw, "bench stand-in LM"), overwrite=True)
        return str(standin / "final"), "stand-in: gpt2-student-1.5m, 200 KJV steps"
    except Exception as exc:  # noqa: BLE001 - the bench still prints the other rows
        log(f"could not build a stand-in LM ({type(exc).__name__}: {exc}); skipping flipped KD")
        return None, "unavailable"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", help="decoder LM directory for flipped KD")
    parser.add_argument("--steps", type=int, help="training steps for every method (default: the configs')")
    parser.add_argument("--set", action="append", default=[], help="override for every config, key=value")
    parser.add_argument("--output", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    wall = time.perf_counter()
    load_start = os.getloadavg()  # other jobs share this machine: the timings depend on it
    import torch
    from transformers.utils import logging as hf_logging

    from lmdistill.embed.config import load_config
    from lmdistill.embed.evaluate import format_table
    from lmdistill.embed.run import (
        baseline_rows,
        lm_zero_shot_row,
        lora_init_row,
        run_distill,
        task_from_config,
        training_signal,
    )

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    work = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="bench-embed-"))
    common = [*args.set, *([f"train.steps={args.steps}"] if args.steps else [])]

    def cfg_for(name: str, extra: list[str] = ()):
        return load_config(CONFIGS / f"{name}.yaml", [f"output_dir={work / name}", *common, *extra])

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    base = cfg_for("margin_mse")
    task = task_from_config(base)
    timings["task"] = time.perf_counter() - t0
    log(f"task {task.summary()} ({timings['task']:.0f}s)")

    t0 = time.perf_counter()
    rows = baseline_rows(task, base, log=log)
    timings["baselines"] = time.perf_counter() - t0

    # The teacher's embeddings and mined negatives, shared by Margin-MSE and flipped KD.
    t0 = time.perf_counter()
    signal = training_signal(base, task)
    timings["teacher signal"] = time.perf_counter() - t0
    log(f"teacher signal: {len(signal.doc_ids)} documents, hard negatives mined ({timings['teacher signal']:.0f}s)")

    for name in ("infonce", "margin_mse"):
        t0 = time.perf_counter()
        rows += run_distill(cfg_for(name), task=task, signal=signal if name == "margin_mse" else None, log=log)
        timings[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    lm_path, lm_how = find_lm(args.lm)
    timings["find/pretrain LM"] = time.perf_counter() - t0
    if lm_path is not None:
        t0 = time.perf_counter()
        cfg = cfg_for("flipped_kd", [f"lm.path={lm_path}"])
        zero = [lm_zero_shot_row(lm_path, task, cfg), lora_init_row(task, cfg)]
        flipped = run_distill(cfg, task=task, signal=signal, log=log)
        rows += [*zero, *flipped]
        timings["flipped_kd"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows += run_distill(cfg_for("m3"), task=task, log=log)
    timings["m3"] = time.perf_counter() - t0

    total = time.perf_counter() - wall
    load_end = os.getloadavg()
    print()
    print(f"GCIDE {task.summary()}; flipped-KD LM: {lm_path} ({lm_how})")
    print(format_table(rows))
    print()
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"wall time: {total:.0f} s ({total / 60:.1f} min), torch threads {args.threads}, outputs in {work}")
    print("load average (1/5/15 min): start " + " ".join(f"{x:.2f}" for x in load_start) + ", end " + " ".join(f"{x:.2f}" for x in load_end))
    return 0


if __name__ == "__main__":
    sys.exit(main())
