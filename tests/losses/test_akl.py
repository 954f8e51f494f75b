"""AKL (arXiv 2404.02657) against a float64 reference from the paper's rule, its invariants, and its chunked path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lmdistill.losses import ForwardKL, ReverseKL, SparseTeacher
from lmdistill.losses.akl import AdaptiveKL, akl_head_mask, akl_weights
from lmdistill.losses.core import Workspace
from tests.losses import logit_refs as ref
from tests.losses.helpers import make_inputs


@pytest.mark.parametrize("mu,T", [(0.5, 1.0), (0.2, 1.0), (0.9, 2.0), (0.5, 0.7)])
@pytest.mark.parametrize("shape,ignore", [((17, 11), 0), ((3, 6, 9), 4)])
def test_value_and_gradient_match_the_papers_rule(mu, T, shape, ignore):
    z, zt, labels = make_inputs(shape, seed=4, ignore_every=ignore)
    leaf = z.clone().requires_grad_(True)
    got = AdaptiveKL(mu=mu, temperature=T).per_token(leaf, zt, labels)
    flat = labels.reshape(-1).numpy()
    want, want_grad = ref.akl(z.reshape(-1, shape[-1]).numpy(), zt.reshape(-1, shape[-1]).numpy(), flat, mu, T)
    np.testing.assert_allclose(got.detach().reshape(-1).numpy(), want, rtol=1e-10, atol=1e-13)
    (grad,) = torch.autograd.grad(got.sum(), leaf)
    np.testing.assert_allclose(grad.reshape(-1, shape[-1]).numpy(), want_grad, rtol=1e-9, atol=1e-13)


def test_head_mask_is_applied_in_the_sorted_order():
    """A teacher whose likely tokens are not first in vocabulary order: the mask built on sorted probabilities
    must weigh sorted gaps. The mis-ordered variant gives another value on this input."""
    zt = torch.tensor([[3.0, 2.0, -3.0, -3.0, -2.0]], dtype=torch.float64)  # the head is ids 0 and 1
    z = torch.tensor([[0.5, 3.0, -1.0, -3.0, -3.0]], dtype=torch.float64)
    got = AdaptiveKL().per_token(z, zt, None).numpy()
    want, _ = ref.akl(z.numpy(), zt.numpy(), None)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert abs(ref.akl_mask_on_unsorted(z.numpy(), zt.numpy())[0] - want[0]) > 0.1


def test_weights_follow_the_gaps():
    """The weights are the shares of |p - q| in the head and the tail (the head is the first sorted token when
    it alone exceeds mu); with all of the error in the tail AKL is reverse KL."""
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q_even = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    w_head, w_tail = akl_weights(q_even.log(), p.log(), 0.5)  # head = {0}: gaps 0.1 (head), 0.1 + 0 (tail)
    assert (w_head.item(), w_tail.item()) == pytest.approx((0.5, 0.5))
    q_tail = torch.tensor([[0.7, 0.1, 0.2]], dtype=torch.float64)
    w_head, w_tail = akl_weights(q_tail.log(), p.log(), 0.5)
    assert (w_head.item(), w_tail.item()) == pytest.approx((0.0, 1.0))
    z, zt = q_tail.log(), p.log()
    torch.testing.assert_close(AdaptiveKL().per_token(z, zt, None), ReverseKL().per_token(z, zt, None))
    # teacher [0.7, 0.1, 0.2] sorted is ids 0, 2, 1: gaps 0.2 (head), 0.1 + 0.1 (tail)
    q_first = torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)
    w_head, _ = akl_weights(q_first.log(), torch.tensor([[0.7, 0.1, 0.2]], dtype=torch.float64).log(), 0.5)
    assert w_head.item() == pytest.approx(0.5)
    same = akl_weights(p.log(), p.log(), 0.5)
    assert (same[0].item(), same[1].item()) == (0.5, 0.5)


def test_padded_vocabulary_and_sparse_teacher():
    z, zt, labels = make_inputs((10, 12), seed=8)
    z[:, -3:] = -math.inf
    zt[:, -3:] = -math.inf
    got = AdaptiveKL().per_token(z, zt, labels)
    want, _ = ref.akl(z[:, :-3].numpy(), zt[:, :-3].numpy(), labels.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-13)
    # a top-k cache with k = V is the dense teacher
    z, zt, labels = make_inputs((10, 7), seed=9)
    full = SparseTeacher.from_logits(zt, k=7)
    torch.testing.assert_close(AdaptiveKL().per_token(z, full, labels), AdaptiveKL().per_token(z, zt, labels))


def _head_by_full_sort(p: torch.Tensor, mu: float) -> torch.Tensor:
    """The head rule read off a stable descending sort of the whole row (the official code's order)."""
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    head = torch.cumsum(p_sorted, dim=-1) <= mu
    head[:, 0] = True
    return torch.zeros_like(head).scatter_(-1, order, head)


@settings(max_examples=120, deadline=None)
@given(rows=st.integers(1, 5), v=st.sampled_from([3, 64, 65, 300]), levels=st.integers(0, 5),
       spread=st.floats(0.0, 15.0), mu=st.floats(0.01, 0.99),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_head_mask_is_the_full_sorts(rows, v, levels, spread, mu, dtype, seed):
    """The top-k head equals the one read off a full stable sort, token for token: logits on a few levels give
    many equal probabilities at the head's boundary (taken in vocabulary order), a small spread gives rows
    too flat for the top 64 to reach mu (sorted fully), a large one rows whose head is one token."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels + 1, (rows, v), generator=g).double() * (spread / max(levels, 1))
    p = torch.softmax(logits, dim=-1).to(dtype)
    assert torch.equal(akl_head_mask(p, mu), _head_by_full_sort(p, mu))


def test_flat_and_peaked_rows_of_a_large_vocabulary_match_the_papers_rule():
    """Rows whose head needs more than the 64 top-k candidates (near-uniform teachers over 500 tokens) and
    rows whose head is a few tokens, in one batch: values and gradients against the float64 reference."""
    z, zt, labels = make_inputs((12, 500), seed=21, scale=3.0)
    zt[::3] *= 0.01  # every third row nearly uniform: the top 64 hold about 13% of the mass
    zt[1::3] *= 10.0
    p = torch.softmax(zt, dim=-1)
    assert torch.topk(p, 64).values.sum(-1).lt(0.5).sum().item() == 4
    for mu in (0.1, 0.5, 0.9):
        leaf = z.clone().requires_grad_(True)
        got = AdaptiveKL(mu=mu).per_token(leaf, zt, labels)
        want, want_grad = ref.akl(z.numpy(), zt.numpy(), labels.numpy(), mu)
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-13)
        (grad,) = torch.autograd.grad(got.sum(), leaf)
        np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-9, atol=1e-13)


logit_rows = st.integers(1, 4).flatmap(
    lambda n: st.integers(2, 9).flatmap(
        lambda v: st.tuples(*[arrays(np.float64, (n, v), elements=st.floats(-20, 20))] * 2)
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logit_rows, st.floats(0.05, 0.95))
def test_invariants(pair, mu):
    z, zt = (torch.from_numpy(a) for a in pair)
    objective = AdaptiveKL(mu=mu)
    values = objective.per_token(z, zt, None)
    assert values.min().item() >= -1e-12
    assert objective.per_token(zt, zt, None).abs().max().item() <= 1e-12
    # a convex combination of forward and reverse KL
    hi = torch.maximum(ForwardKL().per_token(z, zt, None), ReverseKL().per_token(z, zt, None))
    assert torch.all(values <= hi + 1e-9)
    # rows are independent: reversing their order reverses the values
    torch.testing.assert_close(objective.per_token(z.flip(0), zt.flip(0), None), values.flip(0))
    # an ignored row is 0 and leaves the others unchanged
    labels = torch.zeros(z.shape[0], dtype=torch.long)
    labels[0] = -100
    masked = objective.per_token(z, zt, labels)
    assert masked[0].item() == 0.0
    torch.testing.assert_close(masked[1:], values[1:])


@pytest.mark.parametrize("variant", ["plain", "masked", "padded_vocab", "peaked"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_chunk_kernel_matches_autograd(variant, T):
    z, zt, labels = make_inputs((16, 12), seed=31, ignore_every=3 if variant == "masked" else 0,
                                scale=30.0 if variant == "peaked" else 3.0)
    if variant == "padded_vocab":
        z[:, -2:] = -math.inf
        zt[:, -2:] = -math.inf
    objective = AdaptiveKL(temperature=T, scale_by_t2=True)
    ws = Workspace(16, 12, torch.float64, torch.device("cpu"))
    ws.start_chunk(16)
    loss, grad = objective.chunk_value_and_grad(z.clone(), zt, labels, ws)
    leaf = z.clone().requires_grad_(True)
    want = objective.per_token(leaf, zt, labels)
    (want_grad,) = torch.autograd.grad(want.sum(), leaf)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("teacher_kind,chunk", [("logits", 1), ("logits", 7), ("hidden", 5), ("sparse", 8)])
def test_chunked_path_equals_plain(teacher_kind, chunk):
    ref.chunked_matches_plain(AdaptiveKL(mu=0.4, temperature=1.5), teacher_kind=teacher_kind, chunk=chunk, seed=2)


def test_float32_and_bfloat16_teacher_agree_with_float64():
    z, zt, labels = make_inputs((20, 30), seed=12)
    want = AdaptiveKL().per_token(z, zt, labels)
    got32 = AdaptiveKL().per_token(z.float(), zt.float(), labels)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-4, atol=1e-6)
    rounded = zt.bfloat16()
    got_bf16 = AdaptiveKL().per_token(z.float(), rounded, labels)
    torch.testing.assert_close(got_bf16.double(), AdaptiveKL().per_token(z, rounded.double(), labels), rtol=1e-4, atol=1e-6)


def test_bad_parameters_are_refused():
    for mu in (0.0, 1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"mu must be a number in \(0, 1\)"):
            AdaptiveKL(mu=mu)
