"""Fixtures of the generation tests: real KJV verses, a 400-token BPE trained on them, tiny GPT-2s."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread (and do not thrash when other jobs share the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def kjv_chapters():
    from lmdistill.data.corpora import read_kjv

    return list(read_kjv())


@pytest.fixture(scope="session")
def verse_tokenizer(kjv_chapters):
    """A byte-level BPE of 400 tokens trained on the first 3,000 real verses."""
    from lmdistill.data.tokenizer import train_bpe_tokenizer

    verses = [text for chapter in kjv_chapters for _, text in chapter.meta["verses"]][:3000]
    return train_bpe_tokenizer(verses, vocab_size=400)


@pytest.fixture(scope="session")
def continue_task(kjv_chapters):
    """The kjv_continue task (next 6 words), capped for speed."""
    from lmdistill.generation.config import TaskConfig
    from lmdistill.generation.tasks import build_task

    cfg = TaskConfig(name="kjv_continue", prompt_words=4, response_words=6,
                     max_examples={"train": 400, "validation": 40, "test": 40})
    return build_task(cfg, kjv_chapters)


def tiny_gpt2(tokenizer, *, layers: int = 2, hidden: int = 32, heads: int = 2, seed: int = 0, positions: int = 160):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=positions, n_embd=hidden, n_layer=layers, n_head=heads,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def trained_tiny(verse_tokenizer, continue_task):
    """A tiny GPT-2 trained for a few hundred steps on the task's training pairs (so its greedy outputs
    are real words that end with EOS, unlike a random model's)."""
    import torch

    from lmdistill.generation.batching import collate_examples, encode_examples, pad_id_of

    model = tiny_gpt2(verse_tokenizer, layers=2, hidden=48, seed=5).train()
    examples = encode_examples(verse_tokenizer, continue_task["train"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(len(examples), (16,), generator=g).tolist()
        batch = collate_examples([examples[i] for i in idx], pad_id_of(verse_tokenizer), 96)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def saved_teacher(tmp_path_factory, trained_tiny, verse_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("models") / "teacher"
    trained_tiny.save_pretrained(path)
    verse_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, verse_tokenizer):
    """A tiny GPT-2 student with the verse tokenizer, saved (the task-run tests)."""
    path = tmp_path_factory.mktemp("models") / "student"
    tiny_gpt2(verse_tokenizer, layers=1, hidden=32, seed=3).save_pretrained(path)
    verse_tokenizer.save_pretrained(path)
    return path
