"""ATKD: adaptive teaching by splitting tokens into easy and hard ones by the teacher's uncertainty."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.core import (
    Objective,
    compute_dtype,
    fast_exp,
    finish_chunk,
    finite_products,
    flatten_inputs,
    kl_from_log_probs,
    student_log_probs,
)
from lmdistill.losses.signals import (
    Teacher,
    signal_values,
    teacher_log_probs,
)
from lmdistill.losses.fused import fused_atkd_grad, fused_atkd_rows, fused_gold_log_prob

__all__ = ["ATKD", "ATKDSplit", "decoupled_kd_parts"]


@dataclass(frozen=True)
class ATKDSplit:
    """The easy/hard split of the valid tokens of one call (the batch context of :class:`ATKD`)."""

    hard: Tensor  # [N] bool, True for hard valid tokens
    n_valid: int
    n_hard: int

    @property
    def n_easy(self) -> int:
        return self.n_valid - self.n_hard

    def rows(self, start: int, stop: int) -> "ATKDSplit":
        return ATKDSplit(self.hard[start:stop], self.n_valid, self.n_hard)


def decoupled_kd_parts(s_logp: Tensor, t_logp: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Target and non-target parts of forward KL for each row (labels must be valid ids).

    Returns ``(tkd, dkd, uncertainty)`` with
    ``tkd = KL([p_y, 1 - p_y] || [q_y, 1 - q_y])`` (binary KL on the gold token),
    ``dkd = KL(p_hat || q_hat)`` between the distributions renormalised over the non-gold tokens, and
    ``uncertainty = 1 - p_y``. They satisfy ``KL(p || q) = tkd + (1 - p_y) * dkd``. Non-target
    quantities come from log-softmax with the gold entry masked, never from ``log(1 - p_y)``.
    """
    gold = torch.nn.functional.one_hot(labels, s_logp.shape[-1]).bool()
    s_nt_all = s_logp.masked_fill(gold, float("-inf"))
    t_nt_all = t_logp.masked_fill(gold, float("-inf"))
    s_log_rest = torch.logsumexp(s_nt_all, dim=-1)  # log(1 - q_y)
    t_log_rest = torch.logsumexp(t_nt_all, dim=-1)  # log(1 - p_y)
    idx = labels.unsqueeze(-1)
    s_log_gold = s_logp.gather(-1, idx).squeeze(-1)
    t_log_gold = t_logp.gather(-1, idx).squeeze(-1)
    binary_t = torch.stack([t_log_gold, t_log_rest], dim=-1)
    binary_s = torch.stack([s_log_gold, s_log_rest], dim=-1)
    tkd = kl_from_log_probs(binary_t, binary_s)
    dkd = kl_from_log_probs(torch.log_softmax(t_nt_all, dim=-1), torch.log_softmax(s_nt_all, dim=-1))
    return tkd, dkd, t_log_rest.exp()


