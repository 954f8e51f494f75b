#!/usr/bin/env python
"""AKL's head/tail split: a partial top-k against the full sort of the vocabulary, on a real teacher's rows.

AKL (arXiv 2404.02657) splits each teacher distribution into a head (most likely tokens up to cumulative
probability mu) and a tail. Read off a full descending sort, the split costs more than the rest of the loss
(in the objectives grid AKL trained at 762 tokens/s against 1,998 for forward KL). ``akl_head_mask`` finds
the head from the top 64 probabilities and sorts only the rows whose top 64 do not reach mu. This times
both on the demo teacher's distributions over KJV text (the demo teacher when ``lmdistill demo`` has cached
one, else the bench teacher of ``bench/cache.py``), at temperature 1 and at a flattening temperature 4,
checks that both give the same mask, and prints the ratio. One thread, as each cell of ``lmdistill compare``
runs. Usage::

    python bench/akl_head.py                  # 2048 rows (one demo batch), mu 0.5 and 0.9
    python bench/akl_head.py --rows 4096 --mu 0.5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cache as bench_cache  # noqa: E402  (bench/cache.py: teacher, logging and table helpers)


def teacher_rows(teacher_dir: Path, rows: int) -> torch.Tensor:
    """The teacher's logits on the first ``rows`` tokens of KJV text, in blocks of 128."""
    from transformers import AutoTokenizer

    from lmdistill.data.corpora import read_kjv
    from lmdistill.models.loading import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    ids: list[int] = []
    for doc in read_kjv():
        ids.extend(tokenizer(doc.text)["input_ids"])
        if len(ids) >= rows:
            break
    blocks = torch.tensor(ids[: rows - rows % 128]).view(-1, 128)
    model = load_causal_lm(teacher_dir).eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=b.unsqueeze(0)).logits[0] for b in blocks])


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048, help="teacher rows (tokens) per call")
    parser.add_argument("--mu", default="0.5,0.9", help="comma-separated head masses")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from lmdistill.data.cache import default_cache_dir
    from lmdistill.losses.akl import akl_head_by_sort, akl_head_mask

    teacher_dir, note = bench_cache.find_teacher(Path(default_cache_dir()))
    print(f"Teacher: {note}. At start: {bench_cache.load_note()}", flush=True)
    logits = teacher_rows(teacher_dir, args.rows)
    rows = []
    for temperature in (1.0, 4.0):
        p = torch.softmax(logits / temperature, dim=-1)
        for mu in (float(m) for m in args.mu.split(",")):
            same = torch.equal(akl_head_mask(p, mu), akl_head_by_sort(p, mu))
            sort_s = best_seconds(lambda: akl_head_by_sort(p, mu), args.repeats)
            topk_s = best_seconds(lambda: akl_head_mask(p, mu), args.repeats)
            sorted_rows = int((torch.topk(p, 64).values.sum(-1) <= mu).sum())
            rows.append({"T": temperature, "mu": mu, "rows": f"{p.shape[0]} x {p.shape[1]}",
                         "fallback": f"{sorted_rows} ({sorted_rows / p.shape[0]:.0%})", "same": "yes" if same else "NO",
                         "sort_ms": sort_s * 1e3, "topk_ms": topk_s * 1e3, "ratio": sort_s / topk_s})
    print()
    print(bench_cache.markdown(rows, [("T", "temperature", ".0f"), ("mu", "mu", ".1f"), ("rows", "rows x vocab", ""),
                                      ("fallback", "rows sorted fully", ""), ("same", "same mask", ""),
                                      ("sort_ms", "full sort ms (baseline)", ".1f"),
                                      ("topk_ms", "top-64 head ms", ".1f"), ("ratio", "speed-up", ".1f")]))
    print(f"\nAt the end: {bench_cache.load_note()}")
    if any(r["same"] == "NO" for r in rows):
        sys.exit("the top-k head differs from the full sort's on some row")


if __name__ == "__main__":
    main()
