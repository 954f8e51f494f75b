"""Training throughput of the lmdistill trainer vs TRL's GKDTrainer, measured in one run.

Same teacher (GPT-2 style 6.9M), student (1.5M), KJV data (blocks of 128 tokens, batch 16), optimizer
and number of steps, for forward KL (TRL beta=0) and generalized JSD beta=0.5 (lmbda=0: no on-policy
generation, so both loops do teacher forward + student forward/backward + loss + AdamW). Also the
label-only step of the same student, to show the overhead of distillation.

    python bench/engine.py [--steps 30] [--warmup 5]

Prints tokens/s per loop and the ratio lmdistill / TRL. Teacher weights are the demo teacher when it is
cached (`make demo`), otherwise a random-init teacher of the same shape: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lmdistill.config import validate_config  # noqa: E402
from lmdistill.data.cache import default_cache_dir  # noqa: E402
from lmdistill.data.prepare import prepare_data  # noqa: E402
from lmdistill.models.loading import build_from_preset  # noqa: E402
from lmdistill.report.plots import markdown_table  # noqa: E402
from lmdistill.train.run import build_trainer  # noqa: E402

BLOCK, BATCH = 128, 16


def find_teacher(tmp: Path, tokenizer) -> Path:
    cached = sorted((default_cache_dir() / "demo").glob("teacher-*/final/model.safetensors"))
    if cached:
        return cached[-1].parent
    model = build_from_preset("gpt2-teacher-7m", tokenizer, max_positions=BLOCK, seed=0)
    model.save_pretrained(tmp / "teacher")
    tokenizer.save_pretrained(tmp / "teacher")
    return tmp / "teacher"


def student_dir(tmp: Path, tokenizer) -> Path:
    model = build_from_preset("gpt2-student-1.5m", tokenizer, max_positions=BLOCK, seed=0)
    model.save_pretrained(tmp / "student")
    tokenizer.save_pretrained(tmp / "student")
    return tmp / "student"


def fresh_accelerate_state() -> None:
    """Both systems run in this one process; each builds its own Accelerator."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def time_lmdistill(tmp: Path, teacher: Path, student: Path, objective, steps: int, warmup: int,
                   chunked: bool = False, teacher_dtype: str | None = None) -> float:
    fresh_accelerate_state()
    raw = {
        "output_dir": str(tmp / f"lmd-{abs(hash(str(objective)))}"),
        "data": {"corpus": "kjv", "block_size": BLOCK},
        "student": {"path": str(student)},
        "objective": objective,
        "train": {"steps": steps + warmup, "batch_size": BATCH, "lr": 1e-3, "warmup_steps": 0, "chunked_loss": chunked},
    }
    if objective != "cross_entropy":
        raw["teacher"] = {"path": str(teacher)}
        if teacher_dtype:
            raw["teacher"]["dtype"] = teacher_dtype
    else:
        raw["tokenizer"] = {"path": str(teacher)}
    trainer, _ = build_trainer(validate_config(raw, "bench"), show_progress=False)
    for s in range(warmup):
        trainer.train_step(s)
    start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        trainer.train_step(s)
    return steps * BATCH * BLOCK / (time.perf_counter() - start)


def time_trl(tmp: Path, teacher: Path, student: Path, beta: float, steps: int, warmup: int) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    data = prepare_data("kjv", block_size=BLOCK, tokenizer=tokenizer).blocks("train")
    rows = [data[i] for i in range(BATCH * (steps + warmup))]

    def collate(items):
        # Same tokens as lmdistill's blocks: TRL shifts internally, so pass the BLOCK+1 window unshifted.
        ids = torch.stack([torch.cat([it["input_ids"][:1], it["labels"]]) for it in items])[:, :BLOCK]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class Timer(TrainerCallback):
        def __init__(self):
            self.start = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start = time.perf_counter()

    timer = Timer()
    fresh_accelerate_state()
    args = GKDConfig(
        output_dir=str(tmp / f"trl-{beta}"), per_device_train_batch_size=BATCH, max_steps=steps + warmup,
        learning_rate=1e-3, lmbda=0.0, beta=beta, temperature=1.0, seq_kd=False, logging_steps=10_000,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, max_length=BLOCK,
        disable_tqdm=True,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student), teacher_model=AutoModelForCausalLM.from_pretrained(teacher),
        args=args, data_collator=collate, train_dataset=Dataset.from_list([{"idx": i} for i in range(len(rows))]),
        processing_class=tokenizer, callbacks=[timer],
    )
    trainer.train_dataset = _RowsDataset(rows)
    trainer.train()
    return steps * BATCH * BLOCK / (time.perf_counter() - timer.start)


class _RowsDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tokenizer = prepare_data("kjv", block_size=BLOCK, vocab_size=8192).tokenizer
        teacher = find_teacher(tmp, tokenizer)
        student = student_dir(tmp, tokenizer)
        label_only = time_lmdistill(tmp, teacher, student, "cross_entropy", args.steps, args.warmup)
        rows = []
        variants = (("plain", False, None), ("chunked", True, None), ("chunked, bf16 teacher", True, "bfloat16"))
        for name, objective, beta in (("forward KL", "forward_kl", 0.0), ("JSD beta=0.5", {"name": "jsd", "beta": 0.5}, 0.5)):
            trl = time_trl(tmp, teacher, student, beta, args.steps, args.warmup)
            for variant, chunked, teacher_dtype in variants:
                ours = time_lmdistill(tmp, teacher, student, objective, args.steps, args.warmup, chunked, teacher_dtype)
                rows.append({"objective": name, "variant": variant, "lmdistill": ours, "trl": trl, "ratio": ours / trl,
                             "kd_overhead": label_only / ours})
        print(f"\nteacher {teacher}; {args.steps} timed steps of {BATCH}x{BLOCK} tokens after {args.warmup} warm-up steps; "
              f"torch threads {torch.get_num_threads()}")
        print(f"label-only step of the same student: {label_only:,.0f} tokens/s\n")
        print(markdown_table(rows, [("objective", "objective", ""), ("variant", "lmdistill path", ""), ("lmdistill", "lmdistill tokens/s", ",.0f"),
                                    ("trl", "TRL GKDTrainer tokens/s", ",.0f"), ("ratio", "lmdistill / TRL", ".2f"),
                                    ("kd_overhead", "KD step time / label-only", ".2f")]))


if __name__ == "__main__":
    sys.exit(main())
