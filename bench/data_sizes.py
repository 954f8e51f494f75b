"""Corpus sizes, BPE training time and tokenization throughput on this machine.

    .venv/bin/python bench/data_sizes.py [--vocab-size 8192] [--corpora kjv gcide jargon fortunes]

For each corpus: documents, UTF-8 bytes, reading time, time to train a byte-level BPE on its train
split, tokens of the whole corpus with that tokenizer (through the real cached stream path, in a
temporary cache), and tokenization throughput. Then the same for one BPE trained on all corpora
together. Set TOKENIZERS_PARALLELISM=false to measure single-threaded tokenization (the Makefile does).
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

from lmdistill.data import CORPORA, filter_split, tokenize_documents, train_bpe_tokenizer  # noqa: E402
from lmdistill.data.documents import Document  # noqa: E402


def measure(name: str, docs: list[Document], vocab_size: int, cache: Path) -> dict:
    train = filter_split(docs, "train")
    start = time.perf_counter()
    tokenizer = train_bpe_tokenizer((d.text for d in train), vocab_size=vocab_size)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    stream = tokenize_documents(docs, tokenizer, cache, name, show_progress=False)
    tok_s = time.perf_counter() - start
    start = time.perf_counter()
    tokenize_documents(docs, tokenizer, cache, name, show_progress=False)
    cached_s = time.perf_counter() - start
    return {
        "docs": len(docs),
        "bytes": sum(len(d.text.encode()) for d in docs),
        "tokens": stream.n_tokens,
        "train_s": train_s,
        "tok_s": tok_s,
        "cached_s": cached_s,
        "bytes_per_token": stream.n_bytes / stream.n_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA))
    args = parser.parse_args()

    rows: list[tuple[str, dict, float]] = []
    everything: list[Document] = []
    with tempfile.TemporaryDirectory(prefix="lmdistill-bench-") as tmp:
        cache = Path(tmp)
        for name in args.corpora:
            start = time.perf_counter()
            # GCIDE: parse without the on-disk cache, so the reading time is the real parse time.
            docs = list(CORPORA[name](use_cache=False) if name == "gcide" else CORPORA[name]())
            read_s = time.perf_counter() - start
            everything.extend(docs)
            rows.append((name, measure(name, docs, args.vocab_size, cache), read_s))
        if len(args.corpora) > 1:
            rows.append(("all", measure("all", everything, args.vocab_size, cache), float("nan")))

    parallel = os.environ.get("TOKENIZERS_PARALLELISM", "(unset: parallel)")
    print(f"byte-level BPE, vocab {args.vocab_size}, trained on each corpus's train split; "
          f"TOKENIZERS_PARALLELISM={parallel}; python {sys.version.split()[0]}")
    header = ("corpus", "documents", "MB", "tokens", "bytes/token", "read s", "BPE train s", "tokenize s",
              "M tokens/s", "MB/s", "cached s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r, read_s in rows:
        print(
            f"| {name} | {r['docs']:,} | {r['bytes'] / 1e6:.2f} | {r['tokens']:,} | {r['bytes_per_token']:.2f} | "
            f"{read_s:.2f} | {r['train_s']:.2f} | {r['tok_s']:.2f} | {r['tokens'] / r['tok_s'] / 1e6:.2f} | "
            f"{r['bytes'] / r['tok_s'] / 1e6:.2f} | {r['cached_s']:.3f} |"
        )


if __name__ == "__main__":
    main()
