"""The analytic chunk kernels of ATKD and SinKD, and every kernel on float32 inputs whose probabilities
underflow, against ``per_token`` differentiated with autograd (the plain path)."""

from __future__ import annotations

import math

import pytest
import torch

from lmdistill.losses import ATKD, SinKD
from lmdistill.losses.core import Workspace
from tests.losses.helpers import CASES, make_inputs, variant_inputs


def kernel(objective, z, zt, labels):
    ws = Workspace(z.shape[0], z.shape[1], z.dtype, torch.device("cpu"))
    ws.start_chunk(z.shape[0])
    loss, grad = objective.chunk_value_and_grad(z.clone(), zt, labels, ws)
    return loss.clone(), grad.clone()


def autograd(objective, z, zt, labels):
    leaf = z.clone().requires_grad_(True)
    want = objective.per_token(leaf, zt, labels)
    (grad,) = torch.autograd.grad(want.sum(), leaf)
    return want.detach(), grad


@pytest.mark.parametrize("variant", ["plain", "masked", "padded_vocab", "peaked", "gold_near_one", "gold_certain"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_atkd_kernel_matches_autograd(variant, temperature):
    z, zt, labels = variant_inputs((16, 40), variant, seed=31, ignore_every=3, pad=5)
    if variant == "padded_vocab":
        labels = labels.clamp(max=30)
    rows = torch.arange(0, 16, 2)
    if variant == "gold_near_one":  # 1 - p_y around 1e-4: the non-gold mass must be summed, not 1 - p_y
        z[rows, labels[rows]] += 8.0 * temperature
        zt[rows, labels[rows]] += 14.0 * temperature
    if variant == "gold_certain":  # the non-gold probabilities underflow: the log-space fallback
        z[rows, labels[rows]] += 400.0 * temperature
        zt[rows, labels[rows]] += 800.0 * temperature
    objective = ATKD(temperature=temperature)
    loss, grad = kernel(objective, z, zt, labels)
    want, want_grad = autograd(objective, z, zt, labels)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-12)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("rows,group", [(16, 4), (14, 4), (9, 9), (5, 8)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sinkd_kernel_matches_autograd(rows, group, temperature):
    """Whole blocks, a partial last block and masked rows: the kernel equals autograd through cdist."""
    z, zt, labels = make_inputs((rows, 30), seed=rows + group, ignore_every=3)
    objective = SinKD(temperature=temperature, group_size=group, iterations=15)
    loss, grad = kernel(objective, z, zt, labels)
    want, want_grad = autograd(objective, z, zt, labels)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-12)


def test_sinkd_without_groups_has_no_kernel():
    assert not SinKD(group_size=None).has_chunk_kernel()
    assert SinKD(group_size=8).has_chunk_kernel()


KERNEL_CASES = [c for c in CASES if c.build(1.0).has_chunk_kernel()]
BUILDERS = [(c.id, c.build) for c in KERNEL_CASES] + [
    ("atkd", lambda T: ATKD(temperature=T)),
    ("sinkd", lambda T: SinKD(temperature=T, group_size=5)),
]


@pytest.mark.parametrize("name,build", BUILDERS, ids=[name for name, _ in BUILDERS])
def test_float32_kernels_with_underflowing_probabilities(name, build):
    """float32 logits spread over ~300 nats (most probabilities underflow to 0 or are denormal) and -inf
    vocabulary padding: every kernel stays finite and matches the float32 plain path (the same rounded
    log-probabilities, and for ATKD the same easy/hard split: many uncertainties tie at 1 in float32)."""
    z, zt, labels = make_inputs((10, 50), seed=41, scale=60.0)
    z[:, -4:] = -math.inf
    zt[:, -4:] = -math.inf
    labels = labels.clamp(max=40)
    objective = build(1.0)
    loss, grad = kernel(objective, z.float(), zt.float(), labels)
    want, want_grad = autograd(objective, z.float(), zt.float(), labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-4)
