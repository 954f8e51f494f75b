"""Low-rank teacher caches: the projection against independent references (SVD, float64 logits), the int8
rounding bound, what a cache stores and gives back (dense logits for every objective, on both loss paths),
determinism across process counts, and the errors (corrupt projection, non-linear heads, bad k)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.data.blocks import collate
from lmdistill.errors import ConfigError, DataError, LmdistillError
from lmdistill.losses import build_objective, fused_linear_distill
from lmdistill.teachers.cache import TeacherCache
from lmdistill.teachers.lowrank import CODE_MAX, fit_projection
from tests.conftest import save_tiny_model
from tests.teachers.conftest import BLOCK, run_config, write_cache


_write = partial(write_cache, mode="lowrank")


@pytest.fixture(scope="module")
def full_rank_cache(tmp_path_factory, teacher_model, few_data, small_tokenizer) -> Path:
    """k = the teacher's hidden size: only the int8 rounding separates it from the live teacher."""
    path = tmp_path_factory.mktemp("lowrank") / "full"
    _write(path, teacher_model, few_data, small_tokenizer, k=teacher_model.config.n_embd)
    return path


def _batch(data, idx):
    blocks = data.blocks("train")
    return collate([blocks[i] for i in idx]) | {"block_index": torch.tensor(idx)}


def test_projection_spans_the_principal_subspace_and_rebuilds_low_rank_logits():
    """Hidden states of rank 6 plus tiny noise: the fitted 6 directions span the same subspace as the top 6 right
    singular vectors of the centred data (float64 SVD), and the projected output layer rebuilds float64 logits."""
    gen = torch.Generator().manual_seed(0)
    n, hidden, vocab, r = 3000, 24, 50, 6
    x = torch.randn(n, r, generator=gen, dtype=torch.float64) @ torch.randn(r, hidden, generator=gen, dtype=torch.float64)
    x += 1e-6 * torch.randn(n, hidden, generator=gen, dtype=torch.float64) + 3.0
    weight = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64)
    projection = fit_projection(x, weight, bias, r)
    basis = projection.basis.double()
    torch.testing.assert_close(basis.T @ basis, torch.eye(r, dtype=torch.float64), atol=1e-6, rtol=0)
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    top = vh[:r].T
    torch.testing.assert_close(basis @ basis.T, top @ top.T, atol=1e-5, rtol=0)
    z = ((x - x.mean(0)) @ basis) / projection.sigma.double()
    rebuilt = z @ projection.weight.double().T + projection.bias.double()
    expected = x @ weight.T + bias
    torch.testing.assert_close(rebuilt, expected, atol=1e-3 * float(expected.abs().max()), rtol=0)
    with pytest.raises(ConfigError, match="at most the teacher's hidden size 24"):
        fit_projection(x, weight, bias, hidden + 1)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_int8_codes_round_each_coordinate_to_within_half_a_step(k, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = 16
    x = torch.randn(64, hidden, generator=gen, dtype=torch.float64) * magnitude
    projection = fit_projection(x, torch.randn(5, hidden, generator=gen, dtype=torch.float64), None, k)
    codes, scale = projection.encode(x.float())
    assert codes.abs().max() <= CODE_MAX
    z = ((x - projection.mean.double()) @ projection.basis.double()) / projection.sigma.double()
    error = (projection.coordinates(codes, scale).double() - z).abs()
    assert (error <= scale.double().unsqueeze(-1) * 0.5 + 1e-6 * z.abs().amax(-1, keepdim=True)).all()


def test_cache_stores_k_codes_and_a_scale_and_gives_back_the_teacher(full_rank_cache, teacher_model, few_data):
    cache = TeacherCache(full_rank_cache)
    hidden = teacher_model.config.n_embd
    assert cache.mode == "lowrank" and cache.k == hidden
    assert cache.bytes_per_token == hidden + 2  # int8 codes + a float16 scale
    fidelity = cache.manifest["projection"]["fidelity"]
    assert 0 <= fidelity["kl_mean_nats"] < 1e-3 and fidelity["top1_agreement"] > 0.98
    idx = [0, 5, len(few_data.blocks("train")) - 1]
    batch = _batch(few_data, idx)
    vocab = cache.vocab_size
    with torch.no_grad():
        live = teacher_model(input_ids=batch["input_ids"]).logits[..., :vocab].reshape(-1, vocab).double()
    rebuilt = cache.signal(batch).double()
    p = torch.log_softmax(live, -1)
    kl = (p.exp() * (p - torch.log_softmax(rebuilt, -1))).sum(-1)
    assert float(kl.max()) < 5e-3 and float(kl.mean()) < 1e-3
    with pytest.raises(LmdistillError, match="lowrank cache: it stores no log-probabilities"):
        cache.lookup(idx)


@pytest.mark.parametrize("logits_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("objective", ["forward_kl", "reverse_kl", {"name": "jsd", "beta": 0.5}, "atkd"])
def test_both_loss_paths_see_the_same_teacher(full_rank_cache, few_data, objective, logits_dtype):
    """signal() (dense logits, plain path) and chunked_signal() ((z, W, b), fused path) give the same loss and
    student gradients, for objectives sampled caches must refuse; the objective check lets all of them through.
    With bfloat16 logits both paths round the same products (the chunked one per chunk, into its buffer)."""
    cache = TeacherCache(full_rank_cache, logits_dtype=logits_dtype)
    assert cache.chunked_signal(_batch(few_data, [1]))[0].dtype == getattr(torch, logits_dtype)
    cache.check_objective(build_objective(objective))
    batch = _batch(few_data, [1, 2, 3])
    labels = batch["labels"].reshape(-1)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(labels.numel(), 16, generator=gen, requires_grad=True)
    weight = (torch.randn(cache.vocab_size, 16, generator=gen) * 0.3).requires_grad_(True)
    obj = build_objective(objective)
    plain = obj(hidden @ weight.T, cache.signal(batch), labels)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    fused = fused_linear_distill(hidden, weight, cache.chunked_signal(batch), labels, obj, chunk_size=40)
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_two_processes_write_what_one_process_writes(tmp_path, teacher_model, few_data, small_tokenizer):
    """Rank 0 fits the projection before the barrier and every rank encodes with the saved bytes. Run here in one
    process: rank 0's third barrier (its shards written, before the manifest) runs rank 1 to completion."""
    one = tmp_path / "one"
    _write(one, teacher_model, few_data, small_tokenizer, k=8)
    two = tmp_path / "two"
    calls = []

    def rank0_barrier():
        calls.append(1)
        if len(calls) == 3:
            _write(two, teacher_model, few_data, small_tokenizer, k=8, rank=1, world_size=2, barrier=lambda: None)

    _write(two, teacher_model, few_data, small_tokenizer, k=8, rank=0, world_size=2, barrier=rank0_barrier)
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (one, two))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]] and len(a["shards"]) > 1
    assert a["projection"]["sha256"] == b["projection"]["sha256"]
    assert a["bytes_per_token"] == 10


