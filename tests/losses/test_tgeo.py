"""Trilateral-geometry fusion: the fused loss, the features, and the one-step hypergradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdistill.losses import CrossEntropy, ForwardKL, SparseTeacher, TrilateralFusion, build_objective
from tests.losses import reference as ref
from tests.losses.helpers import make_inputs, to_np


def test_fused_loss_is_the_ratio_mix_and_does_not_train_the_network():
    z, zt, labels = make_inputs((12, 9), seed=1, ignore_every=4)
    fusion = TrilateralFusion(kd=build_objective({"name": "forward_kl", "temperature": 2.0}))
    z = z.requires_grad_(True)
    per_token = fusion.per_token(z, zt, labels)
    a = fusion.ratio(fusion.features(z, zt, labels)).detach()
    want = a * ForwardKL(2.0).per_token(z, zt, labels) + (1 - a) * CrossEntropy().per_token(z, zt, labels)
    torch.testing.assert_close(per_token, want)
    assert torch.all(per_token[labels == -100] == 0)
    per_token.sum().backward()
    assert all(p.grad is None for p in fusion.parameters())  # the training loss never trains the ratio


def test_features_are_the_triangle_sides_and_class_mean_offsets():
    z, zt, labels = make_inputs((8, 6), seed=2)
    fusion = TrilateralFusion()
    f = fusion.features(z, zt, labels).numpy()
    q, p = ref.softmax(to_np(z)), ref.softmax(to_np(zt))
    rows = np.arange(8)
    np.testing.assert_allclose(f[:, 0], 0.5 * np.abs(q - p).sum(-1))
    np.testing.assert_allclose(f[:, 1], 1 - q[rows, labels])
    np.testing.assert_allclose(f[:, 2], 1 - p[rows, labels])
    # no class mean yet: the token's own teacher probability stands in for it
    np.testing.assert_allclose(f[:, 3], 0.0)
    np.testing.assert_allclose(f[:, 4], q[rows, labels] - p[rows, labels])
    fusion._update_class_means(torch.from_numpy(f), labels, 6)
    means = {int(y): p[labels.numpy() == y, y].mean() for y in labels.unique()}
    f2 = fusion.features(z, zt, labels).numpy()
    want_mean = np.array([means[int(y)] for y in labels])
    # the class-mean buffer is float32
    np.testing.assert_allclose(f2[:, 3], p[rows, labels] - want_mean, atol=1e-7)
    np.testing.assert_allclose(f2[:, 4], q[rows, labels] - want_mean, atol=1e-7)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_meta_loss_gradient_is_the_exact_one_step_hypergradient(with_bias, sparse):
    """Compare with autograd through an explicit SGD step of the output layer (float64)."""
    g = torch.Generator().manual_seed(0)
    n, m, h, v, lr = 30, 17, 5, 11, 0.7
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64) if with_bias else None
    teacher_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    teacher = SparseTeacher.from_logits(teacher_logits, k=4) if sparse else teacher_logits
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::6] = -100
    val_hidden = torch.randn(m, h, generator=g, dtype=torch.float64)
    val_labels = torch.randint(0, v, (m,), generator=g)
    val_labels[::5] = -100
    fusion = TrilateralFusion(kd=build_objective({"name": "jsd", "beta": 0.3}), hidden_size=4, seed=3)
    fusion.net.double()

    surrogate = fusion.meta_loss(hidden, weight, teacher, labels, val_hidden, val_labels, lr=lr, output_bias=bias,
                                 chunk_size=7, update_class_means=False)
    got = torch.autograd.grad(surrogate, fusion.parameters())

    # explicit bilevel step: W' = W - lr * grad_W mean_i[a_i KD_i + (1 - a_i) CE_i]; outer = val CE at W'
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True) if with_bias else None
    logits = hidden @ w.T + (b if with_bias else 0)
    a = fusion.ratio(fusion.features(logits.detach(), teacher, labels))
    kd = fusion.kd.per_token(logits, teacher, labels)
    ce = CrossEntropy().per_token(logits, None, labels)
    inner = (a * kd + (1 - a) * ce).sum() / (labels != -100).sum()
    params = [w] + ([b] if with_bias else [])
    inner_grads = torch.autograd.grad(inner, params, create_graph=True)
    w2 = w - lr * inner_grads[0]
    b2 = (b - lr * inner_grads[1]) if with_bias else None
    val_logits = val_hidden @ w2.T + (b2 if with_bias else 0)
    outer = CrossEntropy().per_token(val_logits, None, val_labels).sum() / (val_labels != -100).sum()
    want = torch.autograd.grad(outer, fusion.parameters())
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12)


def _meta_train(teacher_quality: str) -> float:
    """Meta-train the ratio network on a synthetic task; return the mean ratio on the training tokens."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 200, 6, 8
    true_w = torch.randn(v, h, generator=g) * 2.0
    hidden = torch.randn(n, h, generator=g)
    val_hidden = torch.randn(n, h, generator=g)
    true_p = torch.softmax(hidden @ true_w.T, -1)
    labels = torch.multinomial(true_p, 1, generator=g).squeeze(-1)
    val_labels = torch.multinomial(torch.softmax(val_hidden @ true_w.T, -1), 1, generator=g).squeeze(-1)
    if teacher_quality == "good":
        teacher = hidden @ true_w.T  # the distribution the labels come from
    else:
        teacher = torch.randn(n, v, generator=g) * 3.0  # unrelated to the labels
    weight = torch.zeros(v, h)
    fusion = TrilateralFusion(kd=build_objective("forward_kl"), seed=1)
    optimizer = torch.optim.Adam(fusion.parameters(), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        fusion.meta_loss(hidden, weight, teacher, labels, val_hidden, val_labels, lr=1.0).backward()
        optimizer.step()
    with torch.no_grad():
        return fusion.ratio(fusion.features(hidden @ weight.T, teacher, labels)).mean().item()


def test_meta_training_trusts_a_good_teacher_more_than_a_bad_one():
    """A teacher unrelated to the labels is switched off; the true distribution keeps real weight.

    (From an untrained output layer a one-step look-ahead also values the sharper label step, so the
    absolute ratio for the good teacher is not the point; the contrast is.)
    """
    good, bad = _meta_train("good"), _meta_train("bad")
    assert bad < 0.01
    assert good > bad + 0.1


def test_state_round_trip_and_builder():
    z, zt, labels = make_inputs((10, 7), seed=4)
    fusion = build_objective({"name": "tgeo", "kd": {"name": "skew_kl", "alpha": 0.2}, "hidden_size": 8, "seed": 5})
    fusion._update_class_means(fusion.features(z, zt, labels), labels, 7)
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(0.1)
    other = build_objective({"name": "tgeo", "kd": {"name": "skew_kl", "alpha": 0.2}, "hidden_size": 8, "seed": 6})
    other.load_state_dict(fusion.state_dict())
    torch.testing.assert_close(other.per_token(z, zt, labels), fusion.per_token(z, zt, labels))
    assert len(fusion.parameters()) == 4
