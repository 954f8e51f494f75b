"""Sampled and hybrid teacher caches (random-sampling KD, arXiv:2503.16870; threshold sampling): what is
stored, unbiasedness of the estimate, determinism across process counts, and the objectives and operations
they refuse."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from types import SimpleNamespace

from lmdistill.errors import ConfigError
from lmdistill.losses import build_objective
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.teachers.cache import (
    TeacherCache,
    hybrid_split,
    shrink_teacher_cache,
    teacher_hybrid,
    teacher_sampled,
)
from tests.teachers.conftest import write_cache


_write = partial(write_cache, mode="sampled")  # calls may name another mode


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, teacher_model, few_data, small_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("sampled") / "k8"
    _write(path, teacher_model, few_data, small_tokenizer)
    return path


@pytest.fixture(scope="module")
def hybrid_cache(tmp_path_factory, teacher_model, few_data, small_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("hybrid") / "k8"
    _write(path, teacher_model, few_data, small_tokenizer, mode="hybrid")
    return path


@pytest.fixture(params=["sampled", "hybrid"])
def unbiased_cache(request) -> Path:
    return request.getfixturevalue(f"{request.param}_cache")


class Fixed(torch.nn.Module):
    """A "model" that predicts the same logits at every position."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_rows_hold_k_draws_as_distinct_ids_with_counts_and_no_residual(sampled_cache):
    cache = TeacherCache(sampled_cache)
    assert cache.mode == "sampled" and cache.manifest["seed"] == 0
    teacher = cache.lookup(range(cache.n_blocks))
    counts = teacher.logprobs.float().exp() * cache.k
    # every row: integer counts summing to k (float16 log(c/k) rounds c by well under 0.01)
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=0.02)
    torch.testing.assert_close(counts.round().sum(-1), torch.full((teacher.num_rows,), float(cache.k)))
    assert (teacher.residual == 0).all()
    ids = teacher.indices
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct within each row


def test_draws_follow_the_teacher_distribution(teacher_model, few_data):
    """The mean of the stored estimates over many rows of one context equals the teacher's probabilities
    within 5 standard errors (the estimate is unbiased; the bound is from the multinomial variance, which
    the systematic draws' variance does not exceed)."""
    logits = torch.randn(40, generator=torch.Generator().manual_seed(0)) * 2
    p = torch.softmax(logits.double(), -1)
    k, rows = 8, 4000
    top, ids, res = teacher_sampled(Fixed(logits), torch.zeros(1, rows, dtype=torch.long), k=k, temperature=1.0,
                                    vocab_size=40, generator=torch.Generator().manual_seed(1))
    estimate = torch.zeros(rows, 40, dtype=torch.float64).scatter_(-1, ids[0], top[0].double().exp())
    mean = estimate.mean(0)
    stderr = (p * (1 - p) / (k * rows)).sqrt()
    assert ((mean - p).abs() <= 5 * stderr + 1e-12).all()
    assert torch.isneginf(res).all()
    # systematic draws: every count is within 1 of k p_v (independent draws would scatter by sqrt(k p_v))
    assert ((estimate * k - k * p).abs() < 1 + 1e-9).all()


