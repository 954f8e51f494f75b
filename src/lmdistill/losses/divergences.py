"""Token-level divergences between the teacher's distribution p and the student's q, and label cross-entropy.

Each objective has two equivalent implementations:

* :meth:`divergence` / :meth:`per_token`: plain differentiable PyTorch on full ``[N, V]`` tensors (the
  reference path, used with autograd);
* :meth:`eager_chunk`: the loss and its analytic gradient w.r.t. the student logits for one chunk of rows,
  written into reusable buffers (the fast path of :func:`lmdistill.losses.fused_linear_distill`; with a dense
  float32 teacher on CPU, :meth:`Divergence.chunk_value_and_grad` runs the same formulas compiled, see
  :mod:`lmdistill.losses.fused`). The formulas are derived in each docstring; tests check them against autograd.

For a loss L(q) with q = softmax(z / T), the chain rule through the softmax gives
``dL/dz_j = (1/T) q_j (dL/dq_j - sum_k q_k dL/dq_k)``; every gradient below is that identity applied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.core import (
    Divergence,
    Objective,
    Workspace,
    compute_dtype,
    fast_exp,
    finish_chunk,
    finite_products,
    flatten_inputs,
    kl_from_log_probs,
    log_mix,
    sparse_forward_kl_chunk,
    student_log_probs,
)
from lmdistill.losses.signals import EXACT_KINDS, SAMPLED, Teacher, is_sparse

__all__ = [
    "ForwardKL",
    "ReverseKL",
    "GeneralizedJSD",
    "TotalVariation",
    "SkewKL",
    "SkewReverseKL",
    "CrossEntropy",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "total_variation",
    "skew_kl",
    "skew_reverse_kl",
    "cross_entropy",
]

def _rowdot(a: Tensor, b: Tensor, tmp: Tensor) -> tuple[Tensor, Tensor | None]:
    """Row-wise sum of a * b with 0 * inf = 0, using ``tmp`` as scratch.

    Returns the sums and the boolean mask of rows that contained such a 0 * inf product (``None`` when
    none did: the common case costs no extra pass). Those rows involve a zero probability against a
    -inf log-probability (e.g. masked vocabulary padding) and are recomputed with the NaNs zeroed.
    """
    torch.mul(a, b, out=tmp)
    out = tmp.sum(-1)
    bad = torch.isnan(out)
    if not bool(bad.any()):
        return out, None
    out[bad] = finite_products(tmp[bad]).sum(-1)
    return out, bad


def _fix_rows(t: Tensor, *masks: Tensor | None) -> Tensor:
    """Zero the NaNs (0 * inf) of the rows flagged by :func:`_rowdot`."""
    bad = None
    for mask in masks:
        if mask is not None:
            bad = mask if bad is None else bad | mask
    if bad is not None:
        t[bad] = finite_products(t[bad])
    return t


def _log_mixture(ws: Workspace, tl: Tensor, s: Tensor, log_w_teacher: float, log_w_student: float) -> tuple[Tensor, Tensor, Tensor]:
    """``log(w_t p + w_s q)`` from the chunk's log-probabilities, in the workspace buffer ``m``; returns
    ``(m, tmp, grad)``, the two other buffers free again for the caller."""
    m, tmp, grad = ws.buf("m"), ws.buf("tmp"), ws.buf("grad")
    torch.add(tl, log_w_teacher, out=tmp)
    torch.add(s, log_w_student, out=grad)
    torch.logaddexp(tmp, grad, out=m)
    return m, tmp, grad


def _scale(t: Tensor, factor: float) -> Tensor:
    return t if factor == 1.0 else t.mul_(factor)


def _check_fraction(name: str, value: float, *, allow_one: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    upper_ok = value <= 1 if allow_one else value < 1
    if not (value >= 0 and upper_ok):
        raise ValueError(f"{name} must be in [0, 1{']' if allow_one else ')'}, got {value!r}")
    return float(value)


class ForwardKL(Divergence):
    """Forward KL ``KL(p || q) = sum_v p_v (log p_v - log q_v)``.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv 1503.02531. The T^2
    factor the paper applies to soft-target gradients is the named flag ``scale_by_t2`` (off by default).
    Gradient: ``dL/dz = (q - p) / T``.
    """

    name = "forward_kl"
    fused_kind = "forward_kl"
    # linear in the teacher's probabilities: a sampled teacher gives an unbiased loss and gradient
    accepted_signals = EXACT_KINDS | {SAMPLED}

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return kl_from_log_probs(t_logp, s_logp)

    def eager_chunk(self, z, teacher, labels, ws, context=None):
        T = self.temperature
        if is_sparse(teacher):
            # a cache's top-k with the student-shaped tail: no dense teacher needed
            sparse = sparse_forward_kl_chunk(z, teacher, T, ws)
            if sparse is not None:
                return finish_chunk(*sparse, labels, self.loss_scale)
        s = ws.student_logp(z, T)
        tl = ws.teacher_logp(teacher, T)
        p = ws.teacher_p(T)
        tmp = ws.buf("tmp")
        torch.sub(tl, s, out=tmp)
        loss, _ = _rowdot(tmp, p, tmp)
        grad = fast_exp(s, tmp)  # the scratch is free again: reuse it for the gradient
        _scale(grad.sub_(p), 1.0 / T)
        return finish_chunk(loss, grad, labels, self.loss_scale)


class ReverseKL(Divergence):
    """Reverse KL ``KL(q || p)``: the mode-seeking direction MiniLLM distils with.

    Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", arXiv 2306.08543 (the token-level
    reverse KL; MiniLLM's sequence-level policy gradient is the `minillm` regime and objective, losses/minillm.py).
    Gradient: ``dL/dz_j = (1/T) q_j (log q_j - log p_j - L)``.
    """

    name = "reverse_kl"
    fused_kind = "reverse_kl"

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return kl_from_log_probs(s_logp, t_logp)

    def eager_chunk(self, z, teacher, labels, ws, context=None):
        T = self.temperature
        s = ws.student_logp(z, T)
        tl = ws.teacher_logp(teacher, T)
        q = ws.student_q(T)
        d = ws.buf("d")
        torch.sub(s, tl, out=d)
        tmp = ws.buf("tmp")
        loss, bad = _rowdot(d, q, tmp)
        grad = torch.sub(d, loss.unsqueeze(-1), out=tmp)
        _scale(_fix_rows(grad.mul_(q), bad), 1.0 / T)
        return finish_chunk(loss, grad, labels, self.loss_scale)


class GeneralizedJSD(Divergence):
    """Generalized Jensen-Shannon divergence of GKD.

    Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (GKD), arXiv 2306.13649: with ``m = beta p + (1 - beta) q``,
    ``JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m)``.

    As beta -> 0 the divergence vanishes like ``beta * KL(p || q)`` and as beta -> 1 like
    ``(1 - beta) * KL(q || p)``; following GKD's convention (and TRL's implementation of it), the endpoints
    are special-cased: ``beta = 0`` *is* forward KL and ``beta = 1`` *is* reverse KL.

    Gradient (0 < beta < 1): dL/dq_j = (1 - beta) log(q_j / m_j) (the other terms cancel), hence
    ``dL/dz_j = ((1 - beta)/T) q_j (log(q_j/m_j) - KL(q || m))``.
    """

    name = "jsd"

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, scale_by_t2: bool = False) -> None:
        super().__init__(temperature, scale_by_t2)
        self.beta = _check_fraction("beta", beta)

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        beta = self.beta
        if beta == 0.0:
            return kl_from_log_probs(t_logp, s_logp)
        if beta == 1.0:
            return kl_from_log_probs(s_logp, t_logp)
        m_logp = log_mix(t_logp, s_logp, beta)
        return beta * kl_from_log_probs(t_logp, m_logp) + (1 - beta) * kl_from_log_probs(s_logp, m_logp)

    def fused_spec(self) -> tuple[str, tuple[float, ...]] | None:
        if self.beta in (0.0, 1.0):
            return ("forward_kl" if self.beta == 0.0 else "reverse_kl", ())
        return ("jsd", (self.beta,))

    def eager_chunk(self, z, teacher, labels, ws, context=None):
        beta, T = self.beta, self.temperature
        if beta == 0.0:
            return ForwardKL.eager_chunk(self, z, teacher, labels, ws)
        if beta == 1.0:
            return ReverseKL.eager_chunk(self, z, teacher, labels, ws)
        s = ws.student_logp(z, T)
        tl = ws.teacher_logp(teacher, T)
        m, tmp, grad = _log_mixture(ws, tl, s, math.log(beta), math.log1p(-beta))
        # KL(p || m)
        p = ws.teacher_p(T)
        torch.sub(tl, m, out=tmp)
        kl_p, _ = _rowdot(tmp, p, tmp)
        # KL(q || m), keeping log(q/m) for the gradient
        q = ws.student_q(T)
        log_qm = m.sub_(s).neg_()  # m is not needed any more: reuse it for s - m
        kl_q, bad = _rowdot(log_qm, q, tmp)
        loss = beta * kl_p + (1 - beta) * kl_q
        torch.sub(log_qm, kl_q.unsqueeze(-1), out=grad)
        _scale(_fix_rows(grad.mul_(q), bad), (1 - beta) / T)
        return finish_chunk(loss, grad, labels, self.loss_scale)

    def config(self) -> dict:
        return {**super().config(), "beta": self.beta}


class TotalVariation(Divergence):
    """Total variation distance ``TVD(p, q) = 1/2 sum_v |p_v - q_v|`` (a common bounded baseline).

    Used as a distillation divergence e.g. by Wen et al., "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation", arXiv 2307.15190. Subgradient with sign(0) = 0:
    ``dL/dz_j = (1/(2T)) q_j (s_j - sum_k q_k s_k)``, ``s = sign(q - p)``.
    """

    name = "tvd"
    fused_kind = "tvd"

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return 0.5 * (s_logp.exp() - t_logp.exp()).abs().sum(-1)

    def eager_chunk(self, z, teacher, labels, ws, context=None):
        T = self.temperature
        ws.student_logp(z, T)  # cached: student_q and teacher_p exponentiate these log-probabilities
        ws.teacher_logp(teacher, T)
        q, p, diff, grad = ws.student_q(T), ws.teacher_p(T), ws.buf("d"), ws.buf("tmp")
        torch.sub(q, p, out=diff)
        loss = torch.abs(diff, out=grad).sum(-1).mul_(0.5)  # abs + sum: cheaper than vector_norm on CPU
        q_sign = torch.sign(diff, out=diff).mul_(q)
        mean_sign = q_sign.sum(-1)
        # q (s - sum_k q_k s_k)
        torch.addcmul(q_sign, q, mean_sign.unsqueeze(-1), value=-1.0, out=grad)
        _scale(grad, 0.5 / T)
        return finish_chunk(loss, grad, labels, self.loss_scale)


class SkewKL(Divergence):
    """Skew KL ``KL(p || alpha p + (1 - alpha) q)`` of DistiLLM (alpha = 0 is forward KL).

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", arXiv 2402.03898;
    default alpha = 0.1 as in the paper. The gradient flows through the mixture m. With r = p / m,
    ``dL/dz_j = ((1 - alpha)/T) q_j (sum_k q_k r_k - r_j)``.
    """

    name = "skew_kl"

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, scale_by_t2: bool = False) -> None:
        super().__init__(temperature, scale_by_t2)
        self.alpha = _check_fraction("alpha", alpha, allow_one=False)

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return kl_from_log_probs(t_logp, log_mix(t_logp, s_logp, self.alpha))

    def fused_spec(self) -> tuple[str, tuple[float, ...]] | None:
        return ("skew_kl", (self.alpha,)) if self.alpha > 0 else ("forward_kl", ())

    def eager_chunk(self, z, teacher, labels, ws, context=None):
        alpha, T = self.alpha, self.temperature
        if alpha == 0.0:
            return ForwardKL.eager_chunk(self, z, teacher, labels, ws)
        s = ws.student_logp(z, T)
        tl = ws.teacher_logp(teacher, T)
        m, tmp, grad = _log_mixture(ws, tl, s, math.log(alpha), math.log1p(-alpha))
        p = ws.teacher_p(T)
        log_r = m.sub_(tl).neg_()  # log(p/m), reusing m
        loss, bad = _rowdot(log_r, p, tmp)
        ratio = _fix_rows(fast_exp(log_r, log_r), bad)  # r = p/m (0 where p = 0)
        q = ws.student_q(T)
        mean_r, _ = _rowdot(q, ratio, tmp)
        torch.sub(mean_r.unsqueeze(-1), ratio, out=grad)
        _scale(grad.mul_(q), (1 - alpha) / T)
        return finish_chunk(loss, grad, labels, self.loss_scale)

    def config(self) -> dict:
        return {**super().config(), "alpha": self.alpha}


class SkewReverseKL(Divergence):
    """Skew reverse KL ``KL(q || (1 - alpha) p + alpha q)`` of DistiLLM (alpha = 0 is reverse KL).

    Ko et al., "DistiLLM", arXiv 2402.03898; default alpha = 0.1. The gradient flows through m. With
    d = log(q/m), ``dL/dz_j = (1/T) q_j (d_j - alpha q_j/m_j - L + alpha sum_k q_k^2/m_k)``.
    """

    name = "skew_reverse_kl"

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, scale_by_t2: bool = False) -> None:
        super().__init__(temperature, scale_by_t2)
        self.alpha = _check_fraction("alpha", alpha, allow_one=False)

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return kl_from_log_probs(s_logp, log_mix(t_logp, s_logp, 1.0 - self.alpha))

    def fused_spec(self) -> tuple[str, tuple[float, ...]] | None:
        return ("skew_reverse_kl", (self.alpha,)) if self.alpha > 0 else ("reverse_kl", ())

    def eager_chunk(self, z, teacher, labels, ws, context=None):
        alpha, T = self.alpha, self.temperature
        if alpha == 0.0:
            return ReverseKL.eager_chunk(self, z, teacher, labels, ws)
        s = ws.student_logp(z, T)
        tl = ws.teacher_logp(teacher, T)
        m, tmp, grad = _log_mixture(ws, tl, s, math.log1p(-alpha), math.log(alpha))
        q = ws.student_q(T)
        d = m.sub_(s).neg_()  # log(q/m)
        loss, bad = _rowdot(d, q, tmp)
        ratio = _fix_rows(fast_exp(d, ws.buf("ratio")), bad)  # q/m
        mean_qr, _ = _rowdot(q, ratio, tmp)
        # grad = q * (d - alpha * q/m - L + alpha * sum q^2/m)
        torch.add(d, ratio, alpha=-alpha, out=grad)
        grad.add_((alpha * mean_qr - loss).unsqueeze(-1))
        _scale(_fix_rows(grad.mul_(q), bad), 1.0 / T)
        return finish_chunk(loss, grad, labels, self.loss_scale)

    def config(self) -> dict:
        return {**super().config(), "alpha": self.alpha}


class CrossEntropy(Objective):
    """Label cross-entropy ``-log softmax(z)_y`` (temperature 1; needs no teacher).

    Gradient: ``softmax(z) - onehot(y)``. Ignored positions (label -100) give 0.
    """

    name = "cross_entropy"
    requires_teacher = False

    def per_token(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *, context: Any = None) -> Tensor:
        if labels is None:
            raise ValueError("cross_entropy needs labels")
        logits, _, flat_labels, lead = flatten_inputs(student_logits, None, labels)
        dtype = compute_dtype(logits)
        s_logp = student_log_probs(logits, 1.0, dtype)
        valid = flat_labels != IGNORE_INDEX
        gold = s_logp.gather(-1, torch.where(valid, flat_labels, 0).unsqueeze(-1)).squeeze(-1)
        loss = torch.where(valid, -gold, torch.zeros((), dtype=dtype, device=gold.device))
        return loss.reshape(lead)

    def chunk_value_and_grad(self, z, teacher, labels, ws, context=None):
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, 0).unsqueeze(-1)
        grad = ws.buf("tmp")
        # the log-softmax goes straight into the gradient buffer and is not cached in the workspace: the
        # label loss reads it once, and one [chunk, V] buffer less keeps the chunked path's peak memory near
        # 1/10 of the plain path's (a mixture that already cached it, e.g. with forward KL, reuses it)
        cached = ws.cached_student_logp(1.0)
        s = cached if cached is not None else torch.log_softmax(z, -1, out=grad)
        loss = -s.gather(-1, safe).squeeze(-1)
        grad = fast_exp(s, grad)
        grad.scatter_add_(-1, safe, torch.full_like(loss, -1.0).unsqueeze(-1))
        return finish_chunk(loss, grad, labels, 1.0)


def forward_kl(student_logits: Tensor, teacher: Teacher, labels: Tensor | None = None, *, temperature: float = 1.0, scale_by_t2: bool = False) -> Tensor:
    """Per-token forward KL (see :class:`ForwardKL`)."""
    return ForwardKL(temperature, scale_by_t2).per_token(student_logits, teacher, labels)


def reverse_kl(student_logits: Tensor, teacher: Teacher, labels: Tensor | None = None, *, temperature: float = 1.0, scale_by_t2: bool = False) -> Tensor:
    """Per-token reverse KL (see :class:`ReverseKL`)."""
    return ReverseKL(temperature, scale_by_t2).per_token(student_logits, teacher, labels)


def generalized_jsd(student_logits: Tensor, teacher: Teacher, labels: Tensor | None = None, *, beta: float = 0.5, temperature: float = 1.0, scale_by_t2: bool = False) -> Tensor:
    """Per-token generalized JSD (see :class:`GeneralizedJSD`)."""
    return GeneralizedJSD(beta, temperature, scale_by_t2).per_token(student_logits, teacher, labels)


def total_variation(student_logits: Tensor, teacher: Teacher, labels: Tensor | None = None, *, temperature: float = 1.0, scale_by_t2: bool = False) -> Tensor:
    """Per-token total variation distance (see :class:`TotalVariation`)."""
    return TotalVariation(temperature, scale_by_t2).per_token(student_logits, teacher, labels)


def skew_kl(student_logits: Tensor, teacher: Teacher, labels: Tensor | None = None, *, alpha: float = 0.1, temperature: float = 1.0, scale_by_t2: bool = False) -> Tensor:
    """Per-token skew KL (see :class:`SkewKL`)."""
    return SkewKL(alpha, temperature, scale_by_t2).per_token(student_logits, teacher, labels)


def skew_reverse_kl(student_logits: Tensor, teacher: Teacher, labels: Tensor | None = None, *, alpha: float = 0.1, temperature: float = 1.0, scale_by_t2: bool = False) -> Tensor:
    """Per-token skew reverse KL (see :class:`SkewReverseKL`)."""
    return SkewReverseKL(alpha, temperature, scale_by_t2).per_token(student_logits, teacher, labels)


def cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token label cross-entropy (see :class:`CrossEntropy`)."""
    return CrossEntropy().per_token(student_logits, None, labels)
