"""MiniLLM's policy-gradient reverse KL (arXiv 2306.08543): the surrogate's gradient against the paper's estimator
written token by token in float64, the estimator's expectation against the exact sequence-level reverse KL by
enumeration, PPO-style clipping, invariants, and the objective's place in the registry and the chunked path."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.errors import ConfigError
from lmdistill.losses import ReverseKL, build_objective, fused_linear_distill, reduce_tokens
from lmdistill.losses.minillm import MiniLLM, minillm_parts

F64 = torch.float64


def inputs(b: int, length: int, v: int, *, seed: int, prompt: int = 1, scale: float = 2.0):
    """Student/teacher logits [b, length, v] and sampled tokens; the first ``prompt`` positions of every row and a
    right-padded tail of the last row are ignored (-100), as in the regime's batches."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, length, v, generator=g, dtype=F64) * scale
    zt = torch.randn(b, length, v, generator=g, dtype=F64) * scale
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[:, :prompt] = -100
    if b > 1 and length > prompt + 2:
        labels[-1, -2:] = -100
    return z, zt, labels


def paper_gradient(z, zt, labels, alpha, *, length_normalize, clip_range=None):
    """The paper's estimator for fixed samples, token by token from Eqs. 3, 5, 6 (with the per-token weight):
    -sum_t w_t [grad sum_v q log(p/q) + R^Norm_{t+1} grad log q(y_t)], R^Norm_{t+1} the sum of the future rewards
    over (T - t - 1) with 0-based t (the number of future tokens). With ``clip_range`` the long term of a token is
    dropped where PPO's clipped term would be the larger loss (A > 0 and w > 1 + eps, or A < 0 and w < 1 - eps)."""
    z = z.detach().clone().requires_grad_(True)
    grad = torch.zeros_like(z)
    for b in range(z.shape[0]):
        positions = [t for t in range(z.shape[1]) if labels[b, t] != -100]
        T = len(positions)
        with torch.no_grad():
            rewards = []
            for t in positions:
                y = int(labels[b, t])
                rewards.append(math.log(torch.softmax(zt[b, t], -1)[y]) - math.log(torch.softmax(z[b, t], -1)[y]))
        for k, t in enumerate(positions):
            y = int(labels[b, t])
            q = torch.softmax(z[b, t], -1)
            p = torch.softmax(zt[b, t], -1)
            w = float((q[y] / (alpha * p[y] + (1 - alpha) * q[y])).detach())
            future = sum(rewards[k + 1:])
            if length_normalize:
                future = future / (T - k - 1) if T - k - 1 > 0 else 0.0
            expected_reward = (q * (p.log() - q.log())).sum()  # E_{y_t ~ q}[r_t], exact over the vocabulary
            (g_single,) = torch.autograd.grad(expected_reward, z, retain_graph=True)
            (g_long,) = torch.autograd.grad(q[y].log(), z)
            keep_long = 1.0
            if clip_range is not None and ((future > 0 and w > 1 + clip_range) or (future < 0 and w < 1 - clip_range)):
                keep_long = 0.0
            grad -= w * (g_single + keep_long * future * g_long)
    return grad