def test_logits_dtype_auto_follows_the_hardware_and_bfloat16_rounds_within_its_bound(full_rank_cache, few_data, monkeypatch):
    """"auto" rebuilds in bfloat16 only where the device multiplies it natively; the bfloat16 logits are the
    float64 product to within bfloat16's rounding of each input and of the result (relative 2^-8 each)."""
    import lmdistill.teachers.cache.lowrank as cache_module

    batch = _batch(few_data, [0, 4])
    for native, want in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(cache_module, "native_bf16_matmul", lambda device, native=native: native)
        cache = TeacherCache(full_rank_cache)  # auto
        assert cache.logits_layer()[0] == want and cache.signal(batch).dtype == want
        codes = cache.chunked_signal(batch)  # its tensors (the tuple also holds the head's softcap and scale)
        assert all(t.dtype == want for t in (codes.hidden, codes.weight, codes.bias))
    cache = TeacherCache(full_rank_cache, logits_dtype="bfloat16")
    z = cache.coordinates(batch["block_index"]).double()
    w, b = cache.projection.weight.double(), cache.projection.bias.double()
    exact = z @ w.T + b
    # each input rounded (relative 2^-8 at most), the product possibly rounded before the bias is added, and
    # the result rounded once more
    bound = 2.0**-8 * (3 * (z.abs() @ w.abs().T) + b.abs()) + 2.0**-8 * exact.abs() * 1.01 + 1e-6
    err = (cache.signal(batch).double() - exact).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    # really rounded to bfloat16 (a float32 product would be ~2^-20 off)
    assert float(err.max()) > 2.0**-12 * float(exact.abs().max()), float(err.max())
    with pytest.raises(ConfigError, match="logits_dtype must be one of"):
        TeacherCache(full_rank_cache, logits_dtype="float16")


