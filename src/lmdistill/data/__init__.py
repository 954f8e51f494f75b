"""Data: corpus files -> documents -> tokenized, memory-mapped streams -> fixed-length blocks.

- :mod:`~lmdistill.data.documents`: ``Document``, deterministic splits (``split_of``, ``filter_split``).
- :mod:`~lmdistill.data.corpora`: the installed corpora (KJV, GCIDE, Jargon File, fortunes) and
  ``load_documents`` for a corpus name or user files (:mod:`~lmdistill.data.userfiles`).
- :mod:`~lmdistill.data.tokenizer`: byte-level BPE training, tokenizer loading and fingerprints.
- :mod:`~lmdistill.data.blocks`: ``tokenize_documents`` (cached stream + loss mask), ``BlockDataset``,
  ``collate``.

Names are imported lazily (PEP 562), so ``import lmdistill.data.documents`` does not pull in torch
or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "IGNORE_INDEX": "blocks",
    "BlockDataset": "blocks",
    "TokenStream": "blocks",
    "collate": "blocks",
    "token_dtype": "blocks",
    "tokenize_documents": "blocks",
    "default_cache_dir": "cache",
    "CORPORA": "corpora",
    "load_documents": "corpora",
    "load_split": "corpora",
    "read_fortunes": "corpora",
    "read_gcide": "corpora",
    "read_jargon": "corpora",
    "read_kjv": "corpora",
    "SPLITS": "documents",
    "Document": "documents",
    "Split": "documents",
    "filter_split": "documents",
    "split_key": "documents",
    "split_of": "documents",
    "EOS_TOKEN": "tokenizer",
    "PAD_TOKEN": "tokenizer",
    "load_tokenizer": "tokenizer",
    "tokenizer_fingerprint": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
    "read_path": "userfiles",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lmdistill.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lmdistill.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs
    from lmdistill.data.blocks import IGNORE_INDEX, BlockDataset, TokenStream, collate, token_dtype, tokenize_documents
    from lmdistill.data.cache import default_cache_dir
    from lmdistill.data.corpora import (
        CORPORA,
        load_documents,
        load_split,
        read_fortunes,
        read_gcide,
        read_jargon,
        read_kjv,
    )
    from lmdistill.data.documents import SPLITS, Document, Split, filter_split, split_key, split_of
    from lmdistill.data.tokenizer import (
        EOS_TOKEN,
        PAD_TOKEN,
        load_tokenizer,
        tokenizer_fingerprint,
        train_bpe_tokenizer,
    )
    from lmdistill.data.userfiles import read_path
