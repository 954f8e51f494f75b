"""Compare-grid fixtures: a tiny teacher and student on a small real KJV file, and a compare-config builder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import save_tiny_model


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory: pytest.TempPathFactory, small_tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "student", small_tokenizer, layers=1, hidden=32, seed=2)


@pytest.fixture(scope="session")
def fortunes_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, out-of-domain corpus: real fortunes as a .txt file (one paragraph each)."""
    from lmdistill.data.corpora import read_fortunes

    path = tmp_path_factory.mktemp("ood") / "fortunes_small.txt"
    texts = [doc.text.replace("\n\n", "\n") for _, doc in zip(range(3000), read_fortunes())]
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def compare_raw(tmp_path, kjv_small_txt, cache_dir, tiny_student, tiny_teacher, fortunes_small):
    """A small compare config (a mapping): write it with :func:`write_config` after changing what a test needs."""
    return {
        "output_dir": str(tmp_path / "grid"),
        "base": {
            "data": {"corpus": str(kjv_small_txt), "block_size": 32, "cache_dir": str(cache_dir)},
            "student": {"path": str(tiny_student)},
            "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "log_every": 1},
            "eval": {"every": 2, "max_batches": 2, "batch_size": 8},
            "checkpoint": {"every": 2, "keep": 2},
        },
        "teachers": {"tiny": {"path": str(tiny_teacher)}},
        "grid": {"objectives": ["forward_kl", "reverse_kl"], "seeds": [0, 1]},
        "evaluation": {"max_batches": 2, "batch_size": 8, "out_of_domain": [str(fortunes_small)]},
        "jobs": 0,
    }


def write_config(tmp_path: Path, raw: dict[str, Any], name: str = "compare.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(copy.deepcopy(raw), sort_keys=False), encoding="utf-8")
    return path
