"""Each objective against an independent float64 reference written from its paper's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.embed.losses import (
    info_nce_loss,
    m3_self_distillation_loss,
    margin_mse_loss,
    mcl_loss,
    soft_cross_entropy,
)

SETTINGS = settings(max_examples=40, deadline=None)


def ref_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ref_info_nce(q: np.ndarray, d: np.ndarray, tau: float, negs: np.ndarray | None) -> float:
    cands = d if negs is None else np.concatenate([d, negs])
    total = 0.0
    for i in range(q.shape[0]):
        scores = [float(np.dot(q[i], c)) / tau for c in cands]
        total += -ref_log_softmax(scores)[i]
    return total / q.shape[0]


@SETTINGS
@given(
    b=st.integers(1, 5),
    dim=st.integers(1, 6),
    n_neg=st.integers(0, 3),
    tau=st.floats(0.02, 2.0),
    seed=st.integers(0, 10_000),
)
def test_info_nce_matches_reference(b, dim, n_neg, tau, seed):
    rng = np.random.default_rng(seed)
    q, d = rng.normal(size=(b, dim)), rng.normal(size=(b, dim))
    negs = rng.normal(size=(n_neg, dim)) if n_neg else None
    got = info_nce_loss(
        torch.tensor(q), torch.tensor(d), tau, None if negs is None else torch.tensor(negs)
    ).item()
    assert got == pytest.approx(ref_info_nce(q, d, tau, negs), rel=1e-9, abs=1e-9)


def test_info_nce_prefers_aligned_pairs():
    eye = torch.eye(4, dtype=torch.float64)
    shuffled = eye[[1, 2, 3, 0]]
    assert info_nce_loss(eye, eye, 0.1) < info_nce_loss(eye, shuffled, 0.1)


@SETTINGS
@given(
    n=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 10.0),
)
def test_margin_mse_matches_reference(n, seed, scale):
    rng = np.random.default_rng(seed)
    sp, sn, tp, tn = (rng.normal(size=n) * scale for _ in range(4))
    ref = sum(((sp[i] - sn[i]) - (tp[i] - tn[i])) ** 2 for i in range(n)) / n
    got = margin_mse_loss(*(torch.tensor(x) for x in (sp, sn, tp, tn))).item()
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), shift=st.floats(-5, 5))
def test_margin_mse_ignores_a_common_score_offset(seed, shift):
    """Only margins matter: shifting all student scores by a constant changes nothing (arXiv 2010.02666)."""
    rng = np.random.default_rng(seed)
    sp, sn, tp, tn = (torch.tensor(rng.normal(size=6)) for _ in range(4))
    assert margin_mse_loss(sp + shift, sn + shift, tp, tn).item() == pytest.approx(
        margin_mse_loss(sp, sn, tp, tn).item(), rel=1e-9, abs=1e-12
    )


def test_margin_mse_is_signed():
    """A student that ranks the pair the wrong way round is penalised even if |margin| matches."""
    t_pos, t_neg = torch.tensor([0.9]), torch.tensor([0.1])
    right = margin_mse_loss(torch.tensor([0.9]), torch.tensor([0.1]), t_pos, t_neg)
    flipped = margin_mse_loss(torch.tensor([0.1]), torch.tensor([0.9]), t_pos, t_neg)
    assert right.item() == 0.0
    assert flipped.item() == pytest.approx(1.6**2)


def test_margin_mse_does_not_backpropagate_into_the_teacher():
    t_pos = torch.tensor([0.5], requires_grad=True)
    s_pos = torch.tensor([0.2], requires_grad=True)
    margin_mse_loss(s_pos, torch.tensor([0.0]), t_pos, torch.tensor([0.1])).backward()
    assert t_pos.grad is None and s_pos.grad is not None


# ---------------------------------------------------------------- MCL (flipped KD)


def ref_mcl(s, t, y, m, th_pos, th_neg, w_mcl, w_dist):
    pos = [(a, b) for a, b, c in zip(s, t, y) if c == 1 and b >= th_pos]
    neg = [(a, b) for a, b, c in zip(s, t, y) if c == 0 and b <= th_neg]
    l_pos = sum(max(0.0, (b + m) - a) for a, b in pos) / len(pos) if pos else 0.0
    l_neg = sum(max(0.0, a - (b - m)) for a, b in neg) / len(neg) if neg else 0.0
    kept = pos + neg
    dist = sum((a - b) ** 2 for a, b in kept) / len(kept) if kept else 0.0
    return w_dist * dist + w_mcl * (l_pos + l_neg), l_pos, l_neg, len(pos), len(neg)


@SETTINGS
@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    margin=st.floats(0.0, 0.5),
    th_pos=st.floats(-1.0, 0.5),
    gap=st.floats(0.0, 1.0),
    w_mcl=st.floats(0.0, 2.0),
    w_dist=st.floats(0.0, 2.0),
)
def test_mcl_matches_reference(n, seed, margin, th_pos, gap, w_mcl, w_dist):
    rng = np.random.default_rng(seed)
    s, t = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    y = rng.integers(0, 2, n)
    out = mcl_loss(
        torch.tensor(s),
        torch.tensor(t),
        torch.tensor(y),
        margin=margin,
        pos_threshold=th_pos,
        neg_threshold=th_pos + gap,
        mcl_weight=w_mcl,
        dist_weight=w_dist,
    )
    total, l_pos, l_neg, kp, kn = ref_mcl(s, t, y, margin, th_pos, th_pos + gap, w_mcl, w_dist)
    assert out.loss.item() == pytest.approx(total, rel=1e-9, abs=1e-12)
    assert out.positive_hinge.item() == pytest.approx(l_pos, rel=1e-9, abs=1e-12)
    assert out.negative_hinge.item() == pytest.approx(l_neg, rel=1e-9, abs=1e-12)
    assert (out.kept_positives, out.kept_negatives) == (kp, kn)


def _mcl(s, t, y, **kw):
    kw = {"margin": 0.1, "pos_threshold": 0.2, "neg_threshold": 0.6, "dist_weight": 0.0, **kw}
    return mcl_loss(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), torch.tensor(y), **kw)


def test_mcl_positive_satisfied_only_above_teacher_plus_margin():
    # Teacher says 0.5: the positive must reach 0.6 before its hinge is zero.
    assert _mcl([0.61], [0.5], [1]).mcl.item() == 0.0
    assert _mcl([0.55], [0.5], [1]).mcl.item() == pytest.approx(0.05)
    assert _mcl([0.30], [0.5], [1]).mcl.item() == pytest.approx(0.30)


def test_mcl_negative_satisfied_only_below_teacher_minus_margin():
    assert _mcl([0.19], [0.3], [0]).mcl.item() == 0.0
    assert _mcl([0.25], [0.3], [0]).mcl.item() == pytest.approx(0.05)
    assert _mcl([0.90], [0.3], [0]).mcl.item() == pytest.approx(0.70)


def test_mcl_margins_adapt_to_the_teacher_score():
    """Same student similarity, different teacher scores: the bound moves with the teacher."""
    low, high = _mcl([0.5], [0.35], [1]).mcl.item(), _mcl([0.5], [0.55], [1]).mcl.item()
    assert low == 0.0 and high == pytest.approx(0.15)
    easy, hard = _mcl([0.3], [0.5], [0]).mcl.item(), _mcl([0.3], [0.25], [0]).mcl.item()
    assert easy == 0.0 and hard == pytest.approx(0.15)


def test_mcl_keeps_the_teachers_order_within_positives():
    """Two positives the teacher ranks apart get different targets: equal student scores are not enough."""
    equal = _mcl([0.6, 0.6], [0.5, 0.8], [1, 1]).mcl.item()
    ordered = _mcl([0.6, 0.9], [0.5, 0.8], [1, 1]).mcl.item()
    assert equal > 0.0 and ordered == 0.0


def test_mcl_dual_threshold_drops_uncertain_pairs():
    """A positive below the lower bound, a negative above the upper bound: no loss, no gradient."""
    s = torch.tensor([0.0, 0.95, 0.3], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.1, 0.7, 0.5], dtype=torch.float64)  # 0.1 < θ⁺=0.2 ; 0.7 > θ⁻=0.6
    out = mcl_loss(s, t, torch.tensor([1, 0, 1]), margin=0.1, pos_threshold=0.2, neg_threshold=0.6)
    out.loss.backward()
    assert (out.kept_positives, out.kept_negatives) == (1, 0)
    assert s.grad[0].item() == 0.0 and s.grad[1].item() == 0.0 and s.grad[2].item() != 0.0


def test_mcl_pushes_positives_up_and_negatives_down():
    # Positive at 0.2 (teacher 0.5): below its bound 0.6. Negative at 0.6 (teacher 0.5): above its bound 0.4.
    # Negative at 0.2 (teacher 0.5): already below 0.4, satisfied.
    s = torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64, requires_grad=True)
    out = mcl_loss(s, torch.full((3,), 0.5, dtype=torch.float64), torch.tensor([1, 0, 0]), margin=0.1,
                   pos_threshold=0.0, neg_threshold=1.0, dist_weight=0.0)
    out.loss.backward()
    assert s.grad[0].item() < 0  # descending the loss raises the positive's similarity
    assert s.grad[1].item() > 0  # ... and lowers the violating negative's
    assert s.grad[2].item() == 0.0


def test_mcl_empty_groups_give_zero_not_nan():
    out = _mcl([0.5, 0.5], [0.0, 0.9], [1, 0])  # both filtered
    assert out.loss.item() == 0.0 and out.kept_positives == 0 and out.kept_negatives == 0


def test_mcl_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        mcl_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 2))


# ---------------------------------------------------------------- M3 self-distillation


def ref_m3(dense, sparse, multi, pos, tau, w, lam, self_distill):
    rows = dense.shape[0]
    inter = w[0] * dense + w[1] * sparse + w[2] * multi

    def nce(scores):
        return sum(-ref_log_softmax([v / tau for v in scores[i]])[pos[i]] for i in range(rows)) / rows

    def soft_ce(student, teacher):
        total = 0.0
        for i in range(rows):
            p = [math.exp(v) for v in ref_log_softmax([x / tau for x in teacher[i]])]
            logq = ref_log_softmax([x / tau for x in student[i]])
            total += -sum(a * b for a, b in zip(p, logq))
        return total / rows

    big_l = (lam[0] * nce(dense) + lam[1] * nce(sparse) + lam[2] * nce(multi) + nce(inter)) / 4
    if not self_distill:
        return big_l
    l_prime = (lam[0] * soft_ce(dense, inter) + lam[1] * soft_ce(sparse, inter) + lam[2] * soft_ce(multi, inter)) / 3
    return (big_l + l_prime) / 2


@SETTINGS
@given(
    rows=st.integers(1, 4),
    cols=st.integers(2, 6),
    tau=st.floats(0.05, 1.0),
    seed=st.integers(0, 10_000),
    self_distill=st.booleans(),
)
def test_m3_loss_matches_reference(rows, cols, tau, seed, self_distill):
    rng = np.random.default_rng(seed)
    dense, multi = rng.uniform(-1, 1, (rows, cols)), rng.uniform(-1, 1, (rows, cols))
    sparse = rng.uniform(0, 3, (rows, cols))
    pos = rng.integers(0, cols, rows)
    w, lam = (1.0, 0.3, 1.0), (1.0, 0.1, 1.0)
    out = m3_self_distillation_loss(
        torch.tensor(dense), torch.tensor(sparse), torch.tensor(multi), torch.tensor(pos),
        temperature=tau, score_weights=w, loss_weights=lam, self_distill=self_distill,
    )
    assert out["total"].item() == pytest.approx(ref_m3(dense, sparse, multi, pos, tau, w, lam, self_distill), rel=1e-9)


def test_m3_teacher_signal_is_detached():
    """s_inter is the teacher of L': the distillation term alone sends no gradient through s_inter."""
    dense = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    sparse = torch.randn(2, 3, dtype=torch.float64)
    multi = torch.randn(2, 3, dtype=torch.float64)
    out = m3_self_distillation_loss(dense, sparse, multi, torch.tensor([0, 1]), temperature=0.5)
    (g,) = torch.autograd.grad(out["self_distill"], dense)
    # Reference: d/d dense of λ1/3 · CE(softmax(inter/τ) detached, log_softmax(dense/τ)).
    p = torch.softmax(((dense + 0.3 * sparse + multi) / 0.5).detach(), -1)
    q = torch.softmax(dense.detach() / 0.5, -1)
    expected = (q - p) / 0.5 / 2 / 3
    torch.testing.assert_close(g, expected)


@SETTINGS
@given(cols=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_soft_cross_entropy_equals_kl_plus_teacher_entropy(cols, seed):
    rng = np.random.default_rng(seed)
    s, t = torch.tensor(rng.normal(size=(3, cols))), torch.tensor(rng.normal(size=(3, cols)))
    p = torch.softmax(t, -1)
    kl = (p * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    entropy = -(p * torch.log_softmax(t, -1)).sum(-1).mean()
    assert soft_cross_entropy(s, t).item() == pytest.approx((kl + entropy).item(), rel=1e-9)
