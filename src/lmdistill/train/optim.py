"""The optimizer and learning-rate schedules every training loop uses (the LM trainer and the embedding loops).

AdamW with weight decay on matrices only (biases, norms and other vectors are not decayed), and a warm-up
followed by a decay: cosine to a floor (language models) or linear to zero (the embedding methods' usual
recipe, as sentence-transformers trains them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["adamw", "cosine_schedule", "linear_schedule"]


def adamw(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
          no_decay: Iterable[nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW over the trainable ``params``: weight decay on those with two or more dimensions, none on the others
    or on ``no_decay`` (e.g. an objective's own small network)."""
    trainable = [p for p in params if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    rest = [p for p in trainable if p.ndim < 2] + list(no_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def cosine_schedule(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor per step: linear warm-up over ``warmup`` steps (reaching 1 at step ``warmup - 1``), then cosine
    decay to ``min_ratio`` of the peak at step ``total``."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up reaching 1 at step ``warmup``, then linear decay to 0 at step ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        remaining = max(1, total - warmup)
        return max(0.0, 1.0 - (step - warmup) / remaining)

    return factor