@pytest.mark.parametrize("mode", ["sampled", "hybrid"])
def test_two_processes_draw_what_one_process_draws(tmp_path, teacher_model, few_data, small_tokenizer, mode, request):
    """Draws are seeded per shard, so the ranks of a multi-process build write the same shards. Run here in one
    process: rank 0's third barrier (its shards written, before the manifest) runs rank 1 to completion."""
    single = request.getfixturevalue(f"{mode}_cache")
    out = tmp_path / "two"
    calls = []

    def rank0_barrier():
        calls.append(1)
        if len(calls) == 3:
            _write(out, teacher_model, few_data, small_tokenizer, rank=1, world_size=2, barrier=lambda: None, mode=mode)

    _write(out, teacher_model, few_data, small_tokenizer, rank=0, world_size=2, barrier=rank0_barrier, mode=mode)
    one = json.loads((single / "manifest.json").read_text())["shards"]
    two = json.loads((out / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in one] == [s["sha256"] for s in two] and len(one) > 1
    other_seed = tmp_path / "seed1"
    _write(other_seed, teacher_model, few_data, small_tokenizer, seed=1, mode=mode)
    assert json.loads((other_seed / "manifest.json").read_text())["shards"][0]["sha256"] != one[0]["sha256"]


def test_objectives_other_than_forward_kl_and_cross_entropy_are_refused(unbiased_cache):
    cache = TeacherCache(unbiased_cache)
    cache.check_objective(build_objective("forward_kl"))
    cache.check_objective(build_objective(
        {"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]}))
    with pytest.raises(ConfigError, match=rf"{cache.mode} cache .* objective part\(s\) reverse_kl need a top-k cache"):
        cache.check_objective(build_objective(
            {"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "reverse_kl", "weight": 0.5}]}))
    with pytest.raises(ConfigError, match=f"{cache.mode} cache"):
        cache.check_objective(build_objective({"name": "jsd", "beta": 0.5}))


def test_a_sampled_cache_cannot_be_shrunk(tmp_path, unbiased_cache):
    mode = TeacherCache(unbiased_cache).mode
    with pytest.raises(ConfigError, match=f"{mode} cache, not a ranking of tokens"):
        shrink_teacher_cache(unbiased_cache, tmp_path / "k4", 4)


def _threshold_reference(p: np.ndarray, k: int) -> float:
    """The threshold tau with sum_v min(1, p_v / tau) = k, by bisection in float64 (an independent route to
    the closed form in :func:`hybrid_split`)."""
    lo, hi = 0.0, float(p.sum())
    for _ in range(200):
        mid = (lo + hi) / 2
        if np.minimum(1.0, p / mid).sum() > k:
            lo = mid
        else:
            hi = mid
    return hi


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12), st.integers(13, 60), st.floats(0.1, 8.0), st.integers(0, 2**31 - 1))
def test_hybrid_split_is_the_threshold_of_threshold_sampling(k, vocab, spread, seed):
    """h tokens kept exactly and tau: tau solves sum_v min(1, p_v / tau) = k, the head is every token above
    tau, and the expected number of entries (h + tail mass / tau) is exactly k."""
    rng = np.random.default_rng(seed)
    p = np.exp(rng.normal(size=vocab) * spread)
    p /= p.sum()
    order = np.sort(p)[::-1].copy()
    top = torch.tensor(order[:k]).unsqueeze(0)
    head, tau = hybrid_split(top, torch.tensor([order[k:].sum()], dtype=torch.float64))
    h, t = int(head[0]), float(tau[0])
    assert 0 <= h < k
    assert t == pytest.approx(_threshold_reference(p, k), rel=1e-9)
    assert (order[:h] > t * (1 - 1e-12)).all() and (order[h:] <= t * (1 + 1e-12)).all()
    assert h + order[h:].sum() / t == pytest.approx(k, rel=1e-9)


def test_hybrid_estimate_is_unbiased_exact_on_the_head_and_sums_to_one():
    """teacher_hybrid on one fixed distribution, 4,000 rows: the head entries equal the teacher's probabilities,
    every tail entry equals tau, each row sums to 1 with at most k distinct ids, and the mean estimate equals
    the teacher within 5 standard errors of threshold sampling's variance p_v (tau - p_v) for tail tokens."""
    vocab, k, rows = 40, 8, 4000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0)) * 2
    p = torch.softmax(logits.double(), -1)
    top, ids, res = teacher_hybrid(Fixed(logits), torch.zeros(1, rows, dtype=torch.long), k=k, temperature=1.0,
                                   vocab_size=vocab, generator=torch.Generator().manual_seed(1))
    assert torch.isneginf(res).all()
    estimate = torch.zeros(rows, vocab, dtype=torch.float64).scatter_(-1, ids[0], top[0].double().exp())
    assert (ids[0].sort(-1).values.diff(dim=-1) > 0).all()
    torch.testing.assert_close(estimate.sum(-1), torch.ones(rows, dtype=torch.float64), rtol=0, atol=1e-6)
    ordered = p.sort(descending=True)
    head, tau = hybrid_split(ordered.values[:k].unsqueeze(0), ordered.values[k:].sum().unsqueeze(0))
    h, t = int(head[0]), float(tau[0])
    head_ids, tail_ids = ordered.indices[:h], ordered.indices[h:]
    torch.testing.assert_close(estimate[:, head_ids], p[head_ids].expand(rows, h), rtol=1e-6, atol=0)  # float32 logs
    tail = estimate[:, tail_ids]
    assert torch.isclose(tail[tail > 0], torch.tensor(t, dtype=torch.float64), rtol=1e-6).all()
    assert ((tail > 0).sum(-1) == k - h).all()  # every row fills its k slots
    stderr = (p[tail_ids] * (t - p[tail_ids]) / rows).sqrt()
    assert ((tail.mean(0) - p[tail_ids]).abs() <= 5 * stderr + 1e-12).all()


def test_hybrid_cache_rows_are_distributions_with_no_residual(hybrid_cache):
    cache = TeacherCache(hybrid_cache)
    assert cache.mode == "hybrid" and cache.manifest["seed"] == 0
    teacher = cache.lookup(range(cache.n_blocks))
    mass = teacher.logprobs.float().exp().sum(-1)
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=0.01)  # float16 values
    assert (teacher.residual == 0).all()
    assert (teacher.indices.sort(-1).values.diff(dim=-1) > 0).all()
