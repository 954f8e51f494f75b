"""AKL: forward and reverse KL mixed per token by how far the student is off on the teacher's head and tail."""

from __future__ import annotations

import torch
from torch import Tensor

from lmdistill.losses.core import Divergence, Workspace, finish_chunk, finite_products, kl_from_log_probs
from lmdistill.losses.signals import Teacher

__all__ = ["AdaptiveKL", "akl_head_by_sort", "akl_head_mask", "akl_weights"]


# Candidates ranked by a partial top-k before falling back to a full sort: a trained teacher's head up to
# mu = 0.5 is a handful of tokens, and a full sort of the vocabulary costs more than the rest of the loss.
_HEAD_CANDIDATES = 64


def akl_head_mask(p: Tensor, mu: float) -> Tensor:
    """The head of each row of teacher probabilities ``p`` ``[N, V]``, as a mask in vocabulary order.

    Sorted in descending order (ties in vocabulary order, as a stable sort puts them), position ``k`` is head
    while the cumulative probability up to and including it is at most ``mu``; the first always is. The head
    count comes from the top-``64`` probabilities, whose cumulative sums are the first entries of the full
    sort's; the head is then every token above the last head value plus, among the tokens equal to it, as many
    as are left in vocabulary order. Rows whose top 64 do not reach ``mu`` (a flat teacher) are sorted fully.
    """
    n, v = p.shape
    k = min(_HEAD_CANDIDATES, v)
    top = torch.topk(p, k, dim=-1, sorted=True).values
    cum = torch.cumsum(top, dim=-1)
    count = (cum <= mu).sum(-1).clamp_(min=1)
    last = top.gather(-1, (count - 1).unsqueeze(-1))
    head = p >= last
    # more tokens equal to the last head value than places left for them: the first ones in vocabulary order
    crowded = (head.sum(-1) > count).nonzero().squeeze(-1)
    if crowded.numel():
        rows, edge = p[crowded], last[crowded]
        above, tied = rows > edge, rows == edge
        left = (count[crowded] - above.sum(-1)).unsqueeze(-1)
        head[crowded] = above | (tied & (torch.cumsum(tied, dim=-1) <= left))
    open_rows = (cum[:, -1] <= mu).nonzero().squeeze(-1) if k < v else cum.new_zeros(0, dtype=torch.long)
    if open_rows.numel() == n:
        return akl_head_by_sort(p, mu)
    if open_rows.numel():
        head[open_rows] = akl_head_by_sort(p[open_rows], mu)
    return head


def akl_head_by_sort(p: Tensor, mu: float) -> Tensor:
    """The head of :func:`akl_head_mask` read off a stable descending sort of every row (its fallback)."""
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    sorted_head = torch.cumsum(p_sorted, dim=-1) <= mu
    sorted_head[:, 0] = True
    return torch.zeros_like(sorted_head).scatter_(-1, order, sorted_head)


def akl_weights(s_logp: Tensor, t_logp: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """AKL's per-row weights ``(w_head, w_tail)`` from log-probabilities ``[..., V]`` (no gradient).

    The head is :func:`akl_head_mask`: the teacher's most likely tokens, sorted in descending order, while
    their cumulative probability is at most ``mu`` (the first always). ``g_head`` and ``g_tail`` are the sums
    of ``|p - q|`` over the head and the tail, and the weights are ``g_head / (g_head + g_tail)`` and
    ``g_tail / (g_head + g_tail)``; a row with ``p == q`` (both gaps 0, where both divergences vanish) gets
    1/2 each.
    """
    with torch.no_grad():
        shape = t_logp.shape[:-1]
        p = t_logp.exp().reshape(-1, t_logp.shape[-1])
        gap = (p - s_logp.exp().reshape(p.shape)).abs()
        head = akl_head_mask(p, mu)
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_tail = torch.where(head, 0.0, gap).sum(-1)
        total = g_head + g_tail
        tied = total == 0
        safe_total = torch.where(tied, 1.0, total)
        w_head = torch.where(tied, 0.5, g_head / safe_total)
        w_tail = torch.where(tied, 0.5, g_tail / safe_total)
    return w_head.reshape(shape), w_tail.reshape(shape)


class AdaptiveKL(Divergence):
    """Adaptive KL: ``w_head * KL(p || q) + w_tail * KL(q || p)`` per token, the weights from the head/tail gaps.

    Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language Models",
    arXiv 2404.02657 (COLING 2025; official code wutaiqiang/LLM_KD_AKL). Forward KL mostly fits the head of the
    teacher's distribution early in training and reverse KL the tail, so AKL weights each by the share of the
    student's error that lies in its part. The head is the teacher's most likely tokens up to cumulative
    probability ``mu`` (default 0.5, the paper's), split as the official code does: sort the teacher's
    probabilities, gather the student's into the same order, and *then* mark the positions whose cumulative
    teacher probability exceeds ``mu`` as tail (the first position is always head). The mask is built and
    applied in the sorted order; a mask computed on sorted probabilities but applied to the unsorted gaps (as
    a baseline copy in another public repository does) puts arbitrary tokens in the head. See
    :func:`akl_weights`; :func:`akl_head_mask` finds the same head without sorting the whole vocabulary when
    the teacher's top 64 tokens reach ``mu`` (``bench/akl_head.py``).

    The weights are constants for the gradient (the official code computes them from the detached student).
    Both distributions are taken at ``temperature`` (the official code uses 1). Where the official code
    replaces infinite logits by 0 before computing the weights, masked vocabulary entries (-inf in both) here
    simply have probability 0, in the head/tail sums and in the divergences.

    Gradient: ``dL/dz = (w_head (q - p) + w_tail q (log q - log p - KL(q || p))) / T``.
    """

    name = "akl"

    def __init__(self, mu: float = 0.5, temperature: float = 1.0, scale_by_t2: bool = False) -> None:
        super().__init__(temperature, scale_by_t2)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0.0 < mu < 1.0:
            raise ValueError(f"mu must be a number in (0, 1) (the head's cumulative teacher probability), got {mu!r}")
        self.mu = float(mu)

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        w_head, w_tail = akl_weights(s_logp, t_logp, self.mu)
        return w_head * kl_from_log_probs(t_logp, s_logp) + w_tail * kl_from_log_probs(s_logp, t_logp)

    def eager_chunk(self, z: Tensor, teacher: Teacher | None, labels: Tensor, ws: Workspace, context=None):
        T = self.temperature
        s = ws.student_logp(z, T)
        tl = ws.teacher_logp(teacher, T)
        q, p = ws.student_q(T), ws.teacher_p(T)
        w_head, w_tail = akl_weights(s, tl, self.mu)
        d = torch.sub(s, tl, out=ws.buf("d"))  # log q - log p
        tmp = ws.buf("tmp")
        forward = finite_products(torch.mul(d, p, out=tmp)).sum(-1).neg_()
        reverse = finite_products(torch.mul(d, q, out=tmp)).sum(-1)
        loss = w_head * forward + w_tail * reverse
        # reverse part q (d - KL(q || p)), zero where q = 0 (also where d is -inf - -inf there)
        grad = finite_products(d.sub_(reverse.unsqueeze(-1)).mul_(q)).mul_(w_tail.unsqueeze(-1))
        grad.add_(torch.sub(q, p, out=tmp).mul_(w_head.unsqueeze(-1)))
        if T != 1.0:
            grad.div_(T)
        return finish_chunk(loss, grad, labels, self.loss_scale)

    def config(self) -> dict:
        return {**super().config(), "mu": self.mu}
