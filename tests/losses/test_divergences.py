"""Token-level objectives against independent float64 references, gradients, invariants and numerics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lmdistill.losses import (
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    TotalVariation,
    decoupled_kd_parts,
    reduce_tokens,
)
from lmdistill.losses.core import Workspace
from tests.losses.helpers import CASE_IDS, CASES, make_inputs, to_np, variant_inputs

SHAPES = [(1, 2), (7, 5), (16, 33), (2, 3, 6)]
TEMPERATURES = [0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_matches_float64_reference(case, shape, T):
    z, zt, labels = make_inputs(shape, seed=hash((case.id, shape, T)) % 1000, ignore_every=3)
    objective = case.build(T)
    got = objective.per_token(z, zt, labels)
    assert got.shape == labels.shape and got.dtype == torch.float64
    want = case.reference(to_np(z), to_np(zt), labels.reshape(-1).numpy(), T)
    np.testing.assert_allclose(got.reshape(-1).numpy(), want, rtol=1e-10, atol=1e-12)
    assert torch.all(got[labels == -100] == 0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_extreme_logits_float64(case, scale):
    """Peaked distributions (probabilities down to ~1e-250) still match the reference."""
    z, zt, labels = make_inputs((6, 9), scale=scale, seed=7)
    got = case.build(1.0).per_token(z, zt, labels)
    want = case.reference(to_np(z), to_np(zt), labels.numpy(), 1.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_inputs_close_to_reference(case):
    z, zt, labels = make_inputs((12, 40), scale=4.0, seed=3, ignore_every=4)
    got = case.build(2.0).per_token(z.float(), zt.float(), labels)
    assert got.dtype == torch.float32
    want = case.reference(to_np(z.float()), to_np(zt.float()), labels.numpy(), 2.0)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(case, dtype):
    z, zt, labels = make_inputs((8, 30), seed=5)
    z, zt = z.to(dtype), zt.to(dtype)
    got = case.build(1.0).per_token(z, zt, labels)
    assert got.dtype == torch.float32
    want = case.reference(to_np(z), to_np(zt), labels.numpy(), 1.0)  # reference on the same rounded values
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if not c.detached_target], ids=[c.id for c in CASES if not c.detached_target])
def test_gradcheck(case):
    z, zt, labels = make_inputs((4, 6), seed=11, ignore_every=3)
    objective = case.build(1.5)
    z = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: objective.per_token(x, zt, labels), (z,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", [c for c in CASES if c.detached_target], ids=[c.id for c in CASES if c.detached_target])
def test_taid_gradient_is_student_minus_target(case):
    """TAID's target uses sg(z_S): d loss / dz = (q - p_t) / T exactly (finite differences would also move the target)."""
    T = 1.5
    z, zt, labels = make_inputs((5, 7), seed=12)
    objective = case.build(T)
    z = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective.per_token(z, zt, labels).sum(), z)
    t = objective.t
    q = torch.softmax(z.detach() / T, -1)
    target = torch.softmax((1 - t) * z.detach() / T + t * zt / T, -1)
    torch.testing.assert_close(grad, (q - target) / T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES], ids=CASE_IDS)
@pytest.mark.parametrize("variant", ["plain", "masked", "padded_vocab", "peaked"])
def test_chunk_kernel_matches_autograd(case, variant):
    """The analytic per-chunk (loss, d loss/dz) equals per_token and its autograd gradient."""
    objective = case.build(2.0)
    if not objective.has_chunk_kernel():
        pytest.skip("no analytic kernel (chunked path uses autograd)")
    z, zt, labels = variant_inputs((9, 13), variant, seed=21, ignore_every=2, pad=3)
    ws = Workspace(9, 13, torch.float64, torch.device("cpu"))
    ws.start_chunk(9)
    loss, grad = objective.chunk_value_and_grad(z.clone(), zt, labels, ws)
    leaf = z.clone().requires_grad_(True)
    want = objective.per_token(leaf, zt, labels)
    (want_grad,) = torch.autograd.grad(want.sum(), leaf)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_padded_vocabulary_masked_with_minus_inf(case):
    """Padding columns at -inf in both (how the trainer masks padded vocabularies) change nothing."""
    z, zt, labels = make_inputs((6, 10), seed=8)
    pad = torch.full((6, 4), -math.inf, dtype=torch.float64)
    objective = case.build(1.5)
    z_pad = torch.cat([z, pad], -1).requires_grad_(True)
    got = objective.per_token(z_pad, torch.cat([zt, pad], -1), labels)
    z_real = z.clone().requires_grad_(True)
    want = objective.per_token(z_real, zt, labels)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_pad,) = torch.autograd.grad(got.sum(), z_pad)
    (g_real,) = torch.autograd.grad(want.sum(), z_real)
    assert torch.isfinite(g_pad).all()
    torch.testing.assert_close(g_pad[:, :10], g_real)
    assert torch.all(g_pad[:, 10:] == 0)


def test_output_dtype_promotes_to_float64():
    z, zt, labels = make_inputs((3, 5))
    assert ForwardKL().per_token(z.float(), zt, labels).dtype == torch.float64
    assert ForwardKL().per_token(z.bfloat16(), zt.float(), labels).dtype == torch.float32


