"""LoRA students through ``peft``: low-rank adapters on a frozen base, saved as an adapter and optionally merged.

LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685: each chosen linear
layer ``W`` becomes ``W + (alpha / r) B A`` with trainable ``A`` (``r x in``) and ``B`` (``out x r``, zero at the
start, so training starts from the base model exactly); the base stays frozen. QLoRA (Dettmers et al. 2023,
"QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314) keeps the frozen base in 4 bits; the CPU
analogue here is a frozen base loaded in bfloat16 (``student.dtype: bfloat16``) with float32 adapters: half the
base's memory, the adapters' updates at full precision (4-bit bases need bitsandbytes on a GPU).

Config (the run config's ``student.lora`` section, :class:`LoraSettings`)::

    student: {path: DIR, dtype: bfloat16, lora: {r: 8, alpha: 16, target_modules: all-linear, save: both}}

The output layer and the embeddings are never adapted: the chunked loss reads the output layer's weight outside
the forward, which an adapter on it would bypass (and at a large vocabulary a full output layer is most of a small
student's parameters anyway).

Gradient checkpointing (:func:`enable_gradient_checkpointing`) recomputes each layer's activations in the backward
pass instead of keeping them: the same gradients for a fraction of the activation memory, at about one more
forward pass of compute (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmdistill.errors import ConfigError

if TYPE_CHECKING:  # torch and transformers load lazily: lmdistill.config imports LoraSettings
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

__all__ = ["LoraSettings", "apply_lora", "is_lora", "save_lora_student", "load_adapter_model", "lora_state",
           "load_lora_state", "enable_gradient_checkpointing", "ADAPTER_DIR"]

ADAPTER_DIR = "adapter"  # save_lora_student writes the adapter here, inside the run's final directory
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraSettings(BaseModel):
    """``student.lora``: train low-rank adapters instead of the whole student (module docstring). Unknown keys
    are errors, like every config section's."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="scale numerator: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names (or name suffixes) to adapt, e.g. [q_proj, v_proj]; all-linear = "
        "every linear layer but the output layer")
    save: Literal["adapter", "merged", "both"] = Field(
        "both", description="what the final directory gets: the adapter (in final/adapter, with the base model's "
        "path), the merged full model (in final), or both")

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules must name at least one module (or be 'all-linear')")
        return value