def surrogate_gradient(z, zt, labels, alpha, **kwargs):
    z = z.detach().clone().requires_grad_(True)
    loss = minillm_parts(z, zt, labels, mix_alpha=alpha, **kwargs)["loss"].sum()
    (grad,) = torch.autograd.grad(loss, z)
    return grad


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.7, 1.0])
@pytest.mark.parametrize("length_normalize", [True, False])
def test_gradient_is_the_papers_estimator(alpha, length_normalize):
    z, zt, labels = inputs(3, 6, 5, seed=int(alpha * 10) + 3 * length_normalize, prompt=2)
    got = surrogate_gradient(z, zt, labels, alpha, length_normalize=length_normalize, clip_range=None)
    want = paper_gradient(z, zt, labels, alpha, length_normalize=length_normalize)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_clipped_gradient_drops_the_long_term_where_ppo_would():
    z, zt, labels = inputs(4, 7, 4, seed=11, prompt=1, scale=3.0)
    alpha, eps = 0.6, 0.2
    parts = minillm_parts(z, zt, labels, mix_alpha=alpha, clip_range=eps)
    w, a, valid = parts["weight"], parts["advantage"], labels != -100
    clipped = valid & (((a > 0) & (w > 1 + eps)) | ((a < 0) & (w < 1 - eps)))
    assert clipped.any() and (valid & ~clipped & (a != 0)).any()  # the case exercises both branches
    got = surrogate_gradient(z, zt, labels, alpha, clip_range=eps)
    want = paper_gradient(z, zt, labels, alpha, length_normalize=True, clip_range=eps)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_expected_gradient_is_the_exact_sequence_reverse_kl_gradient():
    """Without teacher mixing, length normalisation or clipping, the estimator is unbiased (Eqs. 2-3): its expectation
    over every response of a toy autoregressive student (tables of logits indexed by the prefix, V = 3, T = 3) is the
    gradient of KL(q(y) || p(y)) over whole sequences, both computed by enumerating the V^T responses."""
    v, T = 3, 3
    g = torch.Generator().manual_seed(5)
    student = [torch.randn(*([v] * t), v, generator=g, dtype=F64, requires_grad=True) for t in range(T)]
    teacher = [torch.randn(*([v] * t), v, generator=g, dtype=F64) * 1.5 for t in range(T)]

    def rows(tables, y):  # the logits each position sees after its prefix
        return torch.stack([tables[t][tuple(y[:t])] for t in range(T)])

    def seq_logprob(tables, y):
        return sum(torch.log_softmax(rows(tables, y)[t], -1)[y[t]] for t in range(T))

    responses = list(itertools.product(range(v), repeat=T))
    exact = sum(seq_logprob(student, y).exp() * (seq_logprob(student, y) - seq_logprob(teacher, y)) for y in responses)
    want = torch.autograd.grad(exact, student)

    objective = MiniLLM(length_normalize=False, clip_range=None)
    estimate = 0.0
    for y in responses:
        prob = seq_logprob(student, y).exp().detach()
        loss = objective.per_token(rows(student, y), rows(teacher, y), torch.tensor(y), mix_alpha=0.0).sum()
        estimate = estimate + prob * loss
    got = torch.autograd.grad(estimate, student)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


settings_ = settings(max_examples=25, deadline=None)
shapes = st.tuples(st.integers(1, 3), st.integers(2, 6), st.integers(2, 6), st.integers(0, 10_000))


@settings_
@given(shape=shapes, alpha=st.floats(0.0, 0.95), clip=st.sampled_from([None, 0.1, 0.2]))
def test_single_step_term_is_the_weighted_token_reverse_kl(shape, alpha, clip):
    b, length, v, seed = shape
    z, zt, labels = inputs(b, length, v, seed=seed)
    parts = minillm_parts(z, zt, labels, mix_alpha=alpha, clip_range=clip)
    token_rkl = ReverseKL().per_token(z, zt, labels)
    torch.testing.assert_close(parts["single"], parts["weight"] * token_rkl, rtol=1e-12, atol=1e-12)
    zero = minillm_parts(z, zt, labels, mix_alpha=0.0, clip_range=clip)
    torch.testing.assert_close(zero["single"], token_rkl, rtol=1e-12, atol=1e-12)


@settings_
@given(shape=shapes, alpha=st.floats(0.0, 0.95))
def test_importance_weights(shape, alpha):
    b, length, v, seed = shape
    z, zt, labels = inputs(b, length, v, seed=seed)
    valid = labels != -100
    w = minillm_parts(z, zt, labels, mix_alpha=alpha)["weight"]
    assert torch.equal(w[~valid], torch.zeros_like(w[~valid]))
    assert bool((w[valid] > 0).all()) and bool((w[valid] <= 1 / (1 - alpha) + 1e-12).all())
    ones = minillm_parts(z, zt, labels, mix_alpha=0.0)["weight"]
    assert torch.equal(ones[valid], torch.ones_like(ones[valid]))  # alpha = 0: the samples are the student's own


@settings_
@given(shape=shapes, alpha=st.floats(0.0, 1.0), clip=st.sampled_from([None, 0.2]), norm=st.booleans())
def test_student_equal_to_teacher_gives_no_loss_and_no_gradient(shape, alpha, clip, norm):
    b, length, v, seed = shape
    _, zt, labels = inputs(b, length, v, seed=seed)
    z = zt.clone().requires_grad_(True)
    loss = minillm_parts(z, zt, labels, mix_alpha=alpha, clip_range=clip, length_normalize=norm)["loss"]
    assert torch.allclose(loss, torch.zeros_like(loss), atol=1e-12)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-12)


