"""Shared test inputs and the table of objectives with their independent references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lmdistill.losses import (
    TAID,
    CrossEntropy,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    TotalVariation,
)
from tests.losses import reference as ref


def make_inputs(shape: tuple[int, ...], *, scale: float = 3.0, seed: int = 0, ignore_every: int = 0,
                dtype: torch.dtype = torch.float64):
    """Random student/teacher logits ``shape + (V,)``-like: ``shape[:-1]`` rows, ``shape[-1]`` vocabulary."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if ignore_every:
        flat = labels.reshape(-1)
        flat[::ignore_every] = -100
    return z.to(dtype), zt.to(dtype), labels


def variant_inputs(shape: tuple[int, int], variant: str, *, seed: int, ignore_every: int, pad: int):
    """``make_inputs`` for the kernel tests' variants: "peaked" (logits x10), "masked" (every
    ``ignore_every``-th label ignored), "padded_vocab" (the last ``pad`` tokens at -inf for both, labels
    below them); any other variant is plain."""
    z, zt, labels = make_inputs(shape, seed=seed, scale=30.0 if variant == "peaked" else 3.0,
                                ignore_every=ignore_every if variant == "masked" else 0)
    if variant == "padded_vocab":
        z[:, -pad:] = -float("inf")
        zt[:, -pad:] = -float("inf")
        labels = labels.clamp(max=shape[-1] - pad - 1)
    return z, zt, labels


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[float], object]          # temperature -> objective
    reference: Callable[..., np.ndarray]      # (z, zt, labels, T) -> per-row values
    needs_teacher: bool = True
    detached_target: bool = False             # TAID: the loss value depends on a stop-gradient copy of z


def _taid(t: float, form: str = "kl") -> Callable[[float], TAID]:
    def build(T: float) -> TAID:
        objective = TAID(temperature=T, form=form)
        objective.t = t
        return objective

    return build


CASES = [
    Case("forward_kl", lambda T: ForwardKL(T), lambda z, zt, l, T: ref.forward_kl(z, zt, l, T)),
    Case("forward_kl_t2", lambda T: ForwardKL(T, scale_by_t2=True), lambda z, zt, l, T: ref.forward_kl(z, zt, l, T, t2=True)),
    Case("reverse_kl", lambda T: ReverseKL(T), lambda z, zt, l, T: ref.reverse_kl(z, zt, l, T)),
    *[
        Case(f"jsd_{b}", (lambda b: lambda T: GeneralizedJSD(b, T))(b), (lambda b: lambda z, zt, l, T: ref.jsd(z, zt, b, l, T))(b))
        for b in (0.0, 0.1, 0.5, 0.9, 1.0)
    ],
    Case("tvd", lambda T: TotalVariation(T), lambda z, zt, l, T: ref.tvd(z, zt, l, T)),
    *[
        Case(f"skew_kl_{a}", (lambda a: lambda T: SkewKL(a, T))(a), (lambda a: lambda z, zt, l, T: ref.skew_kl(z, zt, a, l, T))(a))
        for a in (0.0, 0.1, 0.5)
    ],
    *[
        Case(f"skew_reverse_kl_{a}", (lambda a: lambda T: SkewReverseKL(a, T))(a),
             (lambda a: lambda z, zt, l, T: ref.skew_reverse_kl(z, zt, a, l, T))(a))
        for a in (0.0, 0.1, 0.5)
    ],
    *[
        Case(f"taid_{t}", _taid(t), (lambda t: lambda z, zt, l, T: ref.taid(z, zt, t, l, T))(t), detached_target=t < 1)
        for t in (0.0, 0.4, 0.75, 1.0)
    ],
    Case("taid_ce", _taid(0.6, "ce"), lambda z, zt, l, T: ref.taid(z, zt, 0.6, l, T, form="ce"), detached_target=True),
    Case("cross_entropy", lambda T: CrossEntropy(), lambda z, zt, l, T: ref.cross_entropy(z, l), needs_teacher=False),
]

CASE_IDS = [c.id for c in CASES]


def to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().reshape(-1, t.shape[-1]).numpy()


# ------------------------------------------------------------------ cross-tokenizer inputs (tokenizers: conftest)
def blocks_of(tok, verses: list[str], length: int, count: int, start: int = 0) -> torch.Tensor:
    """``count`` packed blocks of ``length + 1`` tokens of the verses (one eos after each)."""
    ids: list[int] = []
    for text in verses[start:]:
        ids += tok(text + "\n", add_special_tokens=False).input_ids + [tok.eos_token_id]
        if len(ids) >= (length + 1) * count:
            break
    return torch.tensor(ids[: (length + 1) * count]).reshape(count, length + 1)


def softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def aligned_inputs(batcher, blocks: torch.Tensor, teacher_vocab: int, seed: int):
    """The batcher's teacher inputs for student ``blocks`` and random float64 logits of both sides."""
    inputs = batcher(blocks)
    g = torch.Generator().manual_seed(seed)
    B, L = blocks.shape[0], blocks.shape[1] - 1
    zs = torch.randn(B * L, len(batcher.student_tokenizer), generator=g, dtype=torch.float64) * 2
    zt = torch.randn(B, inputs.teacher_input_ids.shape[1], teacher_vocab, generator=g, dtype=torch.float64) * 2
    return inputs, zs, zt
