"""Distillation across tokenizers through the one trainer: a teacher that reads the student's text in its own tokens
(never a student id), the rung chosen and logged, same-vocabulary objectives on aligned spans on rung 3 and refused
on rung 4, the cross-tokenizer objectives through the CLI, and an exact resume."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lmdistill.config import VocabConfig
from lmdistill.errors import ConfigError
from lmdistill.losses import ForwardKL, build_objective
from lmdistill.losses.crosstok import SpanKD
from lmdistill.teachers.live import LiveTeacher, load_live_teacher
from lmdistill.train.run import build_trainer
from tests.train.helpers import distill_through_cli, run_config, straight_and_resumed


def test_the_teacher_reads_its_own_tokens_of_the_students_text(other_teacher, fortune_tokenizer, small_tokenizer,
                                                               student_batch, caplog):
    with caplog.at_level(logging.INFO, logger="lmdistill"):
        teacher = load_live_teacher(other_teacher, tokenizer=fortune_tokenizer, student_tokenizer=small_tokenizer,
                                    student_rows=len(small_tokenizer), objective=build_objective("uld"))
    assert any("vocabulary rung" in r.getMessage() and "different tokenizers" in r.getMessage() for r in caplog.records)
    student_tokens = teacher.student_tokens(student_batch)
    inputs = teacher.batcher(student_tokens, max_teacher_len=teacher.max_positions)
    ids, mask = inputs.teacher_input_ids, inputs.teacher_attention_mask.bool()
    assert int(ids.max()) < len(fortune_tokenizer) and ids.shape[1] <= 64
    for b in range(ids.shape[0]):
        text = fortune_tokenizer.decode(ids[b][mask[b]].tolist())
        whole = small_tokenizer.decode(student_tokens[b].tolist())
        assert whole.startswith(text) and len(text) >= len(whole) // 2  # its own tokens of the same text (cut at 64)
    signal = teacher.signal(student_batch)
    expected = teacher.model(input_ids=ids, attention_mask=inputs.teacher_attention_mask).logits
    assert torch.equal(signal.logits, expected.reshape(-1, expected.shape[-1])[:, : len(fortune_tokenizer)])
    assert signal.alignment.num_groups > 0 and int(signal.alignment.t_rows.max()) < ids.numel()


def test_one_tokenizer_through_the_alignment_is_token_kd(tiny_teacher, small_tokenizer, student_batch):
    """Forced onto rung 4 with one tokenizer, span KD on every one-to-one span is exactly token-level forward KL
    (the span's column is the token itself): the alignment and the signal carry the right rows."""
    teacher = load_live_teacher(tiny_teacher, tokenizer=small_tokenizer, student_tokenizer=small_tokenizer,
                                student_rows=len(small_tokenizer), vocab=VocabConfig(rung="different"),
                                objective=build_objective("span_kd"))
    signal = teacher.signal(student_batch)
    a = signal.alignment
    assert bool(a.one_to_one.float().mean() > 0.9)
    torch.manual_seed(0)
    student_logits = torch.randn(student_batch["input_ids"].numel(), len(small_tokenizer), dtype=torch.float64)
    labels = student_batch["labels"].reshape(-1)
    span = SpanKD(teacher.pairing).per_token(student_logits, signal, labels)
    dense = teacher.model(input_ids=student_batch["input_ids"]).logits.reshape(-1, len(small_tokenizer)).double()
    token = ForwardKL().per_token(student_logits, dense, labels)
    rows = a.s_first[a.one_to_one & (a.t_first == a.s_first)]
    assert rows.numel() > 0.8 * labels.numel()
    torch.testing.assert_close(span[rows], token[rows], rtol=1e-5, atol=1e-6)


def test_a_same_vocabulary_objective_on_rung_4_is_refused_naming_the_tokens(other_teacher, fortune_tokenizer,
                                                                         small_tokenizer):
    with pytest.raises(ConfigError) as info:
        load_live_teacher(other_teacher, tokenizer=fortune_tokenizer, student_tokenizer=small_tokenizer,
                          student_rows=len(small_tokenizer), vocab=VocabConfig(rung="different"),
                          objective=build_objective("forward_kl"))
    message = str(info.value)
    assert "rung 4 (different" in message and "only in teacher" in message
    assert "span_kd" in message and "uld" in message and "\n" not in message


def test_rung_3_runs_a_same_vocabulary_objective_on_aligned_spans(tmp_path, kjv_small_txt, cache_dir, student_dir,
                                                                 other_teacher, caplog):
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir, other_teacher,
                     objective={"mix": [{"name": "forward_kl", "temperature": 2.0}, {"name": "cross_entropy"}]},
                     vocab={"rung": "partial"}, train={"steps": 2, "warmup_steps": 0})
    with caplog.at_level(logging.INFO, logger="lmdistill"):
        trainer, _ = build_trainer(cfg, show_progress=False)
    try:
        kd, ce = [part for part, _ in trainer.objective.parts]
        assert isinstance(kd, SpanKD) and kd.temperature == 2.0 and kd.inner.temperature == 1.0
        assert ce.name == "cross_entropy"  # label parts stay on the student's own tokens
        assert any("vocabulary rung 3 (partial)" in r.getMessage() for r in caplog.records)
        result = trainer.train()
        assert math.isfinite(result.final_metrics["loss"]) and math.isfinite(result.history[-1]["loss"])
    finally:
        trainer.close()


@pytest.mark.parametrize("objective", [
    {"mix": [{"name": "cross_entropy"}, {"name": "uld", "weight": 0.5}]},
    {"name": "span_kd", "inner": "reverse_kl", "temperature": 1.5},
    {"name": "mined", "unaligned": "label"},
    {"mix": [{"name": "cross_entropy"}, {"name": "projected_kd", "temperature": 2.0}]},
], ids=["uld+ce", "span_kd", "mined", "projected_kd+ce"])
def test_cross_tokenizer_objectives_through_the_cli(objective, tmp_path, kjv_small_txt, cache_dir, student_dir,
                                                    other_teacher):
    output = distill_through_cli(tmp_path, kjv_small_txt, cache_dir, student_dir, {"path": str(other_teacher)}, objective,
                                 vocab={"rung": "different"})
    assert "rung 4 (different)" in output


def test_a_cross_tokenizer_run_resumes_exactly(tmp_path, kjv_small_txt, cache_dir, student_dir, other_teacher,
                                               monkeypatch):
    def cfg(where):
        return run_config(where, kjv_small_txt, cache_dir, student_dir, other_teacher, objective="span_kd",
                          train={"steps": 4, "warmup_steps": 0}, checkpoint={"every": 2, "keep": 3})

    straight, resumed = straight_and_resumed(cfg(tmp_path / "a"), cfg(tmp_path / "b"), monkeypatch)
    straight.close()
    resumed.close()


def test_the_live_teacher_keeps_one_token_map_when_it_has_one(tiny_teacher, small_tokenizer):
    teacher = load_live_teacher(tiny_teacher, tokenizer=small_tokenizer, student_tokenizer=small_tokenizer,
                                student_rows=len(small_tokenizer), objective=build_objective("forward_kl"))
    assert isinstance(teacher, LiveTeacher) and teacher.alignment.rung == "identical"
