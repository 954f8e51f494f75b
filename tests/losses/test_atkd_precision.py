"""ATKD's easy/hard split keeps its resolution for near-certain and near-impossible gold tokens.

The reference ranks tokens in float64 by the log-odds of the teacher's uncertainty,
``log(1 - p_y) - log p_y = logsumexp_{v != y} z_v - z_y``, computed here in NumPy from the very logits the
objective sees (after their float32 / bfloat16 rounding), so the only difference left is the objective's own
arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmdistill.losses import ATKD, fused_linear_distill, reduce_tokens

IGNORE = -100


def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m))))


def _reference(z: np.ndarray, zt: np.ndarray, labels: np.ndarray, hard_fraction: float, lam: float):
    """ATKD (arXiv 2402.11890) in float64: split by the log-odds of 1 - p_y (ties hard), then
    lam * mean_easy(DKD) + (1 - lam) * mean_hard(TKD + DKD), every log-probability from log-sum-exps."""
    n, vocab = z.shape
    keys, tkd, dkd = np.zeros(n), np.zeros(n), np.zeros(n)
    valid = labels != IGNORE
    for i in np.flatnonzero(valid):
        y = labels[i]
        others = np.arange(vocab) != y
        t_all, s_all = _logsumexp(zt[i]), _logsumexp(z[i])
        t_rest, s_rest = _logsumexp(zt[i, others]), _logsumexp(z[i, others])
        log_py, log_qy = zt[i, y] - t_all, z[i, y] - s_all
        log_rest_p, log_rest_q = t_rest - t_all, s_rest - s_all
        keys[i] = t_rest - zt[i, y]
        tkd[i] = math.exp(log_py) * (log_py - log_qy) + math.exp(log_rest_p) * (log_rest_p - log_rest_q)
        p_hat = zt[i, others] - t_rest  # log of the renormalised non-gold distributions
        q_hat = z[i, others] - s_rest
        dkd[i] = float(np.sum(np.exp(p_hat) * (p_hat - q_hat)))
    n_valid = int(valid.sum())
    wanted = min(n_valid, max(1, int(math.floor(hard_fraction * n_valid + 0.5))))
    threshold = np.sort(keys[valid])[::-1][wanted - 1]
    hard = valid & (keys >= threshold)
    easy = valid & ~hard
    loss = lam * dkd[easy].mean() + (1 - lam) * (tkd[hard] + dkd[hard]).mean()
    return loss, hard


def _extreme_batch(seed: int, n: int = 40, vocab: int = 16):
    """60% near-certain gold tokens (1 - p_y between 1e-12 and 5e-8), 20% near-impossible ones (p_y between
    1e-30 and 1e-9), 20% ordinary; the student is an ordinary random model."""
    g = np.random.default_rng(seed)
    zt = g.normal(size=(n, vocab))
    z = g.normal(size=(n, vocab)) * 2
    labels = g.integers(0, vocab, size=n)
    kinds = np.array(["certain"] * (n * 6 // 10) + ["impossible"] * (n * 2 // 10) + ["ordinary"] * (n - n * 8 // 10))
    g.shuffle(kinds)
    for i, kind in enumerate(kinds):
        others = np.arange(vocab) != labels[i]
        rest = _logsumexp(zt[i, others])
        if kind == "certain":  # p_y = 1 - eps: z_y = rest + log((1 - eps) / eps)
            eps = 10 ** g.uniform(-12, math.log10(5e-8))
            zt[i, labels[i]] = rest + math.log1p(-eps) - math.log(eps)
        elif kind == "impossible":
            p = 10 ** g.uniform(-30, -9)
            zt[i, labels[i]] = rest + math.log(p) - math.log1p(-p)
    return z, zt, labels, kinds


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hard_fraction", [0.5, 0.1])
def test_split_and_loss_with_near_certain_and_near_impossible_tokens(teacher_dtype, hard_fraction):
    z64, zt64, labels_np, kinds = _extreme_batch(seed=3)
    z = torch.from_numpy(z64).float()
    zt = torch.from_numpy(zt64).to(teacher_dtype)
    labels = torch.from_numpy(labels_np)
    # the reference sees exactly the rounded logits
    want, want_hard = _reference(z.double().numpy(), zt.double().numpy(), labels_np, hard_fraction, 0.2)
    objective = ATKD(hard_fraction=hard_fraction)
    split = objective.batch_context(lambda: [(0, len(labels), zt)], labels, z.shape[-1])
    np.testing.assert_array_equal(split.hard.numpy(), want_hard)
    assert split.n_hard == int(math.floor(hard_fraction * len(labels) + 0.5))
    loss = reduce_tokens(objective.per_token(z, zt, labels), labels)
    assert loss.item() == pytest.approx(want, rel=2e-4)
    # and the chunked path splits over all rows the same way
    hidden = torch.eye(z.shape[0], dtype=torch.float32)
    chunked = fused_linear_distill(hidden, z.T.contiguous(), zt, labels, objective, chunk_size=7)
    assert chunked.item() == pytest.approx(want, rel=2e-4)


def test_near_impossible_tokens_do_not_tie():
    """Twelve gold tokens with p_y below 1e-9 (1 - p_y is exactly 1.0 in float32): asking for the four most
    uncertain gives exactly four, the four least likely."""
    g = np.random.default_rng(7)
    n, vocab = 30, 10
    zt = g.normal(size=(n, vocab))
    labels = g.integers(0, vocab, size=n)
    for i in range(12):
        zt[i, labels[i]] = -30.0 - 3 * i  # p_y ~ e^-30 ... e^-63
    objective = ATKD(hard_fraction=4 / 30)
    split = objective.batch_context(lambda: [(0, n, torch.from_numpy(zt).float())], torch.from_numpy(labels), vocab)
    assert split.n_hard == 4
    assert split.hard.nonzero().flatten().tolist() == [8, 9, 10, 11]


@pytest.mark.parametrize("n_valid", [10, 11])
def test_even_and_odd_counts_follow_the_papers_top_half(n_valid):
    """Hard = round-half-up(hard_fraction * n) most uncertain: 5 of 10 (the paper's top 50%; the reference
    code's ``u >= median`` with torch's lower median would take 6), 6 of 11 (both agree)."""
    g = torch.Generator().manual_seed(1)
    zt = torch.randn(n_valid + 2, 7, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (n_valid + 2,), generator=g)
    labels[-2:] = IGNORE
    split = ATKD().batch_context(lambda: [(0, n_valid + 2, zt)], labels, 7)
    assert split.n_hard == (n_valid + 1) // 2
    u = 1 - torch.softmax(zt, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    valid = labels != IGNORE
    median_rule = valid & (u >= u[valid].median())  # the reference code's rule, for the record
    assert int(median_rule.sum()) == n_valid // 2 + 1
    assert bool((u[split.hard].min() >= u[valid & ~split.hard].max()))


def test_uncertainty_keeps_relative_precision_at_both_ends():
    """``uncertainty`` (1 - p_y) of a near-certain token is its small non-gold mass, not a rounded 0."""
    vocab = 6
    zt = torch.zeros(2, vocab)
    zt[0, 0] = 30.0  # 1 - p_0 = 5 e^-30 ~ 4.7e-13
    zt[1, 0] = -30.0  # p_0 = e^-30 / (5 + e^-30)
    labels = torch.zeros(2, dtype=torch.long)
    u = ATKD().uncertainty(zt, labels, vocab)
    assert u.dtype == torch.float32
    assert u[0].item() == pytest.approx(5 * math.exp(-30) / (1 + 5 * math.exp(-30)), rel=1e-5)
    assert u[1].item() == 1.0  # rounds to one; the split ranks by the log-odds instead
