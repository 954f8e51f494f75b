from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.embed.helpers import build_tiny_lm

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_lm(request, tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp(f"lm-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("lm-gpt2-single"), "gpt2")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from lmdistill.embed.config import resolve_model_path

    return resolve_model_path("minilm")


@pytest.fixture(scope="session")
def gcide_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gcide-task-cache")