def is_lora(model: "torch.nn.Module") -> bool:
    """Whether ``model`` is a ``peft`` model (adapters on a frozen base)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _protected_names(model: PreTrainedModel) -> set[str]:
    """Qualified names of the output layer and the input embeddings (never adapted)."""
    wanted = {id(m) for m in (model.get_output_embeddings(), model.get_input_embeddings()) if m is not None}
    return {name for name, module in model.named_modules() if id(module) in wanted}


def _linear_names(model: PreTrainedModel) -> set[str]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return {name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def apply_lora(model: PreTrainedModel, settings: LoraSettings | dict) -> PreTrainedModel:
    """``model`` with LoRA adapters (a ``peft`` model; its base frozen, the adapters float32 and trainable).

    Raises :class:`ConfigError` naming ``student.lora.target_modules`` when a name matches no linear layer of the
    model (listing the ones it has) or matches the output layer or the embeddings."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(settings, LoraSettings):
        settings = LoraSettings(**settings)
    protected = _protected_names(model)
    linear = _linear_names(model) - protected
    if settings.target_modules != "all-linear":
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
        for target in settings.target_modules:
            hits = {n for n in _linear_names(model) | protected if n == target or n.endswith("." + target)}
            if hits & protected:
                raise ConfigError(
                    f"student.lora.target_modules: '{target}' is the output layer or the embeddings, which LoRA "
                    "does not adapt here (the chunked loss reads the output layer directly); adapt the layers' "
                    f"projections instead: {', '.join(leaves)}")
            if not hits:
                raise ConfigError(f"student.lora.target_modules: '{target}' matches no linear layer of this "
                                  f"{type(model).__name__}; its linear layers are named {', '.join(leaves)}")
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
        target_modules=settings.target_modules, task_type="CAUSAL_LM",
        fan_in_fan_out=type(model).__name__.startswith("GPT2"),  # GPT-2's Conv1D stores W transposed
    )
    peft_model = get_peft_model(model, config)
    adapted = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in peft_model.parameters()}.values())
    log.info("LoRA r=%d alpha=%g on %s: %d trainable parameters of %d (%.2f%%)", settings.r, settings.alpha,
             settings.target_modules, adapted, total, 100.0 * adapted / max(1, total))
    return peft_model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward pass (module docstring); non-reentrant, so it works with a frozen
    base (LoRA) and consumes the same dropout randomness as a plain backward."""
    base = model.get_base_model() if is_lora(model) else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(base).__name__} does not support gradient "
                          "checkpointing; turn it off")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.config.use_cache = False  # a KV cache is meaningless while recomputing


def save_lora_student(model: PreTrainedModel, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None,
                      save: str = "both") -> list[Path]:
    """Write a LoRA student: the adapter to ``directory/adapter`` (safetensors, with the base model's path so
    :func:`lmdistill.models.loading.load_causal_lm` rebuilds it), and/or the merged full model to ``directory``
    (loadable anywhere, no ``peft`` needed). ``model`` itself stays a LoRA model. Returns the directories
    written."""
    if not is_lora(model):
        raise TypeError(f"save_lora_student needs a peft model, got {type(model).__name__}")
    directory = Path(directory)
    written = []
    if save in ("adapter", "both"):
        base_path = model.peft_config["default"].base_model_name_or_path
        if not base_path or not Path(base_path).is_dir():
            log.warning("the LoRA adapter's base model '%s' is not a local directory: the adapter alone cannot be "
                        "reloaded offline; keep the merged model (student.lora.save: both)", base_path)
        target = directory / ADAPTER_DIR
        model.save_pretrained(target, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(target)
        written.append(target)
    if save in ("merged", "both"):
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        written.append(directory)
    return written


def lora_state(model: PreTrainedModel) -> dict:
    """The adapters' tensors only (what a checkpoint of a LoRA student needs: the base never changes), keyed as
    :func:`load_lora_state` expects; contiguous, safetensors-ready."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_lora_state(model: PreTrainedModel, state: dict) -> None:
    """Put adapter tensors saved by :func:`lora_state` back into ``model``; every adapter tensor of the model must
    be there (a checkpoint of another rank or target set is refused)."""
    from peft import set_peft_model_state_dict

    expected = set(lora_state(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(f"the LoRA checkpoint does not fit this student's adapters: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]} (same student.lora.r and target_modules as the run it resumes?)")
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"the LoRA checkpoint has tensors this student lacks: {result.unexpected_keys[:3]}")


def is_adapter_dir(path: Path) -> bool:
    """A directory holding a ``peft`` adapter and no full model weights."""
    return (path / ADAPTER_CONFIG).is_file() and not any(path.glob("model*.safetensors"))


def load_adapter_model(path: str | Path, *, dtype: str = "float32") -> PreTrainedModel:
    """The full model an adapter directory describes: its base (``base_model_name_or_path``, a local directory)
    with the adapter merged in. Safetensors only."""
    from peft import PeftModel

    from lmdistill.models.loading import load_causal_lm

    path = Path(path)
    try:
        base_path = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path / ADAPTER_CONFIG}: cannot read base_model_name_or_path ({exc})") from None
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"LoRA adapter '{path}' has no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    if not base_path or not Path(base_path).expanduser().is_dir():
        raise ConfigError(f"LoRA adapter '{path}' names the base model '{base_path}', which is not a local "
                          f"directory; set base_model_name_or_path in {ADAPTER_CONFIG} to the base model's directory, "
                          "or load the merged model saved next to the adapter")
    base = load_causal_lm(base_path, dtype=dtype)
    return PeftModel.from_pretrained(base, str(path), is_trainable=False).merge_and_unload()
