"""Fixtures for the teacher-cache tests: a few real KJV chapters, the shared small BPE, and a tiny GPT-2
teacher trained briefly on them (so its distributions are peaked like a real teacher's, not uniform)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

BLOCK = 32


def write_cache(path: Path, model, data, tokenizer, **kw):
    """A teacher cache of ``data``'s training split with the tests' defaults (k = 8, 64 blocks per shard)."""
    from lmdistill.teachers.cache import write_teacher_cache

    kw.setdefault("k", 8)
    kw.setdefault("blocks_per_shard", 64)
    return write_teacher_cache(path, model=model, tokenizer=tokenizer, stream=data.streams["train"], block_size=BLOCK,
                               model_name="tiny", **kw)


def train_tiny_lm(path: Path, tokenizer, blocks, *, layers: int = 2, hidden: int = 48, steps: int = 60,
                  seed: int = 0) -> Path:
    """A tiny GPT-2 trained for a few steps on real blocks, saved with its tokenizer (safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmdistill.data.blocks import collate

    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=hidden, n_layer=layers, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(blocks), (16,), generator=gen)
        batch = collate([blocks[int(i)] for i in idx])
        logits = model(input_ids=batch["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def few_chapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 30 Psalms (real KJV text, ~38 KB) as a user .txt file, one chapter a paragraph; the
    hash split puts 28 in train and one each in validation and test."""
    from lmdistill.data.corpora import read_kjv

    chapters = [d.text for d in read_kjv() if d.meta["book"] == "Psalms"][:30]
    path = tmp_path_factory.mktemp("corpus") / "psalms.txt"
    path.write_text("\n\n".join(chapters) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def few_data(few_chapters: Path, small_tokenizer, cache_dir: Path):
    from lmdistill.data.prepare import prepare_data

    return prepare_data(str(few_chapters), block_size=BLOCK, tokenizer=small_tokenizer, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory: pytest.TempPathFactory, small_tokenizer, few_data) -> Path:
    return train_tiny_lm(tmp_path_factory.mktemp("models") / "teacher", small_tokenizer, few_data.blocks("train"))


@pytest.fixture(scope="session")
def teacher_model(trained_teacher: Path):
    from lmdistill.models.loading import load_causal_lm

    return load_causal_lm(trained_teacher).eval()


@pytest.fixture(scope="session")
def k8_cache(tmp_path_factory, teacher_model, few_data, small_tokenizer) -> Path:
    """A finished top-k cache with the tests' defaults (read-only: tests that damage it copy it first)."""
    path = tmp_path_factory.mktemp("caches") / "k8"
    write_cache(path, teacher_model, few_data, small_tokenizer)
    return path


def run_config(tmp: Path, corpus: Path, cache_dir: Path, student: Path, teacher: dict, **train) -> dict:
    """A distillation run config (forward KL + CE, 4 steps) of ``student`` on ``corpus`` with ``teacher``."""
    return {
        "output_dir": str(tmp),
        "data": {"corpus": str(corpus), "block_size": BLOCK, "cache_dir": str(cache_dir)},
        "student": {"path": str(student)},
        "teacher": teacher,
        "objective": {"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "log_every": 1, **train},
        "eval": {"every": 1000, "max_batches": 2, "batch_size": 8},
        "checkpoint": {"every": 1000, "keep": 1},
    }
