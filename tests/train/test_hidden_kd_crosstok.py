"""Representation KD across tokenizers: a teacher with its own tokenizer serves its hidden states with the alignment,
and hidden_states, trg, attention_relations and nd compare both models at the aligned span ends (float64 references
written from the formulas on span-pooled states), through the trainer (rungs 3 and 4), the CLI and an exact resume;
with one tokenizer the live teacher stays token by token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses import build_objective
from lmdistill.losses.crosstok import SpanKD
from lmdistill.losses.pairing import ModelPair
from lmdistill.losses.representation import AlignedStates, span_features
from lmdistill.teachers.aligned import AlignedLiveTeacher
from lmdistill.teachers.live import LiveTeacher, load_live_teacher
from lmdistill.train.run import build_trainer
from tests.train.helpers import (
    distill_through_cli,
    relation_kl_reference,
    run_config,
    straight_and_resumed,
)

CROSS_MIX = {"mix": [{"name": "cross_entropy"}, {"name": "hidden_states", "weight": 0.5},
                     {"name": "trg", "weight": 0.1, "terms": ["contextual", "local", "global"], "nodes": 24, "k": 4},
                     {"name": "attention_relations", "weight": 0.1}, {"name": "nd", "weight": 0.1}]}


@pytest.fixture(scope="module")
def aligned(other_teacher, fortune_tokenizer, small_tokenizer):
    return load_live_teacher(other_teacher, tokenizer=fortune_tokenizer, student_tokenizer=small_tokenizer,
                             student_rows=len(small_tokenizer), objective=build_objective("hidden_states"))


def _pair(small_tokenizer, fortune_tokenizer, student_layers=1, student_width=32, teacher_layers=2, teacher_width=48):
    return ModelPair(fortune_tokenizer, small_tokenizer, len(fortune_tokenizer), len(small_tokenizer), teacher_layers,
                     teacher_width, student_layers, student_width, seed=5)


def _random_states(layers, b, length, width, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, length, width, generator=g, dtype=torch.float64) for _ in range(layers + 1))


@pytest.fixture(scope="module")
def crossed(aligned, student_batch):
    """Random float64 states of both sides on a real alignment: student [4, 32, 32], teacher [4, Lt, 48]."""
    signal, states = aligned.signal_and_states(student_batch, chunked=False)
    a = signal.alignment
    student = _random_states(1, 4, 32, 32, 0)
    teacher = AlignedStates(_random_states(2, 4, a.teacher_len, 48, 1), a)
    labels = student_batch["labels"].reshape(-1).clone()
    labels[5] = IGNORE_INDEX  # an ignored label: that span (if one ends there) takes no part
    return student, teacher, labels, a


def _pooled(student, teacher, a, labels, s, t):
    """Per sequence, the span-end pairs both sides have (as span_features pairs them), in text order, without the
    ignored label's: [(student positions, student [g, d_s], teacher [g, d_t])]."""
    s_pos, t_pos = a.s_last_pos, a.t_last_pos
    keep = (s_pos >= 0) & (t_pos >= 0)
    s_pos, t_pos = s_pos[keep], t_pos[keep]
    s_feat, t_feat = span_features(student[s], teacher[t], a)
    real = labels[s_pos] != IGNORE_INDEX
    out = []
    for b in range(a.batch_size):
        rows = ((s_pos // a.student_len) == b) & real
        out.append((s_pos[rows].numpy(), s_feat[rows].numpy(), t_feat[rows].numpy()))
    return out


def test_one_tokenizer_keeps_the_live_teacher_and_another_gets_the_aligned_one(aligned, tiny_teacher,
                                                                               small_tokenizer):
    for objective in ("hidden_states", {"mix": [{"name": "cross_entropy"}, {"name": "attention_relations"}]}):
        live = load_live_teacher(tiny_teacher, tokenizer=small_tokenizer, student_tokenizer=small_tokenizer,
                                 student_rows=len(small_tokenizer), objective=build_objective(objective))
        assert isinstance(live, LiveTeacher)
    assert isinstance(aligned, AlignedLiveTeacher) and aligned.serves_states
    # the same signal on both paths: the trainer decides by the objective (projected_kd alone takes chunks)
    assert aligned.chunked_mismatch(torch.zeros(1, 4, dtype=torch.long)) is None


def test_the_aligned_teacher_serves_its_own_states_from_one_forward(aligned, student_batch):
    signal, states = aligned.signal_and_states(student_batch, chunked=False)
    assert isinstance(states, AlignedStates) and states.alignment is signal.alignment
    inputs = aligned.batcher(aligned.student_tokens(student_batch), max_teacher_len=aligned.max_positions)
    with torch.no_grad():
        out = aligned.model(input_ids=inputs.teacher_input_ids, attention_mask=inputs.teacher_attention_mask,
                            output_hidden_states=True)
    assert len(states) == 3 and all(torch.equal(x, y) for x, y in zip(states, out.hidden_states))
    assert torch.equal(signal.logits, aligned.signal(student_batch).logits)


def test_hidden_states_across_tokenizers_is_its_formula_on_span_ends(crossed, small_tokenizer, fortune_tokenizer):
    student, teacher, labels, a = crossed
    objective = build_objective({"name": "hidden_states", "layers": [[1, 2], [0, 1]]})
    objective.bind_models(_pair(small_tokenizer, fortune_tokenizer))
    objective.module.double()
    got = objective.state_per_token(student, teacher, labels)
    expected = np.zeros(labels.numel())
    for k, (s, t) in enumerate([(1, 2), (0, 1)]):
        w = objective.module.projection.maps[k].weight.detach().double().numpy()
        for rows, xs, xt in _pooled(student, teacher, a, labels, s, t):
            expected[rows] += ((xs @ w.T - xt) ** 2).mean(-1) / 2
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-10, atol=1e-13)
    assert (expected != 0).sum() > 40 and expected[5] == 0


def test_trg_and_attention_relations_across_tokenizers_relate_the_spans_of_each_sequence(
        crossed, small_tokenizer, fortune_tokenizer):
    student, teacher, labels, a = crossed
    pair = _pair(small_tokenizer, fortune_tokenizer)
    trg = build_objective("trg")
    relations = build_objective({"name": "attention_relations", "heads": 8})
    trg.bind_models(pair)
    relations.bind_models(pair)
    got_trg = trg.state_per_token(student, teacher, labels).numpy()
    got_rel = relations.state_per_token(student, teacher, labels).numpy()
    expected_trg, expected_rel = np.zeros(labels.numel()), np.zeros(labels.numel())

    def context(x):
        z = x @ x.T / math.sqrt(x.shape[-1])
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    for rows, xs, xt in _pooled(student, teacher, a, labels, 1, 2):
        expected_trg[rows] = ((context(xt) - context(xs)) ** 2).mean(-1)
        g = len(rows)
        expected_rel[rows] = relation_kl_reference(xs[None], xt[None], 8, np.ones((1, g), dtype=bool))[0]
    np.testing.assert_allclose(got_trg, expected_trg, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got_rel, expected_rel, rtol=1e-10, atol=1e-13)
    assert (expected_trg > 0).sum() > 40


def test_nd_across_tokenizers_classes_each_span_by_the_students_next_token(crossed, small_tokenizer,
                                                                            fortune_tokenizer):
    student, teacher, labels, a = crossed
    nd = build_objective("nd")
    nd.bind_models(_pair(small_tokenizer, fortune_tokenizer))
    nd.projection.double()
    got = nd.state_per_token(student, teacher, labels).detach()
    rows = np.concatenate([r for r, _, _ in _pooled(student, teacher, a, labels, 1, 2)])
    seen = nd.means.counts.nonzero().squeeze(1)
    assert int(nd.means.counts.sum()) == len(rows)  # one teacher state per span end, under the student's label
    assert set(seen.tolist()) == set(labels[torch.from_numpy(rows)].tolist())
    off = np.setdiff1d(np.arange(labels.numel()), rows)
    assert bool((got[torch.from_numpy(off)] == 0).all()) and float(got.abs().sum()) > 0


@pytest.mark.parametrize("rung", ["different", "partial"])
def test_representation_kd_across_tokenizers_through_the_trainer(rung, tmp_path, kjv_small_txt, cache_dir,
                                                                  student_dir, other_teacher):
    objective = CROSS_MIX if rung == "different" else {"mix": [{"name": "forward_kl"}, {"name": "hidden_states"}]}
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir, other_teacher, objective=objective,
                     vocab={"rung": rung}, train={"steps": 2, "warmup_steps": 0})
    trainer, _ = build_trainer(cfg, show_progress=False)
    try:
        assert isinstance(trainer.teacher, AlignedLiveTeacher)
        parts = [part for part, _ in trainer.objective.parts]
        if rung == "partial":  # the same-vocabulary part runs on aligned spans, the states part on span ends
            assert isinstance(parts[0], SpanKD) and parts[1].name == "hidden_states"
        projection = parts[1].module.projection.maps[0].weight
        before = projection.detach().clone()
        losses = [trainer.train_step(0), trainer.train_step(1)]
        assert all(math.isfinite(x) for x in losses)
        # label-only logits take chunks across tokenizers; span-folded KD (rung 3) couples a sequence's rows
        assert trainer.use_chunked is (rung == "different")
        assert not torch.equal(before, projection.detach())
    finally:
        trainer.close()


