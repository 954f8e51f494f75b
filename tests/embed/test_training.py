"""Training machinery: batching, schedule, teacher signal and negatives, and that each loop learns."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from lmdistill.embed.config import EmbedTrainConfig
from lmdistill.embed.encoder import TextEncoder
from lmdistill.embed.losses import margin_mse_loss
from lmdistill.embed.m3 import M3Encoder
from lmdistill.embed.mining import build_training_signal
from lmdistill.embed.task import RetrievalTask, TrainPair
from lmdistill.embed.train import (
    _group_mask,
    batch_indices,
    make_optimizer,
    run_loop,
    sample_negative,
    train_infonce,
    train_m3,
    train_margin_mse,
)

WORDS = ["river", "cat", "oak", "bank", "acorn", "dog", "wolf", "seed", "stone", "cloud", "snow", "fire"]


def toy_task() -> RetrievalTask:
    train, corpus, groups = [], {}, {}
    for i, w in enumerate(WORDS):
        doc_id = f"gcide:{w}#1"
        corpus[doc_id] = f"{w}: a {w} is the {w} thing"
        groups[doc_id] = w
        train.append(TrainPair(f"what is {w}", corpus[doc_id], doc_id, w))
    # A second entry of "cat": same group, so never a negative for cat's query.
    corpus["gcide:cat#2"] = "cat: to vomit, in old slang"
    groups["gcide:cat#2"] = "cat"
    return RetrievalTask("toy", {}, {}, {}, train, corpus, groups)


def char_teacher(texts):
    out = np.zeros((len(texts), 26))
    for i, t in enumerate(texts):
        for ch in t.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny_bert(minilm_path):
    def make() -> TextEncoder:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return TextEncoder(BertModel(config), AutoTokenizer.from_pretrained(minilm_path), max_seq_length=24)

    return make


def test_batch_indices_cover_each_pass_without_repeats():
    batches = list(batch_indices(10, 4, 5, seed=1))
    assert all(len(b) == len(set(b)) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10))  # the first pass visits every pair once
    assert batches == list(batch_indices(10, 4, 5, seed=1))
    assert batches != list(batch_indices(10, 4, 5, seed=2))


def test_schedule_warms_up_then_decays_linearly():
    cfg = EmbedTrainConfig(steps=10, warmup_steps=4, lr=1.0)
    opt, sched = make_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], cfg)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert lrs[4:] == pytest.approx([1 - k / 6 for k in range(6)])


def test_teacher_signal_negatives_are_ranked_and_never_of_the_same_headword():
    task = toy_task()
    signal = build_training_signal(task, teacher_encode=char_teacher, negatives_from="teacher", top_k=3)
    docs = [task.train_corpus[d] for d in signal.doc_ids]
    for i, pair in enumerate(task.train):
        assert all(signal.doc_groups[r] != pair.group for r in signal.negatives[i])
        scores = char_teacher([pair.query]) @ char_teacher(docs).T
        expected = [r for r in np.argsort(-scores[0], kind="stable") if signal.doc_groups[r] != pair.group][:3]
        assert signal.negatives[i] == expected
        # Cached teacher scores equal scoring the texts afresh.
        assert signal.teacher_pair_scores([i], [expected[0]]).item() == pytest.approx(scores[0, expected[0]])
    skipped = build_training_signal(task, teacher_encode=char_teacher, negatives_from="teacher", top_k=2, skip_top=1)
    assert all(s == full[1:3] for s, full in zip(skipped.negatives, build_training_signal(
        task, teacher_encode=char_teacher, negatives_from="teacher", top_k=3).negatives))
    lexical = build_training_signal(task, negatives_from="bm25", top_k=2)
    assert lexical.teacher_query is None and all(len(n) <= 2 for n in lexical.negatives)
    with pytest.raises(ValueError, match="needs a teacher"):
        build_training_signal(task, negatives_from="teacher")


def test_sample_negative_respects_the_mix_and_the_headword():
    task = toy_task()
    signal = build_training_signal(task, teacher_encode=char_teacher, negatives_from="teacher", top_k=2)
    rng = random.Random(0)
    cat = WORDS.index("cat")
    mined = {sample_negative(signal, cat, "cat", rng, 0.0) for _ in range(50)}
    assert mined <= set(signal.negatives[cat])
    randoms = [sample_negative(signal, cat, "cat", rng, 1.0) for _ in range(200)]
    assert all(signal.doc_groups[r] != "cat" for r in randoms)
    assert len(set(randoms)) > len(signal.negatives[cat])


def test_group_mask_hides_unlabelled_positives_only():
    task = toy_task()
    cat = WORDS.index("cat")
    groups = ["cat", "dog", "cat"]
    mask = _group_mask(task, [cat], groups, target=[0])
    assert mask.tolist() == [[False, False, True]]


def test_infonce_training_learns_the_pairs(tiny_bert):
    task = toy_task()
    student = tiny_bert()
    result = train_infonce(student, task, EmbedTrainConfig(steps=30, batch_size=6, lr=3e-3, warmup_steps=0), seed=0)
    assert np.mean(result.losses[-5:]) < 0.6 * np.mean(result.losses[:5])


def test_margin_mse_training_moves_student_margins_towards_the_teacher(tiny_bert):
    task = toy_task()
    signal = build_training_signal(task, teacher_encode=char_teacher, negatives_from="teacher", top_k=3)
    student = tiny_bert()
    pairs = list(range(len(task.train)))
    negs = [signal.negatives[i][0] for i in pairs]

    def loss_on_triples() -> float:
        with torch.no_grad():
            q = student.embed([task.train[i].query for i in pairs])
            p = student.embed([task.train_corpus[signal.doc_ids[signal.positive_index[i]]] for i in pairs])
            n = student.embed([task.train_corpus[signal.doc_ids[r]] for r in negs])
            t_pos = signal.teacher_pair_scores(pairs, [signal.positive_index[i] for i in pairs])
            t_neg = signal.teacher_pair_scores(pairs, negs)
            return margin_mse_loss((q * p).sum(-1), (q * n).sum(-1), t_pos, t_neg).item()

    before = loss_on_triples()
    cfg = EmbedTrainConfig(steps=40, batch_size=6, lr=3e-3, warmup_steps=0)
    train_margin_mse(student, task, cfg, signal=signal, seed=0)
    assert loss_on_triples() < 0.5 * before


def test_m3_training_runs_with_and_without_self_distillation(tiny_bert):
    task = toy_task()
    signal = build_training_signal(task, negatives_from="bm25", top_k=2)
    for self_distill in (True, False):
        model = M3Encoder(tiny_bert(), colbert_dim=8)
        result = train_m3(model, task, EmbedTrainConfig(steps=25, batch_size=6, lr=3e-3, warmup_steps=0), signal=signal,
                          score_weights=(1.0, 0.3, 1.0), loss_weights=(1.0, 0.1, 1.0), self_distill=self_distill)
        assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
        assert bool(result.extra["self_distill"]) == self_distill


def test_margin_mse_with_in_batch_term_adds_the_weighted_infonce(tiny_bert):
    task = toy_task()
    signal = build_training_signal(task, teacher_encode=char_teacher, negatives_from="teacher", top_k=3)
    cfg = EmbedTrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=0)
    plain = train_margin_mse(tiny_bert(), task, cfg, signal=signal, seed=0)
    assert plain.extra == {}
    mixed = train_margin_mse(tiny_bert(), task, cfg, signal=signal, inbatch_weight=0.5, seed=0)
    parts = mixed.extra
    assert set(parts) == {"margin_mse", "infonce"}
    for total, mse, nce in zip(mixed.losses, parts["margin_mse"], parts["infonce"]):
        assert total == pytest.approx(mse + 0.5 * nce, rel=1e-5)
    # Same seed, same first batch and same initial weights: the Margin-MSE part starts where the plain loss did.
    assert parts["margin_mse"][0] == pytest.approx(plain.losses[0], rel=1e-5)
    # In-batch InfoNCE over 2B candidates of an untrained student sits near log(2B), far from zero.
    assert parts["infonce"][0] > 0.5 * np.log(2 * cfg.batch_size)


def test_a_non_finite_loss_stops_training():
    model = torch.nn.Linear(2, 1)

    def step(batch):
        return model(torch.full((1, 2), float("nan"))).sum(), {}

    with pytest.raises(FloatingPointError, match="non-finite"):
        run_loop("nan", model, 4, EmbedTrainConfig(steps=2, batch_size=2), step, seed=0, log=None)


def test_training_signal_is_cached_per_task_and_mining_setup(tmp_path):
    from lmdistill.embed.config import parse_config
    from lmdistill.embed.run import training_signal

    task = toy_task()
    cfg = parse_config({"method": "m3", "task": {"cache_dir": str(tmp_path)}, "mining": {"top_k": 2}})
    first = training_signal(cfg, task)
    files = list(tmp_path.glob("signal-*.safetensors"))
    assert len(files) == 1
    again = training_signal(cfg, task)
    assert again.negatives == first.negatives and again.doc_ids == first.doc_ids
    fresh = build_training_signal(task, negatives_from="bm25", top_k=2)
    assert again.negatives == fresh.negatives
    # Another mining setup, or other texts, is another cache entry.
    wider = parse_config({"method": "m3", "task": {"cache_dir": str(tmp_path)}, "mining": {"top_k": 3}})
    assert any(len(n) == 3 for n in training_signal(wider, task).negatives)
    task.train_corpus["gcide:wolf#1"] = "wolf: a wild dog"
    training_signal(cfg, task)
    assert len(list(tmp_path.glob("signal-*.safetensors"))) == 3
