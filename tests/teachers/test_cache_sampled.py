"""Sampled teacher caches (random-sampling KD, arXiv:2503.16870): what is stored, unbiasedness of the
estimate, determinism across process counts, and the objectives and operations they refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from types import SimpleNamespace

from lmdistill.errors import ConfigError
from lmdistill.losses import build_objective
from lmdistill.teachers.cache import TeacherCache, shrink_teacher_cache, teacher_sampled, write_teacher_cache
from lmdistill.train.run import check_sampled_cache_objective
from tests.teachers.conftest import BLOCK


def _write(path, model, data, tokenizer, **kw):
    kw.setdefault("k", 8)
    kw.setdefault("blocks_per_shard", 64)
    return write_teacher_cache(path, model=model, tokenizer=tokenizer, stream=data.streams["train"], block_size=BLOCK,
                               model_name="tiny", mode="sampled", **kw)


@pytest.fixture(scope="module")
def sampled_cache(tmp_path_factory, teacher_model, few_data, small_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("sampled") / "k8"
    _write(path, teacher_model, few_data, small_tokenizer)
    return path


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

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids):
            return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))

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


def test_two_processes_draw_what_one_process_draws(tmp_path, teacher_model, few_data, small_tokenizer, sampled_cache):
    """Draws are seeded per shard, so the ranks of a multi-process build write the same shards. Run here in one
    process: rank 0's third barrier (its shards written, before the manifest) runs rank 1 to completion."""
    out = tmp_path / "two"
    calls = []

    def rank0_barrier():
        calls.append(1)
        if len(calls) == 3:
            _write(out, teacher_model, few_data, small_tokenizer, rank=1, world_size=2, barrier=lambda: None)

    _write(out, teacher_model, few_data, small_tokenizer, rank=0, world_size=2, barrier=rank0_barrier)
    one = json.loads((sampled_cache / "manifest.json").read_text())["shards"]
    two = json.loads((out / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in one] == [s["sha256"] for s in two] and len(one) > 1
    other_seed = tmp_path / "seed1"
    _write(other_seed, teacher_model, few_data, small_tokenizer, seed=1)
    assert json.loads((other_seed / "manifest.json").read_text())["shards"][0]["sha256"] != one[0]["sha256"]


def test_objectives_other_than_forward_kl_and_cross_entropy_are_refused(sampled_cache):
    cache = TeacherCache(sampled_cache)
    check_sampled_cache_objective(cache, build_objective("forward_kl"))
    check_sampled_cache_objective(cache, build_objective(
        {"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]}))
    with pytest.raises(ConfigError, match=r"sampled cache .* objective part\(s\) reverse_kl need a top-k cache"):
        check_sampled_cache_objective(cache, build_objective(
            {"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "reverse_kl", "weight": 0.5}]}))
    with pytest.raises(ConfigError, match="sampled cache"):
        check_sampled_cache_objective(cache, build_objective({"name": "jsd", "beta": 0.5}))


def test_a_sampled_cache_cannot_be_shrunk(tmp_path, sampled_cache):
    with pytest.raises(ConfigError, match="sampled cache; its draws are not a ranking"):
        shrink_teacher_cache(sampled_cache, tmp_path / "k4", 4)
