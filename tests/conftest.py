"""Shared fixtures: a small real corpus through the real data path, and tiny models saved to disk."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the compiled loss kernels cost a compile per shape; tests/losses/test_fused.py turns them on and checks them
os.environ.setdefault("LMDISTILL_COMPILE", "0")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lmdistill-cache")


@pytest.fixture(scope="session")
def kjv_verses() -> list[tuple[str, str]]:
    """(reference, verse text) of the real KJV, via the corpus reader."""
    from lmdistill.data.corpora import read_kjv

    verses = []
    for doc in read_kjv():
        for number, text in doc.meta["verses"]:
            verses.append((f"{doc.meta['book']} {doc.meta['chapter']}:{number}", text))
    return verses


@pytest.fixture(scope="session")
def kjv_small_txt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 300 KB of real KJV text (whole chapters as paragraphs) as a user .txt file."""
    from lmdistill.data.corpora import read_kjv

    path = tmp_path_factory.mktemp("corpus") / "kjv_small.txt"
    chapters = [doc.text for doc in read_kjv()][:300]
    path.write_text("\n\n".join(chapters) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def verse_pairs_jsonl(tmp_path_factory: pytest.TempPathFactory, kjv_verses) -> Path:
    """Prompt/response data from real verses (prompt: reference + first words; response: the rest),
    so valid-token counts differ between blocks."""
    path = tmp_path_factory.mktemp("corpus") / "verses.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for ref, text in kjv_verses[:3000]:
            words = text.split()
            cut = max(1, len(words) // 3)
            f.write(json.dumps({"prompt": f"{ref} " + " ".join(words[:cut]), "response": " " + " ".join(words[cut:])}) + "\n")
    return path


def save_tiny_model(path: Path, tokenizer, *, layers: int = 2, hidden: int = 32, heads: int = 2, seed: int = 0,
                    extra_rows: int = 0, max_positions: int = 128) -> Path:
    """A tiny GPT-2 style causal LM saved with save_pretrained + tokenizer (safetensors)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=len(tokenizer) + extra_rows, n_positions=max_positions, n_embd=hidden, n_layer=layers, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_tokenizer(kjv_small_txt: Path, cache_dir: Path):
    from lmdistill.data.prepare import prepare_data

    return prepare_data(str(kjv_small_txt), block_size=32, vocab_size=512, cache_dir=cache_dir).tokenizer


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory, small_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher", small_tokenizer, layers=2, hidden=48, seed=1)


# a teacher with its own tokenizer (cross-tokenizer tests in tests/train and tests/teachers)
@pytest.fixture(scope="session")
def fortune_tokenizer():
    """Another corpus, another size: the teacher's own BPE."""
    from lmdistill.data.corpora import read_fortunes
    from lmdistill.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([d.text for d in itertools.islice(read_fortunes(), 3000)], vocab_size=700)


@pytest.fixture(scope="session")
def other_teacher(tmp_path_factory, fortune_tokenizer):
    # 64 learned positions: the teacher's tokenization of a 32-token student block can be longer; the cut is tested
    return save_tiny_model(tmp_path_factory.mktemp("xtok") / "teacher", fortune_tokenizer, layers=2, hidden=48,
                           seed=3, max_positions=64)
