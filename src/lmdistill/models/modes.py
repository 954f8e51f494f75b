"""Switching a model's mode for a while and back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, *, fork_rng: bool = False) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside the block, back in its previous mode after it (also on an error).

    ``fork_rng``: also restore the global CPU random state, so work done inside (a probe, a lookahead) consumes
    no randomness the training run would otherwise have used (exact resume)."""
    was_training = model.training
    rng = torch.random.fork_rng(devices=[]) if fork_rng else contextlib.nullcontext()
    with rng:
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)
