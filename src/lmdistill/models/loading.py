"""Loading causal LMs: a local directory, a hub id (for users with a network) or a from-scratch preset."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.errors import ConfigError
from lmdistill.models.presets import preset_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(path_or_id: str | Path, *, dtype: str = "float32") -> PreTrainedModel:
    """Load any ``AutoModelForCausalLM`` from a local directory or a hub id; a directory holding only a LoRA
    adapter (``adapter_config.json``, as a LoRA run writes to ``final/adapter``) gives its base model with the
    adapter merged in (:func:`lmdistill.models.lora.load_adapter_model`).

    Weights are read from safetensors only (``use_safetensors=True``): a pickled checkpoint from an
    untrusted source is never unpickled.
    """
    text = str(path_or_id)
    local = Path(text).expanduser().exists()
    # Hub ids look like "org/name"; anything else that is not on disk is a mistyped path.
    if not local and (text.startswith((".", "/", "~")) or text.count("/") > 1):
        raise ConfigError(f"model path '{text}' does not exist")
    resolve_dtype(dtype)
    if local:
        from lmdistill.models.lora import is_adapter_dir, load_adapter_model

        if is_adapter_dir(Path(text).expanduser()):
            return load_adapter_model(Path(text).expanduser(), dtype=dtype)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(Path(text).expanduser()) if local else text, dtype=resolve_dtype(dtype), use_safetensors=True, local_files_only=local or offline
        )
    except OSError as exc:
        where = "local directory" if local else "hub id (offline mode is on)" if offline else "hub id"
        raise ConfigError(f"cannot load a causal LM from {where} '{path_or_id}': {exc}") from exc
    return model


def build_from_preset(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_positions: int,
    seed: int = 0,
    overrides: dict | None = None,
) -> PreTrainedModel:
    """A freshly initialised model of preset ``name`` matched to ``tokenizer`` (seeded, reproducible)."""
    cfg = preset_config(
        name,
        vocab_size=len(tokenizer),
        max_positions=max_positions,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        overrides=overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
