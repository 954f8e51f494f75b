"""Tiny random-initialised models of every causal-LM family users distil, for tests and benchmarks.

Each family is built from its own ``transformers`` config class with the family's real architecture choices
(normalisation, positional scheme, grouped-query attention, soft-capping, tied or untied embeddings) and tiny
sizes, so a test can save one with ``save_pretrained`` and load it back by ``path:`` like a downloaded
checkpoint. Nothing is downloaded: the weights are random.

================  ===============================  ===========================================================
family            config class                     what sets it apart
================  ===============================  ===========================================================
``llama``         ``LlamaConfig``                  RMSNorm, RoPE, SwiGLU, untied output layer
``qwen2``         ``Qwen2Config``                  Llama-like with q/k/v biases
``qwen3``         ``Qwen3Config``                  per-head q/k RMSNorm, explicit ``head_dim``
``mistral``       ``MistralConfig``                grouped-query attention, sliding window
``gemma2``        ``Gemma2Config``                 final-logit soft-capping, tied embeddings, alternating local/global
``gemma3``        ``Gemma3TextConfig``             q/k norm, local/global layers with two RoPE bases, tied
``phi3``          ``Phi3Config``                   fused qkv and gate/up projections
``gpt_neox``      ``GPTNeoXConfig``                parallel residual, partial rotary, untied ``embed_out``
``gpt2``          ``GPT2Config``                   learned positions, LayerNorm, biases, tied
================  ===============================  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.errors import ConfigError

__all__ = ["FAMILIES", "Family", "family_config", "build_family_model", "save_family_model"]


@dataclass(frozen=True)
class Family:
    config_class: str  # the transformers config class
    tied: bool  # the family's usual choice for tie_word_embeddings
    softcap: float | None = None  # its final-logit soft-cap by default


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaConfig", tied=False),
    "qwen2": Family("Qwen2Config", tied=False),
    "qwen3": Family("Qwen3Config", tied=False),
    "mistral": Family("MistralConfig", tied=False),
    "gemma2": Family("Gemma2Config", tied=True, softcap=30.0),
    "gemma3": Family("Gemma3TextConfig", tied=True),
    "phi3": Family("Phi3Config", tied=False),
    "gpt_neox": Family("GPTNeoXConfig", tied=False),
    "gpt2": Family("GPT2Config", tied=True),
}


def _architecture(family: str, hidden: int, layers: int, heads: int, kv_heads: int, max_positions: int) -> dict[str, Any]:
    """The family's own fields at tiny sizes (dropout off everywhere: deterministic runs)."""
    head_dim = hidden // heads
    mlp = 2 * hidden
    if family == "gpt2":
        return dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, n_inner=4 * hidden,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if family == "gpt_neox":
        return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                    max_position_embeddings=max_positions, hidden_dropout=0.0, attention_dropout=0.0)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=mlp, max_position_embeddings=max_positions, attention_dropout=0.0)
    if family in ("qwen3", "mistral", "llama"):
        common["head_dim"] = head_dim
    if family == "mistral":
        common["sliding_window"] = max_positions
    if family in ("gemma2", "gemma3"):
        # Gemma's defaults (head_dim 256, window 4096) are sized for real models; alternate local/global layers
        common.update(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=max(4, max_positions // 2),
                      layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    if family == "phi3":
        common.update(resid_pdrop=0.0, embd_pdrop=0.0, original_max_position_embeddings=max_positions)
    return common


def family_config(
    family: str,
    *,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int | None = None,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    max_positions: int = 128,
    tie_word_embeddings: bool | None = None,
    overrides: dict[str, Any] | None = None,
) -> PretrainedConfig:
    """A tiny config of ``family`` (see the module table) for ``vocab_size`` tokens.

    ``kv_heads``: key/value heads where the family has grouped-query attention (default: half the heads);
    ``tie_word_embeddings``: default the family's own choice; ``overrides``: any further config fields, e.g.
    ``{"final_logit_softcapping": 2.0}`` (checked: a misspelt field is an error)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family '{family}'; allowed: {', '.join(FAMILIES)}")
    if hidden % heads:
        raise ConfigError(f"hidden size {hidden} must be a multiple of the {heads} attention heads")
    kv = kv_heads if kv_heads is not None else max(1, heads // 2)
    if heads % kv:
        raise ConfigError(f"{heads} attention heads must be a multiple of the {kv} key/value heads")
    spec = FAMILIES[family]
    import transformers

    config_class = getattr(transformers, spec.config_class)
    fields = _architecture(family, hidden, layers, heads, kv, max_positions)
    cfg: PretrainedConfig = config_class(
        vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        tie_word_embeddings=spec.tied if tie_word_embeddings is None else tie_word_embeddings, **fields,
    )
    if spec.softcap is not None:
        cfg.final_logit_softcapping = spec.softcap
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            raise ConfigError(f"model override '{key}' is not a field of {type(cfg).__name__}")
        setattr(cfg, key, value)
    return cfg


def build_family_model(
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    extra_rows: int = 0,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """A freshly initialised tiny ``family`` model for ``tokenizer`` (seeded; ``extra_rows`` pads the
    vocabulary, as real checkpoints pad it to a multiple of 64 or 128). ``config_kwargs`` go to
    :func:`family_config`."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    cfg = family_config(family, vocab_size=len(tokenizer) + extra_rows, bos_token_id=bos,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype)


def save_family_model(
    path: str | Path,
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> Path:
    """A tiny ``family`` model saved with ``save_pretrained`` (safetensors, in ``dtype``: bf16 like most
    released checkpoints) next to ``tokenizer``, loadable by ``path:``. ``kwargs`` go to
    :func:`build_family_model`."""
    path = Path(path)
    model = build_family_model(family, tokenizer, dtype=dtype, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
