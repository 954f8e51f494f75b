"""Model presets for training from scratch on a CPU.

Sized from measurements on a 2-core machine (batch 16 x 128 tokens): the GPT-2 style 6.9M teacher runs
forward+backward at about 2,000 tokens/s, the 1.5M student at about 10,000 tokens/s. Dropout is off so
that runs are deterministic (exact resume) and short runs are not starved of signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from lmdistill.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    family: str  # "gpt2" or "llama"
    layers: int
    hidden: int
    heads: int
    intermediate: int | None = None  # llama only
    description: str = ""


PRESETS: dict[str, Preset] = {
    "gpt2-teacher-7m": Preset("gpt2", 6, 256, 8, description="GPT-2 style teacher, ~6.9M params at vocab 8192"),
    "gpt2-teacher-12m": Preset("gpt2", 8, 320, 8, description="GPT-2 style teacher, ~12.5M params at vocab 8192"),
    "gpt2-student-1.5m": Preset("gpt2", 2, 128, 4, description="GPT-2 style student, ~1.5M params at vocab 8192"),
    "gpt2-student-3m": Preset("gpt2", 4, 192, 4, description="GPT-2 style student, ~3.4M params at vocab 8192"),
    "llama-teacher-8m": Preset(
        "llama", 8, 256, 8, intermediate=688, description="Llama style teacher, ~8.4M params at vocab 8192"
    ),
    "llama-student-1.5m": Preset(
        "llama", 2, 128, 4, intermediate=344, description="Llama style student, ~1.5M params at vocab 8192"
    ),
}


def preset_config(
    name: str,
    *,
    vocab_size: int,
    max_positions: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> PretrainedConfig:
    """A `transformers` config for preset ``name`` with the tokenizer's vocabulary and special ids.

    Special ids are set explicitly: the GPT-2 default (50256) lies outside a small vocabulary.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}'; allowed: {', '.join(sorted(PRESETS))}")
    p = PRESETS[name]
    common = dict(
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
    )
    if p.family == "gpt2":
        cfg: PretrainedConfig = GPT2Config(
            n_positions=max_positions,
            n_embd=p.hidden,
            n_layer=p.layers,
            n_head=p.heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    else:
        cfg = LlamaConfig(
            hidden_size=p.hidden,
            intermediate_size=p.intermediate,
            num_hidden_layers=p.layers,
            num_attention_heads=p.heads,
            num_key_value_heads=p.heads,
            max_position_embeddings=max_positions,
            attention_dropout=0.0,
            **common,
        )
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            raise ConfigError(f"model override '{key}' is not a field of {type(cfg).__name__}")
        setattr(cfg, key, value)
    return cfg
