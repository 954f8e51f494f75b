"""Pretraining throughput of every model preset on this machine, through the real trainer.

    .venv/bin/python bench/presets.py [--steps 20] [--warmup 3] [--batch 16] [--block 128]

For each preset: parameters at the KJV tokenizer's vocabulary (8192), and training tokens/s of
label-only pretraining (forward + backward + AdamW) on KJV blocks, with the loss on the chunked path
(the default) and on the plain full-logits path, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lmdistill.config import validate_config  # noqa: E402
from lmdistill.models.loading import count_parameters  # noqa: E402
from lmdistill.models.presets import PRESETS  # noqa: E402
from lmdistill.report.plots import markdown_table  # noqa: E402
from lmdistill.train.run import build_trainer  # noqa: E402


def tokens_per_second(preset: str, chunked: bool | str, args: argparse.Namespace, tmp: str) -> tuple[float, int, bool]:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per run in this process
    raw = {
        "output_dir": f"{tmp}/{preset}-{chunked}",
        "data": {"corpus": "kjv", "block_size": args.block},
        "tokenizer": {"vocab_size": 8192},
        "student": {"preset": preset},
        "objective": "cross_entropy",
        "train": {"steps": args.steps + args.warmup, "batch_size": args.batch, "warmup_steps": 0, "chunked_loss": chunked},
    }
    trainer, _ = build_trainer(validate_config(raw, "bench presets"), show_progress=False)
    for step in range(args.warmup):
        trainer.train_step(step)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        trainer.train_step(step)
    seconds = time.perf_counter() - start
    model = trainer.accelerator.unwrap_model(trainer.model)
    return args.steps * args.batch * args.block / seconds, count_parameters(model), bool(trainer.use_chunked)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in PRESETS:
            default, params, used_chunked = tokens_per_second(preset, "auto", args, tmp)
            plain, _, _ = tokens_per_second(preset, False, args, tmp)
            rows.append({"preset": preset, "params_m": params / 1e6, "path": "chunked" if used_chunked else "plain",
                         "chunked": default, "plain": plain, "ratio": default / plain})
            print(f"{preset}: {default:,.0f} tokens/s (plain path {plain:,.0f})", flush=True)
    print(f"\n{args.steps} timed steps of {args.batch}x{args.block} KJV tokens after {args.warmup} warm-up steps; "
          f"torch threads {torch.get_num_threads()}\n")
    print(markdown_table(rows, [("preset", "preset", ""), ("params_m", "params (M)", ".2f"),
                                ("path", "default loss path", ""), ("chunked", "tokens/s (default)", ",.0f"),
                                ("plain", "tokens/s (plain loss)", ",.0f"), ("ratio", "default / plain", ".2f")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