@settings_
@given(shape=shapes, alpha=st.floats(0.0, 0.9))
def test_ignored_rows_give_zero_loss_and_gradient_and_rows_do_not_leak_across_responses(shape, alpha):
    b, length, v, seed = shape
    z, zt, labels = inputs(b, length, v, seed=seed)
    z.requires_grad_(True)
    loss = minillm_parts(z, zt, labels, mix_alpha=alpha)["loss"]
    (grad,) = torch.autograd.grad(loss.sum(), z)
    ignored = labels == -100
    assert torch.equal(loss[ignored], torch.zeros_like(loss[ignored]))
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    # each response alone gives its own rows
    for i in range(b):
        alone = minillm_parts(z[i:i + 1], zt[i:i + 1], labels[i:i + 1], mix_alpha=alpha)["loss"]
        torch.testing.assert_close(alone[0], loss[i], rtol=1e-12, atol=1e-12)


def test_length_normalised_advantage_is_the_mean_of_future_rewards():
    z, zt, labels = inputs(1, 6, 4, seed=2, prompt=1)
    parts = minillm_parts(z, zt, labels, mix_alpha=0.3)
    r, a = parts["reward"][0], parts["advantage"][0]
    torch.testing.assert_close(a[1:5], torch.stack([r[k + 1:].mean() for k in range(1, 5)]))
    assert a[5] == 0 and a[0] == 0  # the last token has no future; the prompt row is ignored
    plain = minillm_parts(z, zt, labels, mix_alpha=0.3, length_normalize=False)["advantage"][0]
    torch.testing.assert_close(plain[1:5], torch.stack([r[k + 1:].sum() for k in range(1, 5)]))


def batch_of(labels: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.zeros_like(labels), "labels": labels, "mix_alpha": torch.full((labels.shape[0],), alpha)}


def test_bound_to_a_batch_it_reads_the_regimes_alpha_and_whole_responses():
    z, zt, labels = inputs(3, 5, 6, seed=4)
    objective = build_objective("minillm")
    bound = objective.for_batch(batch_of(labels, 0.375))  # exact in the float32 batch field
    flat = bound.per_token(z.reshape(-1, 6), zt.reshape(-1, 6), labels.reshape(-1))
    want = minillm_parts(z, zt, labels, mix_alpha=0.375)["loss"].reshape(-1)
    torch.testing.assert_close(flat, want, rtol=1e-12, atol=1e-12)
    assert bound.batch_coupled and bound.row_group_size == 5
    with pytest.raises(ConfigError, match=r"regime: \{kind: minillm\}"):
        objective.for_batch({"input_ids": labels, "labels": labels})


def test_chunked_path_equals_the_plain_path():
    g = torch.Generator().manual_seed(8)
    b, length, h, v = 3, 5, 4, 7
    hidden = torch.randn(b * length, h, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=F64, requires_grad=True)
    zt = torch.randn(b * length, v, generator=g, dtype=F64)
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[:, 0] = -100
    bound = build_objective("minillm").for_batch(batch_of(labels, 0.2))
    flat = labels.reshape(-1)
    plain = reduce_tokens(bound.per_token(hidden @ weight.T, zt, flat), flat, normalizer=11.0)
    want = torch.autograd.grad(plain, (hidden, weight))
    fused = fused_linear_distill(hidden, weight, zt, flat, bound, chunk_size=4, normalizer=11.0)
    got = torch.autograd.grad(fused, (hidden, weight))
    torch.testing.assert_close(fused, plain)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)


def test_registry_config_and_errors():
    objective = build_objective({"name": "minillm", "length_normalize": False, "clip_range": None})
    assert isinstance(objective, MiniLLM) and objective.requires_teacher
    assert build_objective(objective.config()).config() == objective.config()
    with pytest.raises(ConfigError, match=r"clip_range must be a number in \(0, 1\)"):
        build_objective({"name": "minillm", "clip_range": 1.5})
    with pytest.raises(ConfigError, match=r"unknown parameter for objective 'minillm'"):
        build_objective({"name": "minillm", "mix_alpha": 0.2})  # the regime's setting, read from the batch
