"""Domain-tagged corpora: text that knows which domain it comes from.

Domain-aware distillation (DDK, :mod:`lmdistill.selection.ddk`) and the per-domain tables of
``bench/data_centric.py`` need every document tagged with a domain and a fixed validation sample per
domain. A domain is a name and a source:

* one of the installed corpora (``kjv``, ``gcide``, ``jargon``, ``fortunes``), or
* user files: a path (a ``.txt``/``.jsonl``/``.parquet``/``.csv`` file or a directory of them) or a
  list of paths, read by :mod:`lmdistill.data.userfiles`.

In YAML::

    domains:
      - {name: bible, source: kjv}
      - {name: dictionary, source: gcide, max_documents: 4000}
      - {name: notes, source: [data/notes_a.txt, data/notes_b.jsonl]}

Splits are the corpus-wide hash splits (:func:`~lmdistill.data.documents.split_of`), so a domain's
validation documents are the very ones a single-corpus run validates on. ``max_documents`` keeps a
deterministic, representative subset (the documents with the smallest hash of their id under a salt of
their own, kept in corpus order), so a large corpus (GCIDE: 126k entries) can be capped without taking
only its first letters.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from lmdistill.config import BUILTIN_CORPORA, Section
from lmdistill.data.blocks import BlockDataset, TokenStream, tokenize_documents
from lmdistill.data.cache import default_cache_dir
from lmdistill.data.corpora import load_documents
from lmdistill.data.documents import SPLITS, Document, split_of
from lmdistill.errors import DataError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SUBSET_SALT = "lmdistill-domain-subset"


class DomainSpec(Section):
    """One domain: its name (in logs, tables and plots) and where its text comes from."""

    name: str = Field(..., description="letters, digits, '_', '.', '-' (used in metric names such as bpb/NAME)")
    source: str | list[str] = Field(
        ..., description="a corpus (kjv, gcide, jargon, fortunes), or a path / list of paths to .txt/.jsonl/.parquet/.csv"
    )
    max_documents: int | None = Field(None, ge=1, description="keep a deterministic subset of this many documents")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"domain name {value!r} must start with a letter or digit and use only letters, digits, _ . -")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("source: give a corpus name or at least one path")
        for item in items:
            if item in BUILTIN_CORPORA:
                if not isinstance(value, str):
                    raise ValueError(f"source: the corpus {item!r} stands alone (source: {item}), not inside a list of files")
            elif not Path(item).expanduser().exists():
                raise ValueError(f"source: {item!r} is neither a corpus ({', '.join(BUILTIN_CORPORA)}) nor an existing path")
        return value

    @property
    def sources(self) -> list[str]:
        return [self.source] if isinstance(self.source, str) else list(self.source)


def builtin_domains(max_documents: dict[str, int] | None = None) -> list[DomainSpec]:
    """The four installed corpora as domains named after them (optionally capped per corpus)."""
    caps = max_documents or {}
    return [DomainSpec(name=name, source=name, max_documents=caps.get(name)) for name in BUILTIN_CORPORA]


def check_domains(specs: list[DomainSpec]) -> None:
    """At least two domains with distinct names (a mixture of one domain is no mixture)."""
    if len(specs) < 2:
        raise DataError(f"domains: a mixture needs at least two domains (got {len(specs)})")
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise DataError(f"domains: the name {spec.name!r} is used twice; give each domain its own name")
        seen.add(spec.name)


def _subset_rank(doc_id: str) -> bytes:
    return hashlib.blake2b(f"{SUBSET_SALT}\x00{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


def domain_documents(spec: DomainSpec, *, txt_mode: str = "paragraph") -> list[Document]:
    """The documents of one domain (all its sources, in order), capped by ``max_documents``."""
    docs: list[Document] = []
    for source in spec.sources:
        docs.extend(load_documents(source, txt_mode=txt_mode))
    if not docs:
        raise DataError(f"domain {spec.name!r}: its source {spec.source!r} holds no documents")
    if spec.max_documents is not None and len(docs) > spec.max_documents:
        keep = set(sorted(range(len(docs)), key=lambda i: _subset_rank(docs[i].doc_id))[: spec.max_documents])
        docs = [d for i, d in enumerate(docs) if i in keep]
    return docs


@dataclass
class DomainData:
    """Tokenized domains: per domain and split a token stream, and the union of all domains per split (the
    trainer's own stream arguments: its evaluation and held-out batches read them)."""

    names: list[str]
    tokenizer: Any
    streams: dict[str, dict[str, TokenStream]]
    combined: dict[str, TokenStream]
    documents: dict[str, dict[str, list[Document]]]
    block_size: int

    def blocks(self, domain: str, split: str = "train") -> BlockDataset:
        stream = self.streams[domain][split]
        try:
            return BlockDataset(stream, self.block_size)
        except DataError as exc:
            raise DataError(f"domain {domain!r}, split {split}: {exc}",
                            hint="add documents to the domain, raise max_documents, or lower data.block_size") from None

    def train_tokens(self) -> dict[str, int]:
        """Target tokens of each domain's training split (the size a size-proportional mixture follows)."""
        return {name: self.streams[name]["train"].n_targets for name in self.names}


def prepare_domains(
    specs: list[DomainSpec],
    *,
    block_size: int,
    tokenizer: Any = None,
    vocab_size: int = 8192,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    cache_dir: Path | None = None,
) -> DomainData:
    """Documents of every domain split by hash, one tokenizer (given, or a byte-level BPE trained on the union
    of the training splits) and memory-mapped token streams per domain and split, cached on disk."""
    from lmdistill.data.prepare import trained_tokenizer

    check_domains(specs)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    documents: dict[str, dict[str, list[Document]]] = {}
    for spec in specs:
        by_split: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for doc in domain_documents(spec):
            by_split[split_of(doc.doc_id, fractions)].append(doc)
        for split in SPLITS:
            if not by_split[split] and fractions[SPLITS.index(split)] > 0:
                raise DataError(f"domain {spec.name!r} has no {split} documents",
                                hint="add documents or raise its max_documents")
        documents[spec.name] = by_split
    names = [s.name for s in specs]
    if tokenizer is None:
        tokenizer = trained_tokenizer([d for n in names for d in documents[n]["train"]], vocab_size, cache_dir)
    streams = {
        name: {split: tokenize_documents(docs, tokenizer, cache_dir / "tokens", f"domain-{name}-{split}")
               for split, docs in documents[name].items() if docs}
        for name in names
    }
    combined = {
        split: tokenize_documents([d for n in names for d in documents[n][split]], tokenizer, cache_dir / "tokens",
                                  f"domains-{'+'.join(names)[:80]}-{split}")
        for split in SPLITS if any(documents[n][split] for n in names)
    }
    for name in names:
        log.info("domain %s: %s", name, ", ".join(f"{s} {len(documents[name][s])} docs" for s in SPLITS))
    return DomainData(names=names, tokenizer=tokenizer, streams=streams, combined=combined, documents=documents,
                      block_size=block_size)


__all__ = ["DomainData", "DomainSpec", "builtin_domains", "check_domains", "domain_documents", "prepare_domains"]
