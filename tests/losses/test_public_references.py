"""Against public implementations: TRL's generalized JSD (GKD) and POT's Sinkhorn (test-only deps)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import ot
import pytest
import torch

from lmdistill.losses import GeneralizedJSD, SinKD, fused_linear_distill, reduce_tokens
from tests.losses.helpers import make_inputs

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDTrainer


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_generalized_jsd_matches_trl(beta, T, dtype):
    z, zt, labels = make_inputs((3, 11, 17), seed=int(beta * 10), ignore_every=5, dtype=dtype)
    trl = GKDTrainer.generalized_jsd_loss(z, zt, labels=labels, beta=beta, temperature=T)
    ours = reduce_tokens(GeneralizedJSD(beta, T).per_token(z, zt, labels), labels)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, trl, **tol)
    # TRL's global-normaliser mode is the same reduction as ours with a normaliser
    trl_global = GKDTrainer.generalized_jsd_loss(z, zt, labels=labels, beta=beta, temperature=T, num_items_in_batch=1000)
    torch.testing.assert_close(reduce_tokens(GeneralizedJSD(beta, T).per_token(z, zt, labels), labels, 1000), trl_global, **tol)


def test_generalized_jsd_gradients_match_trl_through_the_chunked_path():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(19, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(40, 19, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 19, (40,), generator=g)
    labels[::3] = -100
    trl = GKDTrainer.generalized_jsd_loss((hidden @ weight.T)[None], teacher[None], labels=labels[None], beta=0.5, temperature=1.5)
    want = torch.autograd.grad(trl, [hidden, weight])
    ours = fused_linear_distill(hidden, weight, teacher, labels, GeneralizedJSD(0.5, 1.5), chunk_size=9)
    got = torch.autograd.grad(ours, [hidden, weight])
    torch.testing.assert_close(ours, trl)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_sinkd_converged_value_matches_pot(eps):
    z, zt, labels = make_inputs((9, 25), seed=3)
    objective = SinKD(temperature=2.0, epsilon=eps, iterations=3000, group_size=None)
    ours = reduce_tokens(objective.per_token(z, zt, labels), labels).item()
    ps = torch.softmax(z / 2, -1).numpy()
    pt = torch.softmax(zt / 2, -1).numpy()
    cost = np.abs(ps[:, None] - pt[None]).sum(-1)
    a = np.full(9, 1 / 9)
    pot = float(ot.sinkhorn2(a, a, cost, reg=eps, numItermax=100000, stopThr=1e-15))
    assert ours == pytest.approx(pot, rel=1e-9)
