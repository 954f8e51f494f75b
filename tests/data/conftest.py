"""Shared fixtures for the data tests: parsed corpora (once per session) and tiny tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lmdistill.data import Document, read_fortunes, read_gcide, read_jargon, read_kjv  # noqa: E402


@pytest.fixture(scope="session")
def gcide_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gcide-cache")


@pytest.fixture(scope="session")
def gcide_docs(gcide_cache_dir: Path) -> list[Document]:
    """All of GCIDE, parsed once per test session (and cached on disk in a session directory)."""
    return list(read_gcide(cache_dir=gcide_cache_dir))


@pytest.fixture(scope="session")
def kjv_docs() -> list[Document]:
    return list(read_kjv())


@pytest.fixture(scope="session")
def jargon_docs() -> list[Document]:
    return list(read_jargon())


@pytest.fixture(scope="session")
def fortune_docs() -> list[Document]:
    return list(read_fortunes())


WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def make_word_tokenizer(words: list[str] = WORDS):
    """A whitespace word-level tokenizer with a known vocabulary: <|endoftext|>=0, <|pad|>=1, then
    words[k] = k + 2. Lets tests state exact token ids without trusting any BPE."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "<unk>": 2}
    for k, word in enumerate(words):
        vocab[word] = k + 3
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def word_tokenizer():
    return make_word_tokenizer()


@pytest.fixture(scope="session")
def kjv_bpe(kjv_docs):
    """A small byte-level BPE trained on KJV (vocab 1024: fast to train, still real merges)."""
    from lmdistill.data import train_bpe_tokenizer

    return train_bpe_tokenizer((d.text for d in kjv_docs), vocab_size=1024)
