"""SinKD: Sinkhorn distance between the student's and the teacher's predictions over a batch of rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.core import (
    Objective,
    Workspace,
    compute_dtype,
    finish_chunk,
    flatten_inputs,
    student_log_probs,
)
from lmdistill.losses.fused import fused_applies, fused_l1_cost, fused_l1_cost_grad, l1_cost_grad_eager
from lmdistill.losses.signals import (
    Teacher,
    is_sparse,
    signal_values,
    teacher_log_probs,
)

__all__ = ["SinKD", "sinkhorn_log_plan"]


def _softmax_into(logits: Tensor, temperature: float, out: Tensor) -> Tensor:
    """``softmax(logits / T)`` computed in ``out``'s dtype (an exact upcast first, never in bf16)."""
    if logits.dtype == out.dtype and temperature != 1.0:
        torch.div(logits, temperature, out=out)
    else:
        out.copy_(logits)
        if temperature != 1.0:
            out.div_(temperature)
    return torch.softmax(out, -1, out=out)

def _blocks(q: Tensor, p: Tensor, valid: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows cut into consecutive blocks of ``group`` (the last one padded with massless rows):
    ``q`` and ``p`` as ``[blocks, group, V]``, the uniform log-marginal of each block's valid rows
    ``[blocks, group]`` and the valid rows per block ``[blocks, 1]``."""
    n, vocab = q.shape
    n_groups = -(-n // group) if n else 0
    pad = n_groups * group - n
    if pad:  # only a last, partial block
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        p = torch.nn.functional.pad(p, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad), value=False)
    mask = valid.reshape(n_groups, group)
    counts = mask.sum(-1, keepdim=True)  # valid rows per block
    log_mass = torch.where(mask, -torch.log(counts.clamp(min=1).to(q.dtype)), torch.full((), _NO_MASS, dtype=q.dtype))
    return q.reshape(n_groups, group, vocab), p.reshape(n_groups, group, vocab), log_mass, counts


# log-marginal of rows that carry no mass (ignored tokens, padding of the last group): finite, so no
# -inf - (-inf) NaN can reach the gradient, and exp() of it is exactly 0 in float32 and float64
_NO_MASS = -1.0e4


def sinkhorn_log_plan(cost: Tensor, log_a: Tensor, log_b: Tensor, epsilon: float, iterations: int) -> Tensor:
    """Log of the entropic transport plan for ``cost`` ``[..., n, m]`` between marginals ``a`` and ``b``.

    Log-domain Sinkhorn (stable for small epsilon): starting from ``v = 1``, each iteration rescales the
    rows of ``K = exp(-cost / epsilon)`` to the marginal ``a`` and then the columns to ``b``, the order of
    the SinKD reference code; after the last iteration the column marginals hold exactly. Differentiable
    through the unrolled iterations, as in the reference. Rows/columns whose log-marginal is at most
    ``-1e4`` carry no mass and are absent from the start (their initial ``v`` is 0, not 1), so padding a
    block with massless rows changes nothing.
    """
    log_k = -cost / epsilon
    log_v = torch.where(log_b <= _NO_MASS, log_b, torch.zeros_like(log_b))
    log_u = torch.zeros_like(log_a)
    for _ in range(iterations):
        log_u = log_a - torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1)
        log_v = log_b - torch.logsumexp(log_k + log_u.unsqueeze(-1), dim=-2)
    return log_u.unsqueeze(-1) + log_k + log_v.unsqueeze(-2)


class SinKD(Objective):
    """Sinkhorn knowledge distillation with its batch-wise reformulation.

    Cui et al., "Sinkhorn Distance Minimization for Knowledge Distillation", LREC-COLING 2024,
    arXiv 2402.17110 (reference code 2018cx/SinKD). Rows of a batch are the samples: with
    ``P_S = softmax(z_S / T)`` and ``P_T = softmax(z_T / T)`` over B rows, the cost is the B x B matrix of
    L1 distances ``W_ij = ||P_S[i] - P_T[j]||_1``, the plan ``Pi`` is the entropic optimal transport plan
    between uniform marginals over the rows (``K = exp(-W / epsilon)``, Sinkhorn iterations in log domain)
    and the loss is ``sum_ij Pi_ij W_ij``.

    Use it beside a per-row loss (``cross_entropy`` or ``forward_kl`` in a ``mix``), as the reference code does
    (it always adds it to the task loss): with uniform marginals the transport cost of a block does not depend on
    which student row predicts which of the block's teacher distributions, so alone it does not tie a position
    to its own target. Trained alone on the KJV demo (100 steps, two seeds) the student fell to one distribution
    for every position (the same argmax token everywhere; KL of each row to the mean row 0.002 nats, against 0.85
    for a forward-KL student) and ended far worse than a label-only one.

    Differences from the reference code, on purpose: its plan has marginals 1 (total mass B) and the
    result is multiplied by a fixed 0.002; here the marginals are 1/B (a proper Sinkhorn distance, so the
    loss is in [0, 2] whatever B) and the scale is left to the mixture weight: reference value =
    ``0.002 * B * loss``. Defaults follow the reference: T = 2, epsilon = 0.1, 20 iterations.

    For language models the rows are tokens. A cost matrix over all N tokens of a batch costs O(N^2 V),
    so rows are coupled in consecutive position blocks of ``group_size`` (ignored tokens carry no mass;
    ``group_size=None`` couples the whole call). The default, 16 rows, is the coupling of the reference
    code's released GLUE runs (per-GPU batches of 16 examples). Each row costs about ``group_size`` times
    the vocabulary twice (its cost-matrix row and its gradient), so larger groups are slower: forward plus
    backward is 1.23x the output layer's matrix product at 16 and 1.68x at 64 with 32k entries, 1.00x and
    1.79x with 128k (``bench/losses.py``, 4096 rows, hidden size 512). On the KJV demo student
    (``bench/sinkd_group.py``: 300 steps, 0.5 SinKD + 0.5 cross-entropy) group 16 gave validation
    perplexity 126.5 and group 64 133.0.

    Per-row form (what :meth:`per_token` returns): row i of a block with n valid rows contributes
    ``n * sum_j Pi_ij W_ij``, so the mean over the block's valid rows is the block's Sinkhorn loss and the
    mean over all valid rows is the token-weighted mean of the block losses (the gradient of that sum is the
    gradient of the batch loss, since Pi is differentiated through).
    With the trainer's global normaliser, micro-batches add up to the token-weighted mean of their block
    losses. The chunked path supports it when its chunks are whole blocks (it rounds the chunk size).
    """

    name = "sinkd"
    batch_coupled = True

    def __init__(self, temperature: float = 2.0, epsilon: float = 0.1, iterations: int = 20, group_size: int | None = 16) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise ValueError(f"epsilon must be a number > 0, got {epsilon!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be an integer >= 1 or null, got {group_size!r}")
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.iterations = iterations
        self.group_size = group_size
        self.row_group_size = group_size

    def per_token(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *, context: Any = None) -> Tensor:
        if teacher is None:
            raise ValueError("objective 'sinkd' needs a teacher")
        logits, teacher, flat_labels, lead = flatten_inputs(student_logits, teacher, labels)
        n, vocab = logits.shape
        dtype = compute_dtype(logits, signal_values(teacher))
        s_logp = student_log_probs(logits, self.temperature, dtype)
        p_s = s_logp.exp()
        p_t = teacher_log_probs(teacher, self.temperature, vocab, dtype, s_logp.detach()).exp()
        valid = flat_labels != IGNORE_INDEX
        group = n if self.group_size is None else self.group_size
        group = max(1, min(group, n)) if n else 1
        p_s, p_t, log_mass, counts = _blocks(p_s, p_t, valid, group)
        cost = torch.cdist(p_s, p_t, p=1)  # [groups, group, group]
        return self._loss_from_cost(cost, log_mass, counts, valid).reshape(lead)

    def _loss_from_cost(self, cost: Tensor, log_mass: Tensor, counts: Tensor, valid: Tensor) -> Tensor:
        """Per-row losses ``[n]`` from the blocks' cost matrices (shared by both paths, so they agree exactly)."""
        n = valid.shape[0]
        log_plan = sinkhorn_log_plan(cost, log_mass, log_mass, self.epsilon, self.iterations)
        row_cost = (log_plan.exp() * cost).sum(-1)  # [groups, group]
        per_row = (row_cost * counts.to(cost.dtype)).reshape(-1)[:n]
        return torch.where(valid, per_row, torch.zeros((), dtype=cost.dtype))

    def has_chunk_kernel(self) -> bool:
        return self.group_size is not None

    def chunk_value_and_grad(self, z, teacher, labels, ws: Workspace, context=None):
        """Loss and gradient for a chunk of whole blocks, without autograd over ``[chunk, V]`` tensors.

        The cost matrices are the L1 distances of the probabilities (no graph); only the Sinkhorn iterations on
        the small ``[blocks, group, group]`` costs are differentiated with autograd, and the cost gradient
        ``G`` is taken back to the student's probabilities (``dL/dq_iv = sum_j G_ij sign(q_iv - p_jv)``), then
        through the softmax. Those two passes, each ``group`` times the vocabulary per row, dominate the time:
        they use the compiled kernels of :mod:`lmdistill.losses.fused` where those apply (float32 on CPU),
        else ``cdist`` and its backward; see ``bench/losses.py``.
        """
        if self.group_size is None:
            return None  # couples the whole call: the chunked path refuses it before asking
        T = self.temperature
        n, vocab = z.shape
        if is_sparse(teacher):
            ws.student_logp(z, T)
            ws.teacher_logp(teacher, T)  # after the student: a sparse teacher's tail is shaped by it
            q, p = ws.student_q(T), ws.teacher_p(T)
        else:
            # dense teacher: probabilities straight from a softmax, no log-probabilities kept (two [chunk, V]
            # buffers less; the cost only needs probabilities)
            q = _softmax_into(z, T, ws.buf("sinkd_q"))
            p = _softmax_into(teacher, T, ws.buf("sinkd_p"))
        valid = labels != IGNORE_INDEX
        group = max(1, min(self.group_size, n))
        q_blocks, p_blocks, log_mass, counts = _blocks(q, p, valid, group)
        n_groups = q_blocks.shape[0]
        with torch.no_grad():
            cost = fused_l1_cost(q_blocks, p_blocks)
            if cost is None:
                cost = torch.cdist(q_blocks, p_blocks, p=1)
        with torch.enable_grad():
            leaf = cost.detach().requires_grad_(True)
            rows = self._loss_from_cost(leaf, log_mass, counts, valid)
            (g_cost,) = torch.autograd.grad(rows.sum(), leaf)
        loss = rows.detach()
        # through the softmax: dL/dz = (1/T) q (g - sum_k q_k g_k) with g = dL/dq; the 1/T goes into the small
        # cost gradient and the first product with q into the kernel's loop (two passes over [chunk, V] fewer)
        g_cost = g_cost / T
        q_g = None
        if fused_applies(q_blocks, p_blocks):
            # into a reused buffer (cdist's backward allocates its result: the same memory, fresh per chunk)
            target = ws.buf("sinkd_grad").view_as(q_blocks) if n_groups * group == n else torch.empty_like(q_blocks)
            q_g = fused_l1_cost_grad(g_cost, q_blocks, p_blocks, target)
        if q_g is None:
            q_g = l1_cost_grad_eager(g_cost, q_blocks, p_blocks, cost)
        q_g = q_g.reshape(n_groups * group, vocab)[:n]
        grad = q_g.addcmul_(q, q_g.sum(-1, keepdim=True), value=-1.0)
        return finish_chunk(loss, grad, labels, 1.0)

    def config(self) -> dict:
        return {
            "name": self.name,
            "temperature": self.temperature,
            "epsilon": self.epsilon,
            "iterations": self.iterations,
            "group_size": self.group_size,
        }