def test_a_run_rebuilds_the_teacher_logits_in_its_configured_dtype(tmp_path, full_rank_cache, few_chapters, cache_dir,
                                                                   small_tokenizer):
    """teacher.logits_dtype reaches the cache a training run opens; both dtypes train to nearly the same losses."""
    from lmdistill.config import validate_config
    from lmdistill.train.run import build_trainer

    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=3)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        teacher = {"cache": str(full_rank_cache), "logits_dtype": dtype}
        cfg = validate_config(run_config(tmp_path / dtype, few_chapters, cache_dir, student, teacher, chunk_size=48))
        trainer, _ = build_trainer(cfg, show_progress=False)
        assert trainer.teacher.logits_layer()[0] == getattr(torch, dtype)
        losses[dtype] = [trainer.train_step(s) for s in range(3)]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-2)
    assert losses["bfloat16"] != losses["float32"]  # the product really differs


def test_corrupt_projection_is_named(tmp_path, full_rank_cache):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(full_rank_cache, copy)
    file = copy / "projection.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(DataError, match="projection projection.safetensors is corrupt"):
        TeacherCache(copy)
    file.unlink()
    with pytest.raises(DataError, match="projection projection.safetensors is missing"):
        TeacherCache(copy)


class SoftCapped(torch.nn.Module):
    """A teacher whose logits are soft-capped (tanh), hence not the output layer of its last hidden state."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    @property
    def base_model(self):
        return self.inner.base_model

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids):
        logits = self.inner(input_ids=input_ids).logits
        return SimpleNamespace(logits=5.0 * torch.tanh(logits / 5.0))


def test_non_linear_heads_and_too_many_components_are_refused(tmp_path, teacher_model, few_data, small_tokenizer):
    with pytest.raises(ConfigError, match="linear function of the teacher's final hidden state"):
        _write(tmp_path / "capped", SoftCapped(teacher_model), few_data, small_tokenizer, k=8)
    hidden = teacher_model.config.n_embd
    with pytest.raises(ConfigError, match=f"at most the teacher's hidden size {hidden}"):
        _write(tmp_path / "big", teacher_model, few_data, small_tokenizer, k=hidden + 1)


def test_cache_teacher_command_defaults_to_lowrank_with_at_most_the_hidden_size(
    tmp_path, trained_teacher, few_chapters, cache_dir, capsys
):
    """No cache section: mode lowrank with k = min(128, hidden size); the summary reports the fidelity."""
    import yaml

    from lmdistill.cli.cache import cache_teacher

    config = {
        "output": str(tmp_path / "cli-lowrank"),
        "data": {"corpus": str(few_chapters), "block_size": BLOCK, "cache_dir": str(cache_dir)},
        "teacher": {"path": str(trained_teacher)},
    }
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(config))
    cache_teacher(path, [])
    summary = json.loads(capsys.readouterr().out)
    hidden = json.loads((trained_teacher / "config.json").read_text())["n_embd"]
    assert summary["mode"] == "lowrank" and summary["k"] == min(128, hidden) == hidden
    assert summary["bytes_per_token"] == hidden + 2 and summary["fidelity"]["kl_mean_nats"] < 1e-3


def test_resume_recomputes_shards_made_with_another_projection(tmp_path, teacher_model, few_data, small_tokenizer):
    """A killed build resumes with the projection its shards used; if the projection is replaced, shards recorded
    with the old one are recomputed rather than mixed with the new one."""
    out = tmp_path / "c"
    _write(out, teacher_model, few_data, small_tokenizer, k=8)
    first = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()  # as if killed before the manifest
    assert not _write(out, teacher_model, few_data, small_tokenizer, k=8).shards_written  # all shards reused
    (out / "manifest.json").unlink()
    (out / "projection.safetensors").unlink()  # a new projection (here: refitted with the same data)
    record = json.loads((out / "shard-00000.json").read_text())
    record["projection_sha256"] = "0" * 64  # the record of a shard encoded with another projection
    (out / "shard-00000.json").write_text(json.dumps(record))
    report = _write(out, teacher_model, few_data, small_tokenizer, k=8)
    assert report.shards_written == [0]
    assert json.loads((out / "manifest.json").read_text())["shards"] == first["shards"]
