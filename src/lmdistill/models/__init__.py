"""Models: loading causal LMs (any family, LoRA adapters), from-scratch presets, tiny configs of every family for
tests, the teacher/student vocabulary ladder, and whether logits are a plain (or known-transformed) linear head.

Names are imported lazily (PEP 562), so the config layer can import :mod:`lmdistill.models.lora`'s settings
without pulling in torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_from_preset": "loading", "count_parameters": "loading", "load_causal_lm": "loading",
    "PRESETS": "presets", "preset_config": "presets",
    "VocabAlignment": "vocab", "check_vocab_compatible": "vocab", "vocab_ladder": "vocab",
    "LoraSettings": "lora", "apply_lora": "lora",
    "LogitTransform": "heads", "logit_transform": "heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmdistill.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmdistill.models.{_EXPORTS[name]}"), name)
