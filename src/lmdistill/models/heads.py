"""Whether a causal LM's logits are a plain product of its final hidden state and its output layer.

The chunked loss path rebuilds logits as ``hidden @ W.T (+ b)`` chunk by chunk, outside the model's forward, so
it is only right for models that do nothing more (no soft-capping, no logit scaling).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lmdistill.models.modes import eval_mode

# config fields of transformers models whose logits are not a plain product with the output layer
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping",
                        "output_multiplier_scale", "mup_width_multiplier")


def logit_postprocessing(model_config: Any) -> str | None:
    """The config field that post-processes this model's logits, as a phrase; ``None`` when there is none."""
    for name in LOGIT_POSTPROCESSING:
        value = getattr(model_config, name, None)
        if value not in (None, 1, 1.0, False):
            return f"its config sets {name}={value}"
    return None


@torch.no_grad()
def linear_head_mismatch(
    model: torch.nn.Module, probe_ids: torch.Tensor, hidden_of: Callable[[torch.nn.Module], torch.Tensor]
) -> str | None:
    """Why ``model``'s logits on ``probe_ids`` are not ``hidden_of(model)`` times its output layer (``None``:
    they are). Refused by config field first, then by a bit-exact comparison on the probe (same product on the
    same inputs: anything beyond float rounding is post-processing). Runs in eval mode under a forked RNG, so
    it consumes no dropout randomness (exact resume)."""
    why = logit_postprocessing(model.config)
    head = model.get_output_embeddings()
    if why is None and head is None:
        why = "it has no output embedding layer"
    if why is not None:
        return why
    with eval_mode(model, fork_rng=True):
        logits = model(input_ids=probe_ids).logits
        rebuilt = torch.nn.functional.linear(hidden_of(model), head.weight, getattr(head, "bias", None))
    if rebuilt.shape != logits.shape or not torch.allclose(rebuilt.float(), logits.float(), rtol=1e-6, atol=1e-6):
        return "its logits are not its final hidden state times its output layer"
    return None