class ATKD(Objective):
    """Adaptive teaching KD for autoregressive LMs.

    Zhong et al., "Revisiting Knowledge Distillation for Autoregressive Language Models", ACL 2024,
    arXiv 2402.11890 (reference code WHU-ZQH/ATKD). Forward KL decomposes per token into a target part
    (TKD: binary KL over [p_y, 1 - p_y]) and a non-target part (DKD: KL between the non-gold
    distributions renormalised), weighted by the teacher's uncertainty ``u = 1 - p_y``. ATKD splits the valid
    tokens by ``u``: the ``hard_fraction`` most uncertain are hard, the rest easy. Easy tokens are taught only
    the diversity-oriented non-target part; hard tokens both parts, without the ``u`` weight:

        loss = lam * mean_easy(DKD) + (1 - lam) * mean_hard(TKD + DKD)

    with ``lam = easy_weight`` (default 0.2, the reference code's default; the weighting follows the reference
    code, whose group means are taken over each group's valid tokens). Teacher and student are both taken at
    ``temperature``.

    Which tokens are hard: the ``round(hard_fraction * n)`` most uncertain of the ``n`` valid tokens (halves
    rounded up), ties at the threshold counted as hard. With the default 0.5 this is the paper's top 50%: for an
    even ``n`` exactly ``n / 2`` tokens. The reference code marks ``u >= median(u)`` as hard with ``torch.median``
    (the lower middle value), which takes ``n / 2 + 1`` tokens for an even ``n``; for an odd ``n`` both take
    ``(n + 1) / 2``. lmdistill follows the paper.

    Tokens are ranked by the log-odds of ``u``, ``log(1 - p_y) - log p_y``, not by ``u`` itself: in float32 ``u``
    is exactly 0 once ``1 - p_y < 6e-8`` and exactly 1 once ``p_y < 3e-8``, so batches with many near-certain (or
    near-impossible) gold tokens would tie at the threshold and put every token in one group. Both logs are
    exact at their own end (:meth:`uncertainty_log_odds`).

    Per-token form (what :meth:`per_token` returns): an easy token contributes
    ``lam * n_valid / n_easy * DKD`` and a hard token ``(1 - lam) * n_valid / n_hard * (TKD + DKD)``, so the mean
    over the valid tokens equals the loss above. The split and the group sizes are computed over the tokens
    of one call (one micro-batch); the chunked path computes them over all its rows first (see
    :meth:`batch_context`), so chunked and plain agree exactly.
    """

    name = "atkd"
    needs_batch_context = True

    def __init__(self, hard_fraction: float = 0.5, easy_weight: float = 0.2, temperature: float = 1.0) -> None:
        for key, value in (("hard_fraction", hard_fraction), ("easy_weight", easy_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be a number in [0, 1], got {value!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        self.hard_fraction = float(hard_fraction)
        self.easy_weight = float(easy_weight)
        self.temperature = float(temperature)

    def uncertainty_log_odds(self, teacher: Teacher, labels: Tensor, vocab_size: int) -> Tensor:
        """``log(1 - p_y) - log p_y`` per row (0 for ignored rows): increasing in the uncertainty ``1 - p_y``, and
        resolved at both ends in float32, where ``1 - p_y`` itself rounds to 0 or 1.

        ``log p_y`` is exact for unlikely gold tokens; ``log(1 - p_y)`` is ``log1p(-p_y)`` below ``p_y = 1/2`` and
        the log-sum-exp of the non-gold log-probabilities above (exact as ``p_y`` nears 1).
        """
        dtype = compute_dtype(signal_values(teacher))
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, 0)
        gold_index = safe.unsqueeze(-1)
        gold = fused_gold_log_prob(teacher, self.temperature, safe)
        if gold is None:
            t_logp = teacher_log_probs(teacher, self.temperature, vocab_size, dtype)
            gold = t_logp.gather(-1, gold_index).squeeze(-1)
            log_rest = _log_one_minus(t_logp, gold, gold_index)
        else:
            log_rest = torch.log1p(-gold.exp())
            near_one = gold > -math.log(2.0)
            if bool(near_one.any()):  # only the confident rows need their non-gold log-probabilities
                rows = teacher_log_probs(teacher[near_one], self.temperature, vocab_size, dtype)
                log_rest[near_one] = torch.logsumexp(rows.scatter(-1, gold_index[near_one], float("-inf")), dim=-1)
        return torch.where(valid, log_rest - gold, torch.zeros((), dtype=dtype, device=gold.device))

    def uncertainty(self, teacher: Teacher, labels: Tensor, vocab_size: int) -> Tensor:
        """Teacher uncertainty ``1 - p_y`` per row (0 for ignored rows), as ``sigmoid`` of the log-odds: small
        uncertainties keep their relative precision (the split ranks by :meth:`uncertainty_log_odds`)."""
        valid = labels != IGNORE_INDEX
        u = torch.sigmoid(self.uncertainty_log_odds(teacher, labels, vocab_size))
        return torch.where(valid, u, torch.zeros((), dtype=u.dtype, device=u.device))

    def batch_context(
        self, teacher_chunks: Callable[[], Iterable[tuple[int, int, Teacher]]], labels: Tensor, vocab_size: int
    ) -> ATKDSplit:
        with torch.no_grad():
            key = torch.cat(
                [self.uncertainty_log_odds(chunk, labels[a:b], vocab_size) for a, b, chunk in teacher_chunks()]
            )
        valid = labels != IGNORE_INDEX
        n_valid = int(valid.sum())
        if n_valid == 0:
            return ATKDSplit(torch.zeros_like(valid), 0, 0)
        wanted = min(n_valid, max(1, int(math.floor(self.hard_fraction * n_valid + 0.5))))
        if self.hard_fraction == 0.0:
            wanted = 0
        if wanted == 0:
            hard = torch.zeros_like(valid)
        else:
            threshold = torch.topk(key[valid], wanted).values[-1]
            hard = valid & (key >= threshold)
        return ATKDSplit(hard, n_valid, int(hard.sum()))

    def per_token(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *, context: Any = None) -> Tensor:
        if teacher is None or labels is None:
            raise ValueError("objective 'atkd' needs a teacher and labels")
        logits, teacher, flat_labels, lead = flatten_inputs(student_logits, teacher, labels)
        vocab = logits.shape[-1]
        if context is None:
            context = self.batch_context(lambda: [(0, logits.shape[0], teacher)], flat_labels, vocab)
        dtype = compute_dtype(logits, signal_values(teacher))
        valid = flat_labels != IGNORE_INDEX
        safe_labels = torch.where(valid, flat_labels, 0)
        s_logp = student_log_probs(logits, self.temperature, dtype)
        t_logp = teacher_log_probs(teacher, self.temperature, vocab, dtype, s_logp.detach())
        tkd, dkd, _ = decoupled_kd_parts(s_logp, t_logp, safe_labels)
        hard = context.hard.to(valid.device)
        easy = valid & ~hard
        lam = self.easy_weight
        hard_scale = (1.0 - lam) * context.n_valid / context.n_hard if context.n_hard else 0.0
        easy_scale = lam * context.n_valid / context.n_easy if context.n_easy else 0.0
        zero = torch.zeros((), dtype=dtype, device=tkd.device)
        loss = torch.where(hard, hard_scale * (tkd + dkd), torch.where(easy, easy_scale * dkd, zero))
        return loss.reshape(lead)

    def chunk_value_and_grad(self, z, teacher, labels, ws, context=None):
        """Analytic loss and gradient for one chunk (the split comes from ``context``).

        With q_hat, p_hat the non-gold distributions (0 on the gold entry): d TKD / dz = (q_y - p_y)(e_y - q_hat) / T
        and d DKD / dz = (q_hat - p_hat) / T. log(1 - q_y) and log(1 - p_y) come from a
        masked log-sum-exp on rows where the gold probability exceeds 1/2, so they stay exact as it nears 1.
        With a dense float32 teacher on CPU the passes over the chunk are the compiled kernels of
        :mod:`lmdistill.losses.fused` (log-sum-exps of the non-gold entries on every row); the per-row terms
        below are shared by both paths.
        """
        if context is None:
            context = self.batch_context(lambda: [(0, z.shape[0], teacher)], labels, z.shape[-1])
        T = self.temperature
        valid = labels != IGNORE_INDEX
        gold = torch.where(valid, labels, 0).unsqueeze(-1)
        # the compiled kernels of lmdistill.losses.fused where they apply (dense float32 teacher on CPU)
        fused = fused_atkd_rows(z, teacher, T, gold)
        if fused is not None:
            norms, s_y, tl_y, log_rest_s, log_rest_t = fused
        else:
            s, tl = ws.student_logp(z, T), ws.teacher_logp(teacher, T)
            s_y, tl_y = s.gather(-1, gold).squeeze(-1), tl.gather(-1, gold).squeeze(-1)
            log_rest_s = _log_one_minus(s, s_y, gold)
            log_rest_t = _log_one_minus(tl, tl_y, gold)
        q_y, p_y = s_y.exp(), tl_y.exp()
        # TKD: binary KL([p_y, 1 - p_y] || [q_y, 1 - q_y]), 0 * log(0/x) = 0
        rest_p = log_rest_t.exp()
        tkd = torch.where(p_y > 0, p_y * (tl_y - s_y), 0.0) + torch.where(rest_p > 0, rest_p * (log_rest_t - log_rest_s), 0.0)
        # weights: hard tokens (1 - lam) * n / n_hard * (TKD + DKD), easy tokens lam * n / n_easy * DKD
        hard = context.hard.to(valid.device)
        easy = valid & ~hard
        lam = self.easy_weight
        hard_scale = (1.0 - lam) * context.n_valid / context.n_hard if context.n_hard else 0.0
        easy_scale = lam * context.n_valid / context.n_easy if context.n_easy else 0.0
        w_tkd = hard.to(z.dtype) * hard_scale
        w_dkd = w_tkd + easy.to(z.dtype) * easy_scale
        # gradient: q_hat * (w_dkd - w_tkd (q_y - p_y)) - w_dkd p_hat off the gold entry; w_tkd (q_y - p_y) on it
        gap = q_y - p_y
        grad = ws.buf("tmp")
        dkd_sum = None
        if fused is not None:
            dkd_sum = fused_atkd_grad(z, teacher, T, norms, gold, log_rest_s, log_rest_t, w_dkd - w_tkd * gap, w_dkd,
                                      w_tkd * gap, grad)
        if dkd_sum is None:
            s, tl = ws.student_logp(z, T), ws.teacher_logp(teacher, T)
            # DKD: sum_{j != y} p_hat_j (log p_hat_j - log q_hat_j) = sum_{j != y} p_hat_j (tl_j - s_j) - log_rest_t + log_rest_s
            p_hat = fast_exp(torch.sub(tl, log_rest_t.unsqueeze(-1), out=ws.buf("p_hat")), ws.buf("p_hat"))
            p_hat.scatter_(-1, gold, 0.0)
            diff = torch.sub(tl, s, out=grad)
            torch.mul(diff, p_hat, out=diff)
            dkd_sum = finite_products(diff).sum(-1)
            q_hat = fast_exp(torch.sub(s, log_rest_s.unsqueeze(-1), out=grad), grad)
            grad = q_hat.mul_((w_dkd - w_tkd * gap).unsqueeze(-1))
            grad.addcmul_(p_hat, w_dkd.unsqueeze(-1), value=-1.0)
            grad.scatter_(-1, gold, (w_tkd * gap).unsqueeze(-1))
            if T != 1.0:
                grad.div_(T)
        dkd = dkd_sum - log_rest_t + log_rest_s
        loss = w_tkd * tkd + w_dkd * dkd
        return finish_chunk(loss, grad, labels, 1.0)

    def slice_context(self, context: ATKDSplit, start: int, stop: int) -> ATKDSplit:
        return context.rows(start, stop)

    def config(self) -> dict:
        return {
            "name": self.name,
            "hard_fraction": self.hard_fraction,
            "easy_weight": self.easy_weight,
            "temperature": self.temperature,
        }


def _log_one_minus(logp: Tensor, gold_logp: Tensor, gold: Tensor) -> Tensor:
    """log(1 - exp(gold_logp)) per row: log1p where the gold probability is below 1/2, else the exact
    log-sum-exp of the other entries (no cancellation when the gold probability nears 1)."""
    out = torch.log1p(-gold_logp.exp())
    near_one = gold_logp > -math.log(2.0)
    if bool(near_one.any()):
        rows = logp[near_one].scatter(-1, gold[near_one], float("-inf"))
        out[near_one] = torch.logsumexp(rows, dim=-1)
    return out
