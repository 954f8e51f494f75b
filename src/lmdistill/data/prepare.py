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
    streams = {
        split: tokenize_documents(split_docs, tokenizer, cache_dir / "tokens", f"{name}-{split}")
        for split, split_docs in by_split.items()
    }
    return PreparedData(tokenizer=tokenizer, streams=streams, documents=by_split, block_size=block_size)
