"""Fixtures for MiniPLM selection: real Psalms plus a few noise documents to refine, a teacher trained longer
than a reference model on the clean Psalms, and a reference with its own (different) tokenizer."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from tests.teachers.conftest import train_tiny_lm


def noise_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + "#@%&*"
    return [" ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(3, 9))) for _ in range(120)) for _ in range(n)]


def _psalms() -> list[str]:
    from lmdistill.data.corpora import read_kjv

    return [d.text for d in read_kjv() if d.meta["book"] == "Psalms"][:40]


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus to refine: the first 40 Psalms with 10 noise documents (random strings) interleaved."""
    docs = []
    noise = iter(noise_texts(10))
    for i, text in enumerate(_psalms()):
        docs.append(text)
        if i % 4 == 3:
            docs.append(next(noise))
    path = tmp_path_factory.mktemp("corpus") / "mixed.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def clean_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the models were pretrained on: the same Psalms without the noise."""
    path = tmp_path_factory.mktemp("corpus") / "clean.txt"
    path.write_text("\n\n".join(_psalms()) + "\n", encoding="utf-8")
    return path


def _blocks(corpus: Path, tokenizer, cache_dir: Path):
    """All of the corpus as training blocks (no split: these models are pretrained on all of it)."""
    from lmdistill.data.blocks import BlockDataset, tokenize_documents
    from lmdistill.data.corpora import load_documents

    stream = tokenize_documents(load_documents(corpus), tokenizer, cache_dir / "tokens", corpus.stem)
    return BlockDataset(stream, 32)


@pytest.fixture(scope="session")
def scoring_teacher(tmp_path_factory, small_tokenizer, clean_corpus, cache_dir) -> Path:
    """The larger model, trained longer on the clean text."""
    return train_tiny_lm(tmp_path_factory.mktemp("models") / "teacher", small_tokenizer,
                         _blocks(clean_corpus, small_tokenizer, cache_dir), layers=2, hidden=48, steps=150, seed=1)


@pytest.fixture(scope="session")
def other_tokenizer(clean_corpus: Path):
    from lmdistill.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([clean_corpus.read_text()], vocab_size=400)


@pytest.fixture(scope="session")
def reference_other_tokenizer(tmp_path_factory, other_tokenizer, clean_corpus: Path, cache_dir: Path) -> Path:
    """A small reference model with a different vocabulary, trained briefly on the clean text."""
    return train_tiny_lm(tmp_path_factory.mktemp("models") / "reference", other_tokenizer,
                         _blocks(clean_corpus, other_tokenizer, cache_dir), layers=1, hidden=32, steps=30, seed=2)


@pytest.fixture(scope="session")
def reference_same_tokenizer(tmp_path_factory, small_tokenizer, clean_corpus: Path, cache_dir: Path) -> Path:
    return train_tiny_lm(tmp_path_factory.mktemp("models") / "reference-same", small_tokenizer,
                         _blocks(clean_corpus, small_tokenizer, cache_dir), layers=1, hidden=32, steps=30, seed=3)
