"""Evaluation of a grid's models: bits per byte on the in-domain and every out-of-domain corpus's validation
split, top-1 agreement and KL to the teacher in-domain.

All cells of a grid score the same validation blocks (the same token streams, the same ``max_batches``), so
their numbers compare. The streams are tokenized once by the compare process and memory-mapped by the cells.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmdistill.config import BUILTIN_CORPORA
from lmdistill.data.blocks import BlockDataset, TokenStream, tokenize_documents
from lmdistill.data.corpora import load_documents
from lmdistill.data.prepare import split_documents
from lmdistill.errors import LmdistillError

log = logging.getLogger(__name__)

__all__ = ["installed_corpora", "evaluation_streams", "evaluate_model_on_streams"]


def installed_corpora(exclude: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(built-in corpora whose files are installed, {corpus: why not} for the others), ``exclude`` left out."""
    found, missing = [], {}
    for name in BUILTIN_CORPORA:
        if name == exclude:
            continue
        try:
            docs = load_documents(name)
        except (LmdistillError, OSError) as exc:
            missing[name] = str(exc).splitlines()[0]
            continue
        if docs:
            found.append(name)
        else:
            missing[name] = "no documents"
    return found, missing


def evaluation_streams(tokenizer: Any, corpora: list[str], *, cache_dir: Path,
                       fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)) -> dict[str, TokenStream]:
    """The validation stream of each corpus (built-in name or data file) in ``tokenizer``; cached on disk, so a
    second call (another cell, a rerun) only memory-maps them. Only the validation split is tokenized."""
    streams = {}
    for corpus in corpora:
        docs = split_documents(load_documents(corpus), fractions)["validation"]
        name = Path(corpus).stem if Path(corpus).suffix else corpus
        streams[corpus] = tokenize_documents(docs, tokenizer, cache_dir / "tokens", f"{name}-validation", show_progress=False)
    return streams


def evaluate_model_on_streams(
    model: Any,
    streams: dict[str, TokenStream],
    *,
    block_size: int,
    batch_size: int,
    max_batches: int | None,
    teacher: Any | None = None,
    teacher_on: str | None = None,
    vocab_size: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{corpus: evaluate_lm metrics}``; the teacher's agreement and KL are computed on ``teacher_on`` only
    (in-domain: what the student was distilled on)."""
    from lmdistill.eval.lm import evaluate_lm

    out = {}
    for corpus, stream in streams.items():
        dataset = BlockDataset(stream, block_size)
        if len(dataset) == 0:
            log.warning("validation split of %s is shorter than one block of %d tokens: skipped", corpus, block_size)
            continue
        out[corpus] = evaluate_lm(
            model, dataset, bytes_per_token=stream.bytes_per_target, batch_size=batch_size, max_batches=max_batches,
            teacher=teacher if corpus == teacher_on else None, vocab_size=vocab_size,
        )
    return out
