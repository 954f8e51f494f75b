"""Independent float64 references, written in NumPy straight from each paper's formula.

Nothing here imports lmdistill: these are the numbers the library is checked against. Functions take
student logits ``z`` and teacher logits ``zt`` as ``[N, V]`` arrays and return per-row values; rows whose
label is -100 are 0.
"""

from __future__ import annotations

import math

import numpy as np

IGNORE = -100


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / temperature
    shifted = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_v a_v log(a_v / b_v), with 0 log 0 = 0 (row-wise)."""
    out = np.zeros(a.shape[:-1])
    for idx in np.ndindex(*a.shape[:-1]):
        total = 0.0
        for av, bv in zip(a[idx], b[idx]):
            if av > 0:
                total += av * (math.log(av) - math.log(bv)) if bv > 0 else math.inf
        out[idx] = total
    return out


def _mask(values: np.ndarray, labels) -> np.ndarray:
    if labels is None:
        return values
    labels = np.asarray(labels)
    return np.where(labels != IGNORE, values, 0.0)


def forward_kl(z, zt, labels=None, T=1.0, t2=False):
    p, q = softmax(zt, T), softmax(z, T)
    return _mask(kl(p, q) * (T * T if t2 else 1.0), labels)


def reverse_kl(z, zt, labels=None, T=1.0, t2=False):
    p, q = softmax(zt, T), softmax(z, T)
    return _mask(kl(q, p) * (T * T if t2 else 1.0), labels)


def jsd(z, zt, beta, labels=None, T=1.0):
    """GKD's generalized JSD; beta = 0 / 1 are forward / reverse KL (the GKD/TRL convention)."""
    p, q = softmax(zt, T), softmax(z, T)
    if beta == 0:
        return _mask(kl(p, q), labels)
    if beta == 1:
        return _mask(kl(q, p), labels)
    m = beta * p + (1 - beta) * q
    return _mask(beta * kl(p, m) + (1 - beta) * kl(q, m), labels)


def tvd(z, zt, labels=None, T=1.0):
    p, q = softmax(zt, T), softmax(z, T)
    return _mask(0.5 * np.abs(p - q).sum(-1), labels)


def skew_kl(z, zt, alpha, labels=None, T=1.0):
    p, q = softmax(zt, T), softmax(z, T)
    return _mask(kl(p, alpha * p + (1 - alpha) * q), labels)


def skew_reverse_kl(z, zt, alpha, labels=None, T=1.0):
    p, q = softmax(zt, T), softmax(z, T)
    return _mask(kl(q, (1 - alpha) * p + alpha * q), labels)


def cross_entropy(z, labels):
    q = softmax(z)
    labels = np.asarray(labels)
    out = np.zeros(len(labels))
    for i, y in enumerate(labels):
        if y != IGNORE:
            out[i] = -math.log(q[i, y])
    return out


def taid(z, zt, t, labels=None, T=1.0, form="kl"):
    """TAID (arXiv 2501.16937): p_t = softmax((1 - t) z_S/T + t z_T/T); KL(p_t || q) or -sum p_t log q."""
    q = softmax(z, T)
    pt = softmax((1 - t) * np.asarray(z, dtype=np.float64) / T + t * np.asarray(zt, dtype=np.float64) / T)
    if form == "kl":
        values = kl(pt, q)
    else:
        values = -(pt * np.log(q)).sum(-1)
    return _mask(values, labels)


def atkd(z, zt, labels, hard_fraction=0.5, lam=0.2, T=1.0):
    """ATKD (arXiv 2402.11890) as a batch loss: lam * mean_easy(DKD) + (1 - lam) * mean_hard(TKD + DKD).

    Uncertainty 1 - p_y; the round(hard_fraction * n) most uncertain valid tokens (ties included) are hard.
    Returns (loss, tkd, dkd, hard_mask).
    """
    p, q = softmax(zt, T), softmax(z, T)
    labels = np.asarray(labels)
    n_rows, vocab = p.shape
    tkd = np.zeros(n_rows)
    dkd = np.zeros(n_rows)
    unc = np.zeros(n_rows)
    for i, y in enumerate(labels):
        if y == IGNORE:
            continue
        py, qy = p[i, y], q[i, y]
        tkd[i] = kl(np.array([py, 1 - py]), np.array([qy, 1 - qy]))
        keep = np.arange(vocab) != y
        dkd[i] = kl(p[i, keep] / p[i, keep].sum(), q[i, keep] / q[i, keep].sum())
        unc[i] = 1 - py
    valid = labels != IGNORE
    n = int(valid.sum())
    wanted = min(n, max(1, int(math.floor(hard_fraction * n + 0.5)))) if hard_fraction > 0 else 0
    hard = np.zeros(n_rows, dtype=bool)
    if wanted:
        threshold = np.sort(unc[valid])[::-1][wanted - 1]
        hard = valid & (unc >= threshold)
    easy = valid & ~hard
    easy_mean = dkd[easy].mean() if easy.any() else 0.0
    hard_mean = (tkd[hard] + dkd[hard]).mean() if hard.any() else 0.0
    return lam * easy_mean + (1 - lam) * hard_mean, tkd, dkd, hard


def sinkhorn_reference_loop(ps: np.ndarray, pt: np.ndarray, epsilon: float, iterations: int) -> float:
    """The SinKD reference algorithm (2018cx/SinKD loss.py) transcribed: L1 cost, K = exp(-W/eps),
    alternate row and column normalisation of K, return sum(P * W) (plan of total mass B)."""
    cost = np.abs(ps[:, None, :] - pt[None, :, :]).sum(-1)
    plan = np.exp(-cost / epsilon)
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdims=True)
        plan = plan / plan.sum(0, keepdims=True)
    return float((plan * cost).sum())