def test_all_ignored_reduces_to_zero_with_gradient():
    z, zt, _ = make_inputs((4, 5))
    labels = torch.full((4,), -100)
    z = z.requires_grad_(True)
    loss = reduce_tokens(ForwardKL().per_token(z, zt, labels), labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(z.grad == 0)


# --- bf16 teacher with an fp32 student --------------------------------------------------------------------

@pytest.mark.parametrize("objective", [ForwardKL(), ReverseKL(), GeneralizedJSD(0.5), GeneralizedJSD(0.1), SkewKL(0.1), SkewReverseKL(0.1), TotalVariation()], ids=repr)
def test_bf16_teacher_fp32_student_no_negative_divergence(objective):
    g = torch.Generator().manual_seed(0)
    teacher = (torch.randn(512, 3000, generator=g) * 4).bfloat16()
    # the student equals the teacher's (rounded) logits exactly: every divergence must be ~0, not negative
    same = objective.per_token(teacher.float(), teacher, None)
    assert same.abs().max().item() < 1e-6
    # and close students never go below zero beyond float32 rounding
    student = teacher.float() + 0.01 * torch.randn(512, 3000, generator=g)
    values = objective.per_token(student, teacher, None)
    assert values.min().item() > -1e-6


# --- invariants (hypothesis) ---------------------------------------------------------------------------------

logit_rows = st.integers(1, 4).flatmap(
    lambda n: st.integers(2, 9).flatmap(
        lambda v: st.tuples(
            arrays(np.float64, (n, v), elements=st.floats(-30, 30)),
            arrays(np.float64, (n, v), elements=st.floats(-30, 30)),
        )
    )
)
DIVERGENCES = [ForwardKL(), ReverseKL(), GeneralizedJSD(0.3), GeneralizedJSD(0.5), TotalVariation(), SkewKL(0.1), SkewReverseKL(0.1), ForwardKL(3.0), GeneralizedJSD(0.7, 0.5)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logit_rows)
def test_divergences_nonnegative_and_zero_on_equal(pair):
    z, zt = (torch.from_numpy(a) for a in pair)
    for objective in DIVERGENCES:
        assert objective.per_token(z, zt, None).min().item() >= -1e-12, objective
        assert objective.per_token(z, z, None).abs().max().item() <= 1e-12, objective


@settings(max_examples=60, deadline=None)
@given(logit_rows)
def test_known_inequalities_and_symmetries(pair):
    z, zt = (torch.from_numpy(a) for a in pair)
    fkl = ForwardKL().per_token(z, zt, None)
    tvd = TotalVariation().per_token(z, zt, None)
    assert torch.all(tvd <= 1 + 1e-12)
    torch.testing.assert_close(tvd, TotalVariation().per_token(zt, z, None))
    assert torch.all(fkl >= 2 * tvd**2 - 1e-9)  # Pinsker
    torch.testing.assert_close(GeneralizedJSD(0.5).per_token(z, zt, None), GeneralizedJSD(0.5).per_token(zt, z, None))
    assert torch.all(GeneralizedJSD(0.5).per_token(z, zt, None) <= math.log(2) + 1e-12)
    # skew KL interpolates: alpha = 0 is forward KL; skew reverse KL at alpha = 0 is reverse KL
    torch.testing.assert_close(SkewKL(0.0).per_token(z, zt, None), fkl)
    torch.testing.assert_close(SkewReverseKL(0.0).per_token(z, zt, None), ReverseKL().per_token(z, zt, None))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda n: st.integers(2, 9).flatmap(
            lambda v: st.tuples(*[arrays(np.float64, (n, v), elements=st.floats(-5, 5))] * 2)
        )
    )
)
def test_jsd_limits_are_the_kls(pair):
    """JSD(beta)/beta -> KL(p||q) as beta -> 0 and JSD(beta)/(1-beta) -> KL(q||p) as beta -> 1.

    The next term is O(beta * chi^2), and chi^2 <= e^(logit range) here, so beta = 1e-8 leaves < 1e-3.
    """
    z, zt = (torch.from_numpy(a) for a in pair)
    fkl = ForwardKL().per_token(z, zt, None)
    rkl = ReverseKL().per_token(z, zt, None)
    low, high = 1e-8, 1 - 1e-8
    torch.testing.assert_close(GeneralizedJSD(low).per_token(z, zt, None) / low, fkl, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(GeneralizedJSD(high).per_token(z, zt, None) / (1 - high), rkl, rtol=1e-3, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(logit_rows, st.data())
def test_forward_kl_decomposes_into_target_and_non_target(pair, data):
    """KL(p||q) = TKD + (1 - p_y) DKD, the decomposition ATKD builds on."""
    z, zt = (torch.from_numpy(a) for a in pair)
    n, v = z.shape
    labels = torch.tensor(data.draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)))
    s_logp, t_logp = torch.log_softmax(z, -1), torch.log_softmax(zt, -1)
    tkd, dkd, uncertainty = decoupled_kd_parts(s_logp, t_logp, labels)
    p_gold = t_logp.exp().gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(uncertainty, 1 - p_gold)
    torch.testing.assert_close(tkd + uncertainty * dkd, ForwardKL().per_token(z, zt, None), rtol=1e-9, atol=1e-9)
