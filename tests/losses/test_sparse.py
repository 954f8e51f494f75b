"""Sparse (top-k + residual) teachers: completion of the missing mass, k = V equals dense, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from lmdistill.losses import ATKD, SinKD, SparseTeacher, TrilateralFusion, fused_linear_distill, build_objective, reduce_tokens
from tests.losses.helpers import CASES, make_inputs

EXTRA = [("atkd", lambda T: ATKD(temperature=T)), ("sinkd", lambda T: SinKD(temperature=T, group_size=4)),
         ("tgeo", lambda T: TrilateralFusion(kd=build_objective({"name": "forward_kl", "temperature": T})))]
ALL = [(c.id, c.build) for c in CASES] + EXTRA


@pytest.mark.parametrize("name,build", ALL, ids=[n for n, _ in ALL])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_k_equals_vocab_reproduces_dense_teacher(name, build, T):
    z, zt, labels = make_inputs((10, 12), seed=4, ignore_every=4)
    sparse = SparseTeacher.from_logits(zt, k=12, temperature=T)
    # shuffle the order of the stored entries: only (index, value) pairs may matter
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    sparse = SparseTeacher(sparse.logprobs[:, perm], sparse.indices[:, perm], sparse.residual, T)
    objective = build(T)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    dense_loss = objective.per_token(z1, zt, labels)
    sparse_loss = objective.per_token(z2, sparse, labels)
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-10, atol=1e-12)
    (g1,) = torch.autograd.grad(dense_loss.sum(), z1)
    (g2,) = torch.autograd.grad(sparse_loss.sum(), z2)
    torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-12)


def test_missing_mass_is_spread_uniformly_over_the_other_tokens():
    logprobs = torch.log(torch.tensor([[0.5, 0.2], [0.7, 0.1]], dtype=torch.float64))
    indices = torch.tensor([[3, 0], [1, 4]])
    teacher = SparseTeacher(logprobs, indices, residual=torch.tensor([0.3, 0.2], dtype=torch.float64), tail="uniform")
    # "uniform" (the default) ignores the student; "student" without a student (teacher-only statistics) falls back to it
    student = torch.log_softmax(torch.randn(2, 5, dtype=torch.float64), -1)
    dense = teacher.to_dense_log_probs(5, torch.float64, student_logp=student).exp()
    torch.testing.assert_close(SparseTeacher(logprobs, indices, teacher.residual).to_dense_log_probs(5, torch.float64, student_logp=student).exp(), dense)
    torch.testing.assert_close(SparseTeacher(logprobs, indices, teacher.residual, tail="student").to_dense_log_probs(5, torch.float64).exp(), dense)
    expected = torch.tensor([[0.2, 0.1, 0.1, 0.5, 0.1], [0.2 / 3, 0.7, 0.2 / 3, 0.2 / 3, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(dense, expected)


def test_missing_mass_follows_the_student_tail_float64_reference():
    logprobs = torch.log(torch.tensor([[0.5, 0.2], [0.7, 0.1]], dtype=torch.float64))
    indices = torch.tensor([[3, 0], [1, 4]])
    residual = torch.tensor([0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25], [0.05, 0.5, 0.3, 0.05, 0.1]], dtype=torch.float64)
    dense = SparseTeacher(logprobs, indices, residual, tail="student").to_dense_log_probs(5, torch.float64, student_logp=q.log()).exp()
    # tail of row 0 = tokens {1, 2, 4} with student mass 0.2 + 0.3 + 0.25 = 0.75; row 1 = {0, 2, 3}, 0.4
    expected = torch.tensor([[0.2, 0.3 * 0.2 / 0.75, 0.3 * 0.3 / 0.75, 0.5, 0.3 * 0.25 / 0.75],
                             [0.2 * 0.05 / 0.4, 0.7, 0.2 * 0.3 / 0.4, 0.2 * 0.05 / 0.4, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(dense, expected)
    # a student with no mass outside the teacher's top-k (or -inf padding rows) gets the uniform shape;
    # a student token at -inf (vocabulary padding) gets no teacher mass
    q0 = torch.tensor([[0.4, 0.0, 0.0, 0.6, 0.0]], dtype=torch.float64)  # all its mass on the top-k {3, 0}
    got = SparseTeacher(logprobs[:1], indices[:1], residual[:1], tail="student").to_dense_log_probs(5, torch.float64, student_logp=q0.log()).exp()
    torch.testing.assert_close(got, torch.tensor([[0.2, 0.1, 0.1, 0.5, 0.1]], dtype=torch.float64))
    qpad = torch.tensor([[0.1, 0.0, 0.3, 0.15, 0.45]], dtype=torch.float64)
    got = SparseTeacher(logprobs[:1], indices[:1], residual[:1], tail="student").to_dense_log_probs(5, torch.float64, student_logp=qpad.log()).exp()
    torch.testing.assert_close(got, torch.tensor([[0.2, 0.0, 0.3 * 0.3 / 0.75, 0.5, 0.3 * 0.45 / 0.75]], dtype=torch.float64))


BUCKET_CASES = [c for c in CASES if c.needs_teacher and c.id != "taid_ce"]


@pytest.mark.parametrize("case", BUCKET_CASES, ids=[c.id for c in BUCKET_CASES])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_student_tail_is_the_top_k_plus_one_bucket_divergence(case, T):
    """With the student-shaped tail, every f-divergence equals the divergence between the two distributions
    coarse-grained to k + 1 categories (top-k tokens + one bucket for the rest), in value (against the float64
    reference of the formula) and in gradient w.r.t. the student logits (plain and chunked paths)."""
    n, vocab, k = 12, 15, 4
    z, zt, labels = make_inputs((n, vocab), seed=11, ignore_every=5)
    teacher = SparseTeacher.from_logits(zt, k=k, temperature=T, tail="student")
    objective = case.build(T)

    def coarse(logp: Tensor, rest: Tensor) -> Tensor:  # [N, k + 1] log-probabilities
        return torch.cat([logp.gather(-1, teacher.indices), rest.unsqueeze(-1)], -1)

    z_ref = z.clone().requires_grad_(True)
    s_logp = torch.log_softmax(z_ref / T, -1)
    s_rest = torch.logsumexp(s_logp.scatter(-1, teacher.indices, float("-inf")), -1)
    s_coarse = coarse(s_logp, s_rest)
    t_coarse = torch.cat([teacher.logprobs, teacher.residual.log().unsqueeze(-1)], -1)
    # coarse log-probabilities times T are logits whose softmax at temperature T is the coarse distribution
    expected_value = case.reference(s_coarse.detach() * T, t_coarse * T, labels, T)
    expected = objective.per_token(s_coarse * T, t_coarse * T, labels)
    (expected_grad,) = torch.autograd.grad(expected.sum(), z_ref)

    z_sparse = z.clone().requires_grad_(True)
    got = case.build(T).per_token(z_sparse, teacher, labels)
    np.testing.assert_allclose(got.detach().numpy(), np.asarray(expected_value), rtol=1e-9, atol=1e-12)
    (got_grad,) = torch.autograd.grad(got.sum(), z_sparse)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-8, atol=1e-12)

    hidden = torch.randn(n, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    plain = reduce_tokens(case.build(T).per_token(hidden @ weight.T, teacher, labels), labels)
    fused = fused_linear_distill(hidden, weight, teacher, labels, case.build(T), chunk_size=5)
    torch.testing.assert_close(fused, plain)
    for a, b in zip(torch.autograd.grad(fused, [hidden, weight]), torch.autograd.grad(plain, [hidden, weight])):
        torch.testing.assert_close(a, b)


def test_residual_defaults_to_one_minus_covered_mass_and_rounding_is_renormalised():
    covered = torch.log(torch.tensor([[0.6, 0.3]], dtype=torch.float64))
    dense = SparseTeacher(covered, torch.tensor([[0, 1]])).to_dense_log_probs(4, torch.float64).exp()
    torch.testing.assert_close(dense, torch.tensor([[0.6, 0.3, 0.05, 0.05]], dtype=torch.float64))
    # fp16 rounding: stored probabilities sum slightly above 1 with residual 0 -> renormalised, tail 0
    over = torch.log(torch.tensor([[0.7, 0.31]], dtype=torch.float64))
    dense = SparseTeacher(over, torch.tensor([[2, 0]]), residual=torch.zeros(1, dtype=torch.float64)).to_dense_log_probs(3, torch.float64).exp()
    torch.testing.assert_close(dense, torch.tensor([[0.31 / 1.01, 0.0, 0.7 / 1.01]], dtype=torch.float64))


def test_from_logits_residual_is_the_exact_tail_mass():
    z, zt, _ = make_inputs((5, 20), seed=2)
    teacher = SparseTeacher.from_logits(zt, k=6, temperature=1.5)
    p = torch.softmax(zt / 1.5, -1)
    top = torch.topk(p, 6, -1)
    torch.testing.assert_close(teacher.logprobs.exp(), top.values)
    torch.testing.assert_close(teacher.residual, 1 - top.values.sum(-1))
    # completion keeps the top-k exactly and spreads the rest evenly
    dense = teacher.to_dense_log_probs(20, torch.float64).exp()
    torch.testing.assert_close(dense.gather(-1, top.indices), top.values)
    torch.testing.assert_close(dense.sum(-1), torch.ones(5, dtype=torch.float64))


def test_topk_objectives_are_finite_and_zero_residual_gives_inf_reverse_kl():
    from lmdistill.losses import ForwardKL, ReverseKL

    z, zt, labels = make_inputs((4, 10), seed=9)
    teacher = SparseTeacher.from_logits(zt, k=3)
    assert torch.isfinite(ReverseKL().per_token(z, teacher, labels)).all()
    no_tail = SparseTeacher(teacher.logprobs, teacher.indices, torch.zeros(4, dtype=torch.float64))
    assert torch.isfinite(ForwardKL().per_token(z, no_tail, labels)).all()
    assert torch.isinf(ReverseKL().per_token(z, no_tail, labels)).all()  # q > 0 where p = 0


def test_sparse_teacher_through_the_chunked_path():
    z, zt, labels = make_inputs((30, 16), seed=3, ignore_every=5)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = SparseTeacher.from_logits(zt, k=5, temperature=2.0)
    from lmdistill.losses import GeneralizedJSD

    objective = GeneralizedJSD(0.5, temperature=2.0)
    plain = reduce_tokens(objective.per_token(hidden @ weight.T, teacher, labels), labels)
    grads = torch.autograd.grad(plain, [hidden, weight])
    fused = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=7)
    fused_grads = torch.autograd.grad(fused, [hidden, weight])
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, grads):
        torch.testing.assert_close(a, b)


def test_errors_name_the_problem():
    from lmdistill.losses import ForwardKL

    z, zt, labels = make_inputs((3, 6))
    teacher = SparseTeacher.from_logits(zt, k=2, temperature=2.0)
    with pytest.raises(ValueError, match="temperature 2.0 but the objective uses temperature 1.0"):
        ForwardKL().per_token(z, teacher, labels)
    with pytest.raises(ValueError, match="same shape"):
        SparseTeacher(torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.long))
    bad = SparseTeacher(torch.zeros(3, 2), torch.tensor([[0, 9]] * 3))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 6\)"):
        ForwardKL().per_token(z, bad, labels)
    with pytest.raises(ValueError, match="sparse teacher has 3 rows but the student has 2"):
        ForwardKL().per_token(z[:2], teacher, labels[:2])
    assert math.isclose(float(teacher.logprobs.exp().sum(-1)[0] + teacher.residual[0]), 1.0, rel_tol=1e-9)
