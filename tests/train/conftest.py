"""Fixtures of the cross-tokenizer trainer tests (the teacher with another tokenizer is in tests/conftest.py)."""

from __future__ import annotations

import pytest

from lmdistill.data.blocks import BlockDataset, collate
from lmdistill.data.prepare import prepare_data
from tests.conftest import save_tiny_model


@pytest.fixture()
def student_dir(tmp_path, small_tokenizer):
    return save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=2)


@pytest.fixture(scope="module")
def student_batch(kjv_small_txt, cache_dir, small_tokenizer):
    data = prepare_data(str(kjv_small_txt), block_size=32, tokenizer=small_tokenizer, cache_dir=cache_dir)
    blocks = BlockDataset(data.streams["train"], 32)
    return collate([blocks[i] for i in range(4)])
