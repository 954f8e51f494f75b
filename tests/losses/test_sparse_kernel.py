"""The sparse forward-KL kernel (student-shaped tail, no dense teacher) equals the dense completion."""

from __future__ import annotations

import pytest
import torch

from lmdistill.losses import ForwardKL, SparseTeacher
from lmdistill.losses.core import Workspace, sparse_forward_kl_chunk
from tests.losses.helpers import make_inputs


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_forward_kl_kernel_equals_the_dense_completion(T, dtype):
    n, vocab, k = 40, 50, 6
    z, zt, labels = make_inputs((n, vocab), seed=5)
    z = z.to(dtype)
    z[3] *= 30  # a confident row: its tail mass is below 1e-3 and is summed directly
    teacher = SparseTeacher.from_logits(zt, k, temperature=T, tail="student")
    if dtype == torch.float32:  # what a cache gives: float16 log-probs, float32 residual
        teacher = SparseTeacher(teacher.logprobs.half(), teacher.indices, teacher.residual.float(), T, "student")
    ws = Workspace(n, vocab, dtype, z.device)
    ws.start_chunk(n)
    got = sparse_forward_kl_chunk(z, teacher, T, ws)
    z_ref = z.clone().requires_grad_(True)
    ref = ForwardKL(T).per_token(z_ref, teacher, labels)
    (ref_grad,) = torch.autograd.grad(ref.sum(), z_ref)
    loss, grad = got
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(loss, ref.detach(), **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)


def test_other_tails_and_full_vocabulary_use_the_dense_path():
    z, zt, _ = make_inputs((4, 10), seed=1)
    ws = Workspace(4, 10, torch.float64, z.device)
    ws.start_chunk(4)
    assert sparse_forward_kl_chunk(z, SparseTeacher.from_logits(zt, 3, tail="uniform"), 1.0, ws) is None
    assert sparse_forward_kl_chunk(z, SparseTeacher.from_logits(zt, 10, tail="student"), 1.0, ws) is None


def test_a_student_with_no_mass_outside_the_top_k_falls_back_to_the_dense_path():
    z, zt, _ = make_inputs((3, 12), seed=2)
    teacher = SparseTeacher.from_logits(zt, 4, tail="student")
    z[1, :] = -1e4
    z[1, teacher.indices[1, 0]] = 0.0  # all of row 1's mass on a top-k token: its tail underflows to 0
    ws = Workspace(3, 12, torch.float64, z.device)
    ws.start_chunk(3)
    assert sparse_forward_kl_chunk(z, teacher, 1.0, ws) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_entries_of_probability_zero_and_no_residual_a_sampled_cache(dtype):
    """A sampled cache stores draw counts (log(c / k)), -inf for filler ids that were not drawn, no residual."""
    n, vocab, k = 6, 20, 5
    z, _, labels = make_inputs((n, vocab), seed=8)
    z = z.to(dtype)
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    counts = torch.tensor([[3, 2, 0, 0, 0], [5, 0, 0, 0, 0], [1, 1, 1, 1, 1], [2, 2, 1, 0, 0], [4, 1, 0, 0, 0], [3, 1, 1, 0, 0]])
    # the default (uniform) tail: with no residual every tail shape gives the tail probability 0
    teacher = SparseTeacher(torch.log(counts.double() / k).to(dtype), indices, torch.zeros(n, dtype=dtype))
    ws = Workspace(n, vocab, dtype, z.device)
    ws.start_chunk(n)
    loss, grad = sparse_forward_kl_chunk(z, teacher, 1.0, ws)
    p = torch.zeros(n, vocab, dtype=torch.float64).scatter_(1, indices, counts.double() / k)
    q = torch.softmax(z.double(), -1)
    expected = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros((), dtype=torch.float64)).sum(-1)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(loss.double(), expected, **tol)
    torch.testing.assert_close(grad.double(), q - p, **tol)