def test_a_cross_tokenizer_representation_run_resumes_exactly(tmp_path, kjv_small_txt, cache_dir, student_dir,
                                                              other_teacher, monkeypatch):
    def cfg(where):
        return run_config(where, kjv_small_txt, cache_dir, student_dir, other_teacher, objective=CROSS_MIX,
                          train={"steps": 4, "warmup_steps": 0}, checkpoint={"every": 2, "keep": 3})

    straight, resumed = straight_and_resumed(cfg(tmp_path / "a"), cfg(tmp_path / "b"), monkeypatch)
    a, b = straight.objective.state_dict()["parts"], resumed.objective.state_dict()["parts"]
    for part in (1, 2):
        pa, pb = a[part]["state"]["projection"], b[part]["state"]["projection"]
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(a[4]["state"]["means"]["sums"], b[4]["state"]["means"]["sums"])
    straight.close()
    resumed.close()


def test_hidden_states_across_tokenizers_through_the_cli(tmp_path, kjv_small_txt, cache_dir, student_dir,
                                                         other_teacher):
    output = distill_through_cli(
        tmp_path, kjv_small_txt, cache_dir, student_dir, {"path": str(other_teacher)},
        {"mix": [{"name": "cross_entropy"}, {"name": "hidden_states", "weight": 0.5, "loss": "cosine"}]})
    assert "vocabulary rung 3 (partial)" in output  # other tokenizers: the aligned teacher, chosen by rung
