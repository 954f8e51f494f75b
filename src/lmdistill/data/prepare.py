"""The one data path every command uses: corpus -> documents -> split -> tokenized streams -> blocks."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lmdistill.data.blocks import BlockDataset, TokenStream, tokenize_documents
from lmdistill.data.cache import default_cache_dir, publish_directory
from lmdistill.data.corpora import load_documents
from lmdistill.data.documents import SPLITS, Document, split_of
from lmdistill.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from lmdistill.errors import DataError

log = logging.getLogger(__name__)


def split_documents(
    docs: list[Document], fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        out[split_of(doc.doc_id, fractions)].append(doc)
    return out


def _docs_key(docs: list[Document]) -> str:
    h = hashlib.sha1()
    for d in docs:
        h.update(d.doc_id.encode())
        h.update(b"\0")
        h.update(d.text.encode())
        h.update(b"\1")
    return h.hexdigest()[:16]


def trained_tokenizer(train_docs: list[Document], vocab_size: int, cache_dir: Path) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on ``train_docs`` (training split only), cached by content and size."""
    target = cache_dir / "tokenizers" / f"bpe{vocab_size}-{_docs_key(train_docs)}"
    if (target / "tokenizer.json").exists():
        return load_tokenizer(target)
    start = time.perf_counter()
    tok = train_bpe_tokenizer((d.text for d in train_docs), vocab_size=vocab_size)
    log.info("trained a %d-token BPE on %d documents in %.1fs", len(tok), len(train_docs), time.perf_counter() - start)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    publish_directory(tmp, target)
    return load_tokenizer(target)


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerBase
    streams: dict[str, TokenStream]
    documents: dict[str, list[Document]]
    block_size: int

    def blocks(self, split: str) -> BlockDataset:
        return BlockDataset(self.streams[split], self.block_size)


def prepare_data(
    corpus: str,
    *,
    block_size: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
    tokenizer_path: str | None = None,
    vocab_size: int = 8192,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    cache_dir: Path | None = None,
) -> PreparedData:
    """Documents of ``corpus`` split by hash, a tokenizer (given, loaded, or trained on the training
    split) and one memory-mapped token stream per split, all cached on disk."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    docs = load_documents(corpus)
    by_split = split_documents(docs, fractions)
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else trained_tokenizer(
            by_split["train"], vocab_size, cache_dir
        )
    name = Path(corpus).stem if Path(corpus).suffix else corpus
    empty = {split: 0 for split in ("train", "validation") if not by_split[split]}
    if empty:  # before tokenizing: an empty split cannot be tokenized at all
        check_split_sizes(corpus, empty, by_split, block_size, fractions)
    streams = {
        split: tokenize_documents(split_docs, tokenizer, cache_dir / "tokens", f"{name}-{split}")
        for split, split_docs in by_split.items()
    }
    check_split_sizes(corpus, streams, by_split, block_size, fractions)
    return PreparedData(tokenizer=tokenizer, streams=streams, documents=by_split, block_size=block_size)


def check_split_sizes(corpus: str, tokens: dict[str, TokenStream | int], documents: dict[str, list[Document]],
                      block_size: int, fractions: tuple[float, float, float]) -> None:
    """Training and validation need at least one block each; say why a split is too small and how to fix it
    (documents are assigned to splits by a hash of their id, so a small corpus can leave one empty).
    ``tokens``: each checked split's stream or token count."""
    for split, stream in tokens.items():
        n_tokens = stream if isinstance(stream, int) else stream.n_tokens
        if split not in ("train", "validation") or n_tokens >= block_size + 1:
            continue
        n_docs = len(documents[split])
        total = sum(len(d) for d in documents.values())
        raise DataError(
            f"the {split} split of {corpus} holds {n_docs} of its {total} documents, {n_tokens} tokens: fewer than "
            f"one block (data.block_size + 1 = {block_size + 1}) because the corpus is too small for "
            f"data.split_fractions {list(fractions)} (documents go to train/validation/test by a hash of their id)",
            hint="give more documents, raise that split's share (e.g. data.split_fractions: [0.8, 0.1, 0.1]) or lower "
                 "data.block_size",
        )
