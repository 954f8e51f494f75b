"""Independent float64 references, in NumPy from each paper's formula, for AKL, DistiLLM-2, DAC-KL and the span
correlation loss, and the chunked-versus-plain check they share. Nothing here imports lmdistill's losses."""

from __future__ import annotations

import math

import numpy as np
import torch

IGNORE = -100


def softmax(z, T: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / T
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(a: np.ndarray, b: np.ndarray) -> float:
    """sum a log(a / b) over one row, 0 log 0 = 0."""
    keep = a > 0
    return float(np.sum(a[keep] * (np.log(a[keep]) - np.log(b[keep]))))


# --- AKL (arXiv 2404.02657; official code wutaiqiang/LLM_KD_AKL) ------------------------------------------------

def akl_weights(p: np.ndarray, q: np.ndarray, mu: float) -> tuple[float, float]:
    order = np.argsort(-p, kind="stable")  # descending, ties in vocabulary order
    p_sorted, q_sorted = p[order], q[order]
    head = np.cumsum(p_sorted) <= mu
    head[0] = True
    gap = np.abs(p_sorted - q_sorted)
    g_head, g_tail = gap[head].sum(), gap[~head].sum()
    if g_head + g_tail == 0:
        return 0.5, 0.5
    return g_head / (g_head + g_tail), g_tail / (g_head + g_tail)


def akl(z, zt, labels, mu=0.5, T=1.0):
    """Per-row AKL value and the gradient the paper's rule gives (weights held constant), both / T as stated."""
    p, q = softmax(zt, T), softmax(z, T)
    n = p.shape[0]
    values, grads = np.zeros(n), np.zeros_like(p)
    for i in range(n):
        if labels is not None and labels[i] == IGNORE:
            continue
        w_head, w_tail = akl_weights(p[i], q[i], mu)
        reverse = kl(q[i], p[i])
        values[i] = w_head * kl(p[i], q[i]) + w_tail * reverse
        with np.errstate(divide="ignore", invalid="ignore"):
            rev_grad = np.where(q[i] > 0, q[i] * (np.log(q[i]) - np.log(p[i]) - reverse), 0.0)
        grads[i] = (w_head * (q[i] - p[i]) + w_tail * rev_grad) / T
    return values, grads


def akl_mask_on_unsorted(z, zt, mu=0.5):
    """The mis-ordered variant found in a public baseline: the head mask is built on the teacher's sorted
    probabilities but applied to the gaps in vocabulary order. Kept only to show the tests tell them apart."""
    p, q = softmax(zt), softmax(z)
    out = np.zeros(p.shape[0])
    for i in range(p.shape[0]):
        head = np.cumsum(np.sort(p[i])) >= mu  # ascending sort, as that copy does
        gap = np.abs(p[i] - q[i])
        g_head, g_tail = gap[head].sum(), gap[~head].sum()
        out[i] = g_head / (g_head + g_tail) * kl(p[i], q[i]) + g_tail / (g_head + g_tail) * kl(q[i], p[i])
    return out


# --- DistiLLM-2 (arXiv 2503.07067) ---------------------------------------------------------------------------------

def distillm2(z, zt, labels, student_rows, beta, alpha_skl=0.1, alpha_srkl=0.1, T=1.0):
    """(2 - beta) KL(p || a p + (1 - a) q) on teacher rows, beta KL(q || (1 - a) p + a sg(q)) on student rows;
    alphas per row (scalars broadcast). Returns values and the gradient w.r.t. z (sg(q) held constant)."""
    p, q = softmax(zt, T), softmax(z, T)
    n = p.shape[0]
    a1 = np.broadcast_to(np.asarray(alpha_skl, dtype=np.float64), (n,))
    a2 = np.broadcast_to(np.asarray(alpha_srkl, dtype=np.float64), (n,))
    values, grads = np.zeros(n), np.zeros_like(p)
    for i in range(n):
        if labels[i] == IGNORE:
            continue
        if student_rows[i]:
            m = (1 - a2[i]) * p[i] + a2[i] * q[i]
            value = kl(q[i], m)
            d = np.log(q[i]) - np.log(m)
            values[i] = beta * value
            grads[i] = beta * q[i] * (d - value) / T
        else:
            m = a1[i] * p[i] + (1 - a1[i]) * q[i]
            values[i] = (2 - beta) * kl(p[i], m)
            r = p[i] / m
            grads[i] = (2 - beta) * (1 - a1[i]) * q[i] * (np.sum(q[i] * r) - r) / T
    return values, grads


def distillm2_alphas(z, zt, labels, seq_len, base, anchor):
    """Per-sequence adaptive skew coefficient of the official trainer: gap = exp(mean log p(y)) - exp(mean log q(y)),
    alpha = clip(1 - (1 - base) * anchor / (gap + 1e-5), 0.01, base); returns the teacher-kind alphas and gaps."""
    p, q = softmax(zt), softmax(z)
    n = p.shape[0]
    alphas, gaps = [], []
    for start in range(0, n, seq_len):
        rows = [i for i in range(start, start + seq_len) if labels[i] != IGNORE]
        mean_t = np.mean([math.log(p[i, labels[i]]) for i in rows])
        mean_s = np.mean([math.log(q[i, labels[i]]) for i in rows])
        gap = math.exp(mean_t) - math.exp(mean_s)
        gaps.append(gap)
        alphas.append(min(base, max(0.01, 1 - (1 - base) * anchor / (gap + 1e-5))))
    return np.array(alphas), np.array(gaps)


# --- DAC-KL and span correlation (arXiv 2407.10068; structure as documented in lmdistill.losses.dackl) -------------

def dackl_clipped_kl(z, zt, lower, upper, sharpness, T=1.0):
    """KL(p* || q*) per row with p* = m p / sum(m p): m = sigmoid((c - l)/s) sigmoid((u - c)/s) over the teacher's
    descending order, c the teacher mass before a token, the teacher's top token weighted 1."""
    p, q = softmax(zt, T), softmax(z, T)
    n = p.shape[0]
    out = np.zeros(n)
    for i in range(n):
        order = np.argsort(-p[i], kind="stable")
        before = np.concatenate([[0.0], np.cumsum(p[i][order])[:-1]])
        m_sorted = 1 / (1 + np.exp(-(before - lower[i]) / sharpness)) / (1 + np.exp(-(upper[i] - before) / sharpness))
        m_sorted[0] = 1.0
        m = np.empty_like(m_sorted)
        m[order] = m_sorted
        p_star = m * p[i] / np.sum(m * p[i])
        q_star = m * q[i] / np.sum(m * q[i])
        out[i] = kl(p_star, q_star)
    return out


def span_correlation(z, zt, labels, span_ids, T=1.0):
    """|| p_t p_{t+1} - q_t q_{t+1} ||^2 at t for adjacent valid positions of one span."""
    p, q = softmax(zt, T), softmax(z, T)
    n = p.shape[0]
    out = np.zeros(n)
    for t in range(n - 1):
        same = span_ids[t] >= 0 and span_ids[t] == span_ids[t + 1]
        if same and labels[t] != IGNORE and labels[t + 1] != IGNORE:
            out[t] = float(np.sum((p[t] * p[t + 1] - q[t] * q[t + 1]) ** 2))
    return out


# --- the chunked path against the plain one ---------------------------------------------------------------------

def chunked_matches_plain(objective, *, n=24, h=6, v=13, chunk=8, seed=0, teacher_kind="logits", ignore_every=5,
                          bias=True, plain_objective=None) -> None:
    """``fused_linear_distill`` gives the loss and the gradients (hidden, weight, bias) of
    ``reduce_tokens(per_token(hidden @ W.T + b, ...))`` in float64."""
    from lmdistill.losses import SparseTeacher, fused_linear_distill, reduce_tokens

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=torch.float64).requires_grad_(True) if bias else None
    t_hidden = torch.randn(n, 5, generator=g, dtype=torch.float64)
    t_weight = torch.randn(v, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    teacher_logits = t_hidden @ t_weight.T
    if teacher_kind == "logits":
        teacher = plain_teacher = teacher_logits
    elif teacher_kind == "hidden":
        teacher, plain_teacher = (t_hidden, t_weight), teacher_logits
    else:
        teacher = plain_teacher = SparseTeacher.from_logits(teacher_logits, k=4, temperature=getattr(objective, "temperature", 1.0))
    logits = hidden @ weight.T + (b if b is not None else 0)
    reference = plain_objective or objective
    want = reduce_tokens(reference.per_token(logits, plain_teacher, labels), labels)
    params = [t for t in (hidden, weight, b) if t is not None]
    want_grads = torch.autograd.grad(want, params)
    got = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=chunk, student_bias=b)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, w in zip(got_grads, want_grads):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)
