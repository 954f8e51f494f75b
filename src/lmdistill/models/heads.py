"""How a causal LM's logits follow from its final hidden state and its output layer.

The chunked loss path rebuilds logits as ``hidden @ W.T (+ b)`` chunk by chunk, outside the model's forward. Most
models do nothing more; some post-process the product with a known element-wise transform, which the chunked path
applies per chunk too (:class:`LogitTransform`):

* final-logit soft-capping, ``cap * tanh(z / cap)`` (Gemma 2, "Gemma 2: Improving Open Language Models at a
  Practical Size", arXiv:2408.00118; Gemma 3, Gemma 4, VaultGemma, nanochat): ``final_logit_softcapping``;
* a constant scale: Cohere's ``logit_scale`` (a product), Granite's ``logits_scaling`` (a quotient; HyperCLOVA X
  multiplies by its field of the same name), ``output_multiplier`` (a product, before any soft-cap).

Any other post-processing field keeps the plain path, and every model is checked once on a probe batch: its
logits must equal the transform of the rebuilt product (:func:`linear_head_mismatch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from lmdistill.models.modes import eval_mode

__all__ = ["LogitTransform", "logit_transform", "logit_postprocessing", "linear_head_mismatch", "LOGIT_POSTPROCESSING"]

# config fields of transformers models whose logits are not a plain product with the output layer
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping",
                        "output_multiplier_scale", "mup_width_multiplier", "output_multiplier")
# model types whose ``logits_scaling`` multiplies the logits (Granite's divides them)
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


@dataclass(frozen=True)
class LogitTransform:
    """``logits = softcap * tanh(scale * z / softcap)`` of the plain product ``z = hidden @ W.T (+ b)``
    (``softcap=None``: no capping; ``scale=1``: no scaling). The scale comes first, as in every model that has
    both."""

    softcap: float | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"LogitTransform: softcap must be a positive finite number, got {self.softcap}")
        if not (math.isfinite(self.scale) and self.scale != 0):
            raise ValueError(f"LogitTransform: scale must be a finite nonzero number, got {self.scale}")

    @property
    def is_identity(self) -> bool:
        return self.softcap is None and self.scale == 1.0

    def apply(self, z: Tensor) -> Tensor:
        """The transformed logits (a new tensor; ``z`` itself when the transform is the identity)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def describe(self) -> str:
        parts = ([] if self.scale == 1.0 else [f"scaled by {self.scale:g}"]) + (
            [] if self.softcap is None else [f"soft-capped at {self.softcap:g}"])
        return " and ".join(parts) or "plain"


def _number(value: Any) -> float | None:
    """A config value as a float; ``None`` for unset / boolean / non-numeric values."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def logit_transform(model_config: Any) -> LogitTransform | None:
    """The known transform a model applies to its output layer's product (identity when it applies none), or
    ``None`` when its config sets a post-processing field whose transform is not known here (keep the plain
    path). Nested text configs (multimodal wrappers) are read through ``get_text_config``."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    model_type = str(getattr(config, "model_type", "") or getattr(model_config, "model_type", ""))
    scale = 1.0
    softcap = _number(getattr(config, "final_logit_softcapping", None))
    logit_scale = _number(getattr(config, "logit_scale", None))
    if logit_scale is not None:
        scale *= logit_scale  # Cohere: logits * logit_scale
    logits_scaling = _number(getattr(config, "logits_scaling", None))
    if logits_scaling is not None and logits_scaling != 1.0:
        multiply = model_type.startswith(_MULTIPLYING_LOGITS_SCALING)
        scale = scale * logits_scaling if multiply else scale / logits_scaling
    output_multiplier = _number(getattr(config, "output_multiplier", None))
    if output_multiplier is not None:
        scale *= output_multiplier
    for name in ("logit_softcapping", "output_multiplier_scale", "mup_width_multiplier"):
        if getattr(config, name, None) not in (None, 1, 1.0, False):
            return None
    if softcap is not None and softcap <= 0:
        return None
    return LogitTransform(softcap=softcap, scale=scale)


def logit_postprocessing(model_config: Any) -> str | None:
    """The config field that post-processes this model's logits, as a phrase; ``None`` when there is none."""
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for name in LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0, False):
            return f"its config sets {name}={value}"
    return None


def _close_to_model(rebuilt: Tensor, logits: Tensor, transform: LogitTransform) -> bool:
    """Whether the model's ``logits`` are ``transform`` of the ``rebuilt`` product: bit-for-bit up to float32
    rounding for a plain head; a transformed head is compared with the transform computed in float64, within a
    few units in the last place of the model's dtype (the model rounds after each step of the transform)."""
    if rebuilt.shape != logits.shape:
        return False
    if transform.is_identity:
        return torch.allclose(rebuilt.float(), logits.float(), rtol=1e-6, atol=1e-6)
    expected = transform.apply(rebuilt.double())
    eps = torch.finfo(logits.dtype).eps if logits.is_floating_point() else 1e-6
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return torch.allclose(expected, logits.double(), rtol=max(1e-6, 4 * eps), atol=max(1e-6, 4 * eps * scale))


@torch.no_grad()
def linear_head_mismatch(
    model: torch.nn.Module,
    probe_ids: torch.Tensor,
    hidden_of: Callable[[torch.nn.Module], torch.Tensor],
    *,
    allow_transform: bool = False,
) -> str | None:
    """Why ``model``'s logits on ``probe_ids`` are not ``hidden_of(model)`` times its output layer (``None``:
    they are). Refused by config field first, then by a comparison on the probe (same product on the same
    inputs: anything beyond float rounding is post-processing). Runs in eval mode under a forked RNG, so it
    consumes no dropout randomness (exact resume).

    ``allow_transform``: the caller applies :func:`logit_transform` per chunk (``fused_linear_distill``'s
    ``student_softcap``/``student_scale``, :class:`~lmdistill.losses.signals.HiddenStates`' ``softcap``/``scale``),
    so a known soft-cap or scale is accepted, and the probe checks the logits are that transform of the product.
    """
    transform = logit_transform(model.config) if allow_transform else None
    if allow_transform and transform is None:
        why = f"{logit_postprocessing(model.config)}, a logit post-processing this project does not rebuild"
    elif allow_transform:
        why = None
    else:
        why = logit_postprocessing(model.config)
        transform = LogitTransform()
    head = model.get_output_embeddings()
    if why is None and head is None:
        why = "it has no output embedding layer"
    if why is not None:
        return why
    with eval_mode(model, fork_rng=True):
        logits = model(input_ids=probe_ids).logits
        rebuilt = torch.nn.functional.linear(hidden_of(model), head.weight, getattr(head, "bias", None))
    if not _close_to_model(rebuilt, logits, transform):
        if transform.is_identity:
            return "its logits are not its final hidden state times its output layer"
        return f"its logits are not its final hidden state times its output layer, {transform.describe()}"
    return None
