"""Teacher caches across tokenizers: a cache of the teacher's own tokens of the student's text, written by
`lmdistill cache-teacher`, read back as an aligned teacher (the same loss as the live one when k is the whole teacher
vocabulary), checked against the text it was built from, and trained from through the CLI with an exact resume."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.data.blocks import BlockDataset, collate
from lmdistill.data.corpora import read_fortunes
from lmdistill.data.tokenizer import tokenizer_fingerprint, train_bpe_tokenizer
from lmdistill.errors import ConfigError, DataError
from lmdistill.losses import build_objective
from lmdistill.losses.pairing import ModelPair, model_shape
from lmdistill.models.loading import load_causal_lm
from lmdistill.teachers.cache import AlignedTeacherCache, TeacherCache, cache_tokenizer, write_teacher_cache
from lmdistill.teachers.live import load_live_teacher
from lmdistill.train.run import build_trainer
from tests.conftest import save_tiny_model
from tests.teachers.conftest import BLOCK, run_config
from tests.train.helpers import distill_through_cli, straight_and_resumed


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, small_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("xtok-cache") / "student", small_tokenizer, layers=1, hidden=32, seed=2)


@pytest.fixture(scope="module")
def xcache(tmp_path_factory, other_teacher, student_dir, few_chapters, cache_dir):
    """A cross-tokenizer cache written by the CLI: the student's tokenizer for the data, the teacher's own for it."""
    where = tmp_path_factory.mktemp("xtok-cache")
    config = {
        "output": str(where / "cache"),
        "data": {"corpus": str(few_chapters), "block_size": BLOCK, "cache_dir": str(cache_dir)},
        "teacher": {"path": str(other_teacher)},
        "tokenizer": str(student_dir),
        "cache": {"k": 16, "blocks_per_shard": 64},
    }
    (where / "cache.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["cache-teacher", str(where / "cache.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["rows"] == "teacher" and summary["mode"] == "topk" and summary["k"] == 16
    return Path(config["output"])


def _run_config(where: Path, corpus: Path, cache_dir: Path, student: Path, cache: Path, **sections):
    """A validated run config distilling ``student`` from ``cache`` (4 steps), with ``sections`` replaced."""
    from lmdistill.config import validate_config

    raw = run_config(where, corpus, cache_dir, student, {"cache": str(cache)})
    return validate_config({**raw, **sections})


def _blocks(data, split: str, indices) -> dict[str, torch.Tensor]:
    blocks = BlockDataset(data.streams[split], BLOCK)
    batch = collate([blocks[i] for i in indices])
    batch["block_index"] = torch.as_tensor(list(indices), dtype=torch.long)
    return batch


def test_the_cli_writes_the_teachers_own_tokens_of_each_block(xcache, other_teacher, fortune_tokenizer, small_tokenizer,
                                                              few_data):
    manifest = json.loads((xcache / "manifest.json").read_text())
    entry = manifest["teacher_tokenizer"]
    assert manifest["rows"] == "teacher" and manifest["vocab_size"] == len(fortune_tokenizer)
    assert entry["fingerprint"] == tokenizer_fingerprint(fortune_tokenizer) and entry["source"] == str(other_teacher)
    assert entry["max_positions"] == 64 and entry["prefix_ids"] == [] and entry["dir"] == "teacher_tokenizer"
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(small_tokenizer)  # the data: the student's
    assert cache_tokenizer(xcache).get_vocab() == small_tokenizer.get_vocab()
    assert all(1 <= s["teacher_positions"] <= 64 for s in manifest["shards"])
    cache = TeacherCache(xcache)
    assert isinstance(cache, AlignedTeacherCache) and cache.teacher_tokenizer.get_vocab() == fortune_tokenizer.get_vocab()
    batch = _blocks(few_data, "train", range(8))
    for b in range(8):
        ids = cache.teacher_tokens(b).tolist()
        assert 0 < len(ids) <= 64 and max(ids) < len(fortune_tokenizer)
        text = fortune_tokenizer.decode(ids)
        whole = small_tokenizer.decode(batch["input_ids"][b].tolist() + batch["labels"][b, -1:].tolist())
        assert whole.startswith(text)  # the teacher's tokens of the block's own text
    values, _, _ = cache.block(0)
    assert np.all(np.diff(values[: len(cache.teacher_tokens(0))].astype(np.float32), axis=-1) <= 0)  # sorted top-k


def test_another_mode_than_topk_is_refused_for_another_tokenizer(tmp_path, other_teacher, student_dir, few_chapters,
                                                                 cache_dir):
    from lmdistill.teachers.cache.command import CacheTeacherConfig, build_teacher_cache

    config = CacheTeacherConfig(output=str(tmp_path / "c"), teacher={"path": str(other_teacher)},
                                tokenizer=str(student_dir), cache={"mode": "lowrank"},
                                data={"corpus": str(few_chapters), "block_size": BLOCK, "cache_dir": str(cache_dir)})
    with pytest.raises(ConfigError, match="set cache.mode: topk"):
        build_teacher_cache(config, show_progress=False)


def _pair(teacher_tokenizer, student_tokenizer, teacher_path, student_path) -> ModelPair:
    teacher, student = load_causal_lm(teacher_path), load_causal_lm(student_path)
    return ModelPair(teacher_tokenizer, student_tokenizer, teacher.get_output_embeddings().weight.shape[0],
                     student.get_output_embeddings().weight.shape[0], *model_shape(teacher), *model_shape(student))


def _write_validation(path: Path, teacher: Path, teacher_tokenizer, student_tokenizer, data, **kw):
    """A cross-tokenizer cache of the validation split (a dozen blocks)."""
    return write_teacher_cache(path, model=load_causal_lm(teacher), tokenizer=student_tokenizer,
                               teacher_tokenizer=teacher_tokenizer, stream=data.streams["validation"], block_size=BLOCK,
                               blocks_per_shard=4, batch_size=3, model_name=str(teacher), **kw)


@pytest.mark.parametrize(("spec", "cap"), [
    ("span_kd", 64), ({"name": "span_kd", "inner": "reverse_kl", "temperature": 2.0}, 64), ("uld", 64), ("mined", 64),
    ({"name": "projected_kd", "temperature": 2.0}, 64), ("span_kd", 24),
], ids=["span_kd", "span_kd-rkl-t2", "uld", "mined", "projected_kd-t2", "span_kd-cut-at-24"])
def test_k_equal_to_the_teacher_vocabulary_gives_the_live_teachers_loss(spec, cap, tmp_path, other_teacher, student_dir,
                                                                       fortune_tokenizer, small_tokenizer, few_data):
    temperature = spec.get("temperature", 1.0) if isinstance(spec, dict) else 1.0
    path = tmp_path / "full"
    _write_validation(path, other_teacher, fortune_tokenizer, small_tokenizer, few_data, teacher_max_positions=cap,
                      k=len(fortune_tokenizer), dtype="float32", temperature=temperature)
    objective = build_objective(spec)
    live = load_live_teacher(other_teacher, tokenizer=fortune_tokenizer, student_tokenizer=small_tokenizer,
                             student_rows=len(small_tokenizer), objective=objective)
    live.max_positions = cap  # a teacher of `cap` learned positions
    cache = TeacherCache(path)
    cache.pair_with(small_tokenizer, student_rows=len(small_tokenizer), objective=objective)
    pair = _pair(fortune_tokenizer, small_tokenizer, other_teacher, student_dir)
    for leaf in objective.leaves():
        leaf.bind_models(pair)
    n_blocks = len(BlockDataset(few_data.streams["validation"], BLOCK))
    assert n_blocks >= 6
    batch = _blocks(few_data, "validation", [n_blocks - 1, 0, 3, 5, 1])  # across shards, in any order
    stored, made = cache.signal(batch), live.signal(batch)
    assert (stored.alignment.teacher_len == cap) == (cap < 64)  # the cut applies alike
    assert torch.equal(stored.alignment.t_rows, made.alignment.t_rows) and stored.alignment.num_groups > 0
    assert torch.equal(stored.teacher_valid, made.teacher_valid)
    torch.manual_seed(0)
    student_logits = torch.randn(batch["input_ids"].numel(), len(small_tokenizer), dtype=torch.float64)
    labels = batch["labels"].reshape(-1)
    from_cache = objective.per_token(student_logits, stored, labels)
    from_live = objective.per_token(student_logits, made, labels)
    assert from_live.abs().sum() > 0
    torch.testing.assert_close(from_cache, from_live, rtol=1e-5, atol=1e-6)


def test_an_interrupted_build_resumes_to_the_same_bytes(tmp_path, other_teacher, fortune_tokenizer, small_tokenizer,
                                                       few_data):
    def crash(shard):
        raise KeyboardInterrupt

    straight = _write_validation(tmp_path / "straight", other_teacher, fortune_tokenizer, small_tokenizer, few_data, k=8)
    with pytest.raises(KeyboardInterrupt):
        _write_validation(tmp_path / "resumed", other_teacher, fortune_tokenizer, small_tokenizer, few_data, k=8,
                          on_shard_written=crash)
    again = _write_validation(tmp_path / "resumed", other_teacher, fortune_tokenizer, small_tokenizer, few_data, k=8)
    assert again.shards_skipped == [0] and len(straight.shards_written) == len(again.shards_written) + 1
    hashes = [[s["sha256"] for s in json.loads((tmp_path / d / "manifest.json").read_text())["shards"]]
              for d in ("straight", "resumed")]
    assert hashes[0] == hashes[1]
    with pytest.raises(ConfigError, match="teacher tokenizer"):  # another teacher tokenizer is another cache
        _write_validation(tmp_path / "resumed", other_teacher, train_bpe_tokenizer(
            [d.text for d in itertools.islice(read_fortunes(), 500)], vocab_size=300), small_tokenizer, few_data, k=8)


def test_a_cache_of_other_tokens_or_other_text_is_a_clear_error(tmp_path, xcache, few_data, small_tokenizer,
                                                                 few_chapters):
    cache = TeacherCache(xcache)
    cache.pair_with(small_tokenizer, student_rows=len(small_tokenizer), objective=build_objective("uld"))
    batch = _blocks(few_data, "train", range(4))
    assert cache.signal(batch).alignment.num_groups > 0
    batch["block_index"] = batch["block_index"] + 1  # the stored blocks of another text
    with pytest.raises(DataError, match="another teacher tokenizer or from another text"):
        cache.signal(batch)
    # a teacher tokenizer other than the one the cache was built with
    other = train_bpe_tokenizer([few_chapters.read_text()], vocab_size=600)
    cache.teacher_tokenizer = other
    cache.pair_with(small_tokenizer, student_rows=len(small_tokenizer), objective=build_objective("uld"))
    with pytest.raises(DataError, match=r"block 0: the teacher's tokens .* another teacher tokenizer"):
        cache.signal(_blocks(few_data, "train", range(4)))
    # a cache whose saved teacher tokenizer was swapped is refused when opened
    swapped = tmp_path / "swapped"
    shutil.copytree(xcache, swapped)
    shutil.rmtree(swapped / "teacher_tokenizer")
    other.save_pretrained(swapped / "teacher_tokenizer")
    with pytest.raises(DataError, match="not the one the cache was built with"):
        TeacherCache(swapped)


def test_a_run_refuses_a_same_vocabulary_objective_on_rung_4_and_a_cache_in_other_tokens(
        tmp_path, xcache, k8_cache, few_chapters, cache_dir, student_dir, fortune_tokenizer):
    cfg = _run_config(tmp_path / "a", few_chapters, cache_dir, student_dir, xcache, objective="forward_kl",
                      vocab={"rung": "different"})
    with pytest.raises(ConfigError, match="rung 4 .*only in teacher"):
        build_trainer(cfg, show_progress=False)
    # a cache in the teacher's tokens (same-tokenizer cache) with a student of other tokens: how to build one
    other_student = save_tiny_model(tmp_path / "fortune-student", fortune_tokenizer, layers=1, hidden=32)
    cfg = _run_config(tmp_path / "b", few_chapters, cache_dir, other_student, k8_cache, objective="forward_kl")
    with pytest.raises(ConfigError, match="tokenizers differ.*cache-teacher` and tokenizer: <the student's"):
        build_trainer(cfg, show_progress=False)


@pytest.mark.parametrize("objective", [
    {"mix": [{"name": "cross_entropy"}, {"name": "span_kd"}]},
    {"mix": [{"name": "cross_entropy"}, {"name": "projected_kd"}]},
], ids=["span_kd+ce", "projected_kd+ce"])
def test_distill_trains_from_a_cross_tokenizer_cache(objective, tmp_path, xcache, few_chapters, cache_dir, student_dir):
    output = distill_through_cli(tmp_path, few_chapters, cache_dir, student_dir, {"cache": str(xcache)}, objective,
                                 block_size=BLOCK)
    assert "vocabulary rung" in output


def test_a_run_from_a_cross_tokenizer_cache_resumes_exactly(tmp_path, xcache, few_chapters, cache_dir, student_dir,
                                                           monkeypatch):
    def cfg(where):
        return _run_config(where, few_chapters, cache_dir, student_dir, xcache,
                           objective={"mix": [{"name": "cross_entropy"}, {"name": "span_kd", "weight": 0.5}]},
                           checkpoint={"every": 2, "keep": 3})

    straight, resumed = straight_and_resumed(cfg(tmp_path / "a"), cfg(tmp_path / "b"), monkeypatch)
    straight.close()
    resumed.close()
