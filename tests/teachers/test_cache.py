"""The offline teacher cache on real text: stored values against a float64 reference, k = V against the
live teacher, resume after a kill, corrupt and truncated shards, mismatched manifests, the trainer."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmdistill.data.blocks import collate
from lmdistill.errors import ConfigError, DataError
from lmdistill.losses import build_objective
from lmdistill.teachers.cache import (
    TeacherCache,
    cache_tokenizer,
    open_teacher_cache,
    shrink_teacher_cache,
    write_teacher_cache,
)
from tests.conftest import save_tiny_model
from tests.teachers.conftest import BLOCK, run_config, write_cache

WORKER = Path(__file__).with_name("cache_worker.py")
ROOT = Path(__file__).parents[2]


_write = write_cache


def _shard_hashes(path: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((path / "manifest.json").read_text())["shards"]]


# ------------------------------------------------------------------------------ stored values
def test_stored_values_match_a_float64_reference(k8_cache, teacher_model, few_data):
    cache = TeacherCache(k8_cache)
    blocks = few_data.blocks("train")
    assert cache.n_blocks == len(blocks) and cache.block_size == BLOCK and cache.k == 8
    assert cache.manifest["index_dtype"] == "uint16" and cache.bytes_per_token == 8 * 2 + 8 * 2 + 2
    for i in (0, 1, 63, 64, 65, len(blocks) - 1):  # across shard boundaries
        input_ids = blocks[i]["input_ids"]
        with torch.no_grad():
            ref = torch.log_softmax(teacher_model(input_ids=input_ids[None]).logits[0].double(), dim=-1)  # [L, V]
        logprobs, ids, log_res = (np.asarray(a) for a in cache.block(i))
        ids = torch.from_numpy(ids.astype(np.int64))
        stored = torch.from_numpy(logprobs.astype(np.float64))
        # the stored ids are a top-8 of the reference (up to float32-vs-float64 near-ties) ...
        kth = ref.topk(8, dim=-1).values[:, -1:]
        assert bool((ref.gather(-1, ids) >= kth - 1e-5).all())
        assert bool((ids.sort(-1).values.diff(dim=-1) > 0).all())  # distinct within a row
        # ... sorted by probability, with float16-rounded reference log-probs
        assert bool((stored.diff(dim=-1) <= 0).all())
        torch.testing.assert_close(stored, ref.gather(-1, ids), rtol=1e-3, atol=2e-3)
        # the residual is the exact mass outside the stored entries
        outside = ref.scatter(-1, ids, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(torch.from_numpy(log_res.astype(np.float64)), outside, rtol=1e-3, atol=2e-3)


def test_lookup_returns_the_blocks_of_a_batch_in_order(k8_cache, few_data):
    cache = TeacherCache(k8_cache)
    order = [5, 130, 0, 64]
    teacher = cache.lookup(torch.tensor(order))
    assert teacher.logprobs.shape == (len(order) * BLOCK, 8) and teacher.temperature == 1.0
    for row, block in enumerate(order):
        lp, ids, res = cache.block(block)
        sl = slice(row * BLOCK, (row + 1) * BLOCK)
        assert torch.equal(teacher.logprobs[sl], torch.from_numpy(np.array(lp)))
        assert torch.equal(teacher.indices[sl], torch.from_numpy(np.array(ids).astype(np.int64)))
        torch.testing.assert_close(teacher.residual[sl], torch.from_numpy(np.array(res)).float().exp())
    # every probability vector (top-k + residual) sums to one up to float16 rounding
    total = teacher.logprobs.float().exp().sum(-1) + teacher.residual
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=5e-3)


def test_sparse_loss_from_cache_matches_the_completed_teacher_in_float64(k8_cache, teacher_model, few_data):
    """Forward KL of a student against the cache equals KL(p~ || q) computed here in float64, where p~ is the
    live teacher's top-8 plus its residual shared among the other V - 8 tokens in proportion to the student's
    probabilities (the default tail) or evenly (tail="uniform")."""
    for tail in ("student", "uniform"):
        _check_cache_forward_kl(TeacherCache(k8_cache, tail=tail), tail, teacher_model, few_data)


def _check_cache_forward_kl(cache, tail, teacher_model, few_data):
    blocks = few_data.blocks("train")
    idx = [3, 77, 150]
    batch = collate([blocks[i] for i in idx]) | {"block_index": torch.tensor(idx)}
    torch.manual_seed(0)
    student_logits = torch.randn(len(idx) * BLOCK, cache.vocab_size) * 2
    labels = batch["labels"].reshape(-1)
    got = build_objective("forward_kl").per_token(student_logits, cache.signal(batch), labels)

    with torch.no_grad():
        t = torch.log_softmax(teacher_model(input_ids=batch["input_ids"]).logits.double(), -1).reshape(-1, cache.vocab_size)
    top, top_ids = t.topk(8, dim=-1)
    residual = 1 - top.exp().sum(-1, keepdim=True)
    q = torch.log_softmax(student_logits.double(), -1)
    if tail == "uniform":
        p = (residual / (cache.vocab_size - 8)).expand_as(t).clone()
    else:
        q_tail = q.exp().scatter(-1, top_ids, 0.0)
        p = residual * q_tail / q_tail.sum(-1, keepdim=True)
    p = p.scatter(-1, top_ids, top.exp())
    ref = (p * (p.log() - q)).sum(-1) * (labels != -100)
    torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=2e-3)


def test_k_equal_vocab_gives_the_live_teacher_loss(tmp_path, teacher_model, few_data, small_tokenizer):
    vocab = len(small_tokenizer)
    f32 = tmp_path / "kV-f32"
    _write(f32, teacher_model, few_data, small_tokenizer, k=vocab, dtype="float32", blocks_per_shard=200)
    f16 = tmp_path / "kV-f16"
    _write(f16, teacher_model, few_data, small_tokenizer, k=vocab, dtype="float16", blocks_per_shard=200)
    blocks = few_data.blocks("train")
    idx = [0, 17, 201, len(blocks) - 1]
    batch = collate([blocks[i] for i in idx]) | {"block_index": torch.tensor(idx)}
    labels = batch["labels"].reshape(-1)
    torch.manual_seed(1)
    student_logits = torch.randn(len(idx) * BLOCK, vocab) * 3
    with torch.no_grad():
        live = teacher_model(input_ids=batch["input_ids"]).logits.reshape(-1, vocab)
    for name in ("forward_kl", "reverse_kl", {"name": "jsd", "beta": 0.5}, "tvd"):
        objective = build_objective(name)
        expected = objective(student_logits, live, labels)
        exact = objective(student_logits, TeacherCache(f32).signal(batch), labels)
        rounded = objective(student_logits, TeacherCache(f16).signal(batch), labels)
        torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rounded, expected, rtol=2e-3, atol=1e-3)


# ------------------------------------------------------------------------------------ robustness
def test_resume_after_sigkill_skips_finished_shards_and_equals_an_uninterrupted_build(
    tmp_path, k8_cache, trained_teacher, few_chapters, small_tokenizer, cache_dir
):
    out = tmp_path / "killed"
    spec = {"corpus": str(few_chapters), "tokenizer": str(trained_teacher), "teacher": str(trained_teacher),
            "cache_dir": str(cache_dir), "output": str(out), "k": 8, "blocks_per_shard": 64, "sleep": 0.5}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(spec_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while len(list(out.glob("shard-*.json"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the worker wrote no shard in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.stem for p in out.glob("shard-*.json"))
    n_shards = json.loads((k8_cache / "manifest.json").read_text())["n_shards"]
    assert not (out / "manifest.json").exists() and 2 <= len(finished) < n_shards
    # what a kill mid-write leaves: a temporary shard file; and a shard whose checksum record never landed
    unfinished = max(s for s in range(n_shards) if f"shard-{s:05d}" not in finished)
    (out / f".shard-{unfinished:05d}.bin.abc.tmp").write_bytes(b"partial")
    (out / f"shard-{unfinished:05d}.bin").write_bytes(b"junk")

    from lmdistill.models.loading import load_causal_lm
    from lmdistill.data.prepare import prepare_data

    data = prepare_data(str(few_chapters), block_size=BLOCK, tokenizer=small_tokenizer, cache_dir=cache_dir)
    report = _write(out, load_causal_lm(trained_teacher), data, small_tokenizer)
    assert sorted(f"shard-{s:05d}" for s in report.shards_skipped) == finished
    assert sorted(report.shards_written) == [s for s in range(n_shards) if f"shard-{s:05d}" not in finished]
    assert _shard_hashes(out) == _shard_hashes(k8_cache)
    assert not list(out.glob(".*.tmp"))
    # a second run with everything done does no work
    again = _write(out, load_causal_lm(trained_teacher), data, small_tokenizer)
    assert again.shards_written == [] and again.complete


def test_resume_keeps_finished_shards_when_only_names_change(tmp_path, k8_cache, teacher_model, few_data,
                                                              small_tokenizer):
    """The teacher's path and the corpus name are recorded but do not decide the bytes: a resumed build
    with the teacher moved elsewhere keeps the shards already done (the weights hash still guards them)."""
    out = tmp_path / "moved"

    def crash_after_first(shard):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _write(out, teacher_model, few_data, small_tokenizer, on_shard_written=crash_after_first)
    report = write_teacher_cache(out, model=teacher_model, tokenizer=small_tokenizer, stream=few_data.streams["train"],
                                 block_size=BLOCK, k=8, blocks_per_shard=64, model_name="/elsewhere/teacher", corpus="x")
    assert report.shards_skipped == [0] and 0 not in report.shards_written
    assert _shard_hashes(out) == _shard_hashes(k8_cache)


def test_corrupt_truncated_and_missing_shards_are_named(tmp_path, k8_cache, few_data, small_tokenizer):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(k8_cache, corrupt)
    data = bytearray((corrupt / "shard-00002.bin").read_bytes())
    data[1000] ^= 0x40
    (corrupt / "shard-00002.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00002\.bin is corrupt"):
        open_teacher_cache(corrupt, stream=few_data.streams["train"], tokenizer=small_tokenizer, block_size=BLOCK)
    # checked on first use: other shards still serve, the corrupt one fails when touched
    lazy = TeacherCache(corrupt, verify="first_use")
    lazy.lookup([0, 64])
    with pytest.raises(DataError, match=r"shard-00002\.bin is corrupt"):
        lazy.lookup([2 * 64 + 5])

    truncated = tmp_path / "truncated"
    shutil.copytree(k8_cache, truncated)
    shard = truncated / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"shard-00001\.bin is truncated"):
        TeacherCache(truncated, verify="first_use")

    missing = tmp_path / "missing"
    shutil.copytree(k8_cache, missing)
    (missing / "shard-00003.bin").unlink()
    with pytest.raises(DataError, match=r"shard-00003\.bin is missing"):
        TeacherCache(missing)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(k8_cache, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(DataError, match="rerun the same command"):
        TeacherCache(unfinished)


def test_mismatched_run_is_refused_with_what_differs(tmp_path, k8_cache, few_data, small_tokenizer, few_chapters):
    train = few_data.streams["train"]
    with pytest.raises(ConfigError, match=r"block size.*data\.block_size: 32"):
        open_teacher_cache(k8_cache, stream=train, tokenizer=small_tokenizer, block_size=16)
    with pytest.raises(ConfigError, match=r"training data: the cache covers stream"):
        open_teacher_cache(k8_cache, stream=few_data.streams["validation"], tokenizer=small_tokenizer, block_size=BLOCK)
    from lmdistill.data.tokenizer import train_bpe_tokenizer

    other = train_bpe_tokenizer([few_chapters.read_text()], vocab_size=400)
    with pytest.raises(ConfigError, match=r"tokenizer: the cache was built with tokenizer"):
        open_teacher_cache(k8_cache, stream=train, tokenizer=other, block_size=BLOCK)
    # all differences at once
    with pytest.raises(ConfigError) as info:
        open_teacher_cache(k8_cache, stream=few_data.streams["test"], tokenizer=other, block_size=64)
    assert all(s in str(info.value) for s in ("tokenizer:", "training data:", "block size:"))
    assert open_teacher_cache(k8_cache, stream=train, tokenizer=small_tokenizer, block_size=BLOCK).k == 8
    assert cache_tokenizer(k8_cache).get_vocab() == small_tokenizer.get_vocab()


def test_writer_refuses_an_output_holding_another_cache(tmp_path, k8_cache, teacher_model, few_data, small_tokenizer):
    target = tmp_path / "c"
    shutil.copytree(k8_cache, target)
    with pytest.raises(ConfigError, match=r"k \(top-k entries per token\): existing 8, requested 16"):
        _write(target, teacher_model, few_data, small_tokenizer, k=16)
    with pytest.raises(ConfigError, match="temperature"):
        _write(target, teacher_model, few_data, small_tokenizer, temperature=2.0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a teacher cache"):
        _write(tmp_path / "other", teacher_model, few_data, small_tokenizer)


def test_shrinking_a_cache_equals_building_it_directly(tmp_path, teacher_model, few_data, small_tokenizer, k8_cache):
    big = tmp_path / "k32"
    _write(big, teacher_model, few_data, small_tokenizer, k=32)
    small = shrink_teacher_cache(big, tmp_path / "k8-from-32", 8)
    a, b = TeacherCache(small), TeacherCache(k8_cache)
    assert a.k == 8 and a.manifest["derived_from"]["k"] == 32
    for i in range(0, a.n_blocks, 37):
        lp_a, ids_a, res_a = (np.asarray(x) for x in a.block(i))
        lp_b, ids_b, res_b = (np.asarray(x) for x in b.block(i))
        assert np.array_equal(ids_a, ids_b) and np.array_equal(lp_a, lp_b)
        np.testing.assert_allclose(res_a.astype(np.float64), res_b.astype(np.float64), rtol=2e-3, atol=2e-3)


def test_temperature_is_stored_and_enforced(tmp_path, teacher_model, few_data, small_tokenizer):
    path = tmp_path / "t2"
    _write(path, teacher_model, few_data, small_tokenizer, temperature=2.0, blocks_per_shard=500)
    cache = TeacherCache(path)
    blocks = few_data.blocks("train")
    batch = collate([blocks[1]]) | {"block_index": torch.tensor([1])}
    with torch.no_grad():
        ref = torch.log_softmax(teacher_model(input_ids=batch["input_ids"]).logits[0].double() / 2.0, -1)
    sparse = cache.signal(batch)
    torch.testing.assert_close(sparse.logprobs.double(), ref.gather(-1, sparse.indices), rtol=1e-3, atol=2e-3)
    student = torch.randn(BLOCK, cache.vocab_size)
    build_objective({"name": "forward_kl", "temperature": 2.0})(student, sparse, batch["labels"].reshape(-1))
    with pytest.raises(ValueError, match="temperature 2.0"):
        build_objective("forward_kl")(student, sparse, batch["labels"].reshape(-1))


# ------------------------------------------------------------------------------------ trainer
@pytest.mark.slow
def test_training_from_a_k_equal_vocab_cache_equals_the_live_teacher(
    tmp_path, trained_teacher, teacher_model, few_data, few_chapters, small_tokenizer, cache_dir
):
    from lmdistill.config import validate_config
    from lmdistill.train.run import build_trainer, run_training

    cache = tmp_path / "cache"
    _write(cache, teacher_model, few_data, small_tokenizer, k=len(small_tokenizer), dtype="float32", blocks_per_shard=200)
    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=3)
    losses = {}
    for name, teacher in (("live", {"path": str(trained_teacher)}), ("cache", {"cache": str(cache)})):
        for chunked in (False, True):
            cfg = validate_config(run_config(tmp_path / f"{name}-{chunked}", few_chapters, cache_dir, student, teacher,
                                              chunked_loss=chunked, chunk_size=48))
            trainer, _ = build_trainer(cfg, show_progress=False)
            losses[name, chunked] = [trainer.train_step(s) for s in range(cfg.train.steps)]
    for chunked in (False, True):
        assert losses["cache", chunked] == pytest.approx(losses["live", chunked], rel=1e-5)
    # the whole run (train + save + evaluation without teacher agreement) works from a cache alone
    cfg = validate_config(run_config(tmp_path / "full", few_chapters, cache_dir, student, {"cache": str(cache)}))
    result = run_training(cfg, show_progress=False)
    assert math.isfinite(result.final_metrics["loss"]) and "kl_to_teacher" not in result.final_metrics
    # a run whose data do not match the cache is refused before training
    bad = run_config(tmp_path / "bad", few_chapters, cache_dir, student, {"cache": str(cache)})
    bad["data"]["block_size"] = 16
    with pytest.raises(ConfigError, match="block size"):
        build_trainer(validate_config(bad), show_progress=False)


def test_cache_teacher_command_builds_a_usable_cache(tmp_path, trained_teacher, few_chapters, cache_dir, few_data,
                                                     small_tokenizer, k8_cache, capsys):
    from lmdistill.cli.cache import cache_teacher

    config = {
        "output": str(tmp_path / "cli-cache"),
        "data": {"corpus": str(few_chapters), "block_size": BLOCK, "cache_dir": str(cache_dir)},
        "teacher": {"path": str(trained_teacher)},
        "cache": {"k": 16, "blocks_per_shard": 64, "mode": "topk"},
    }
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(config))
    cache_teacher(path, ["cache.k=8"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["k"] == 8 and summary["bytes_per_token"] == 34 and summary["dense_fp16_bytes_per_token"] == 2 * 512
    # the command computes what the library does with the same settings, byte for byte
    assert _shard_hashes(Path(config["output"])) == _shard_hashes(k8_cache)
    with pytest.raises(ConfigError, match="cache.kk"):
        from lmdistill.config import load_config
        from lmdistill.teachers.cache.command import CacheTeacherConfig

        load_config(path, ["cache.kk=3"], model=CacheTeacherConfig)
