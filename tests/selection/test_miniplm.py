"""MiniPLM difference sampling (arXiv:2410.17215): windowed scoring against float64 references, the
top-fraction rule, and the command end to end on real text with a different reference tokenizer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.data.documents import split_of
from lmdistill.errors import ConfigError
from lmdistill.selection.miniplm import (
    SequenceScores,
    difference_scores,
    scoring_windows,
    select_top_fraction,
    sequence_logprobs,
)
from tests.selection.conftest import noise_texts


@given(n=st.integers(0, 300), window=st.integers(2, 40), data=st.data())
def test_windows_score_every_target_once_with_enough_context(n, window, data):
    stride = data.draw(st.integers(1, window - 1))
    windows = scoring_windows(n, window, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert scored == list(range(1, n))  # every target once, in order
    for j, (start, end, first) in enumerate(windows):
        assert 0 <= start < first <= end <= n and end - start <= window
        if j > 0:
            assert first - start >= window - stride  # context of the first new target


def test_window_settings_are_checked():
    with pytest.raises(ConfigError, match="stride"):
        scoring_windows(10, 8, 8)
    with pytest.raises(ConfigError, match="window"):
        scoring_windows(10, 1, 1)


def _reference_logprob(model, ids: list[int], window: int, stride: int) -> float:
    """Float64 log p(ids[1:] | ...) target by target; target t reads from 0 while t < window, else from
    j * stride with j = ceil((t - window + 1) / stride) (the closed form of the sliding windows)."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            start = 0 if t < window else math.ceil((t - window + 1) / stride) * stride
            logits = model(input_ids=torch.tensor([ids[start:t]])).logits[0, -1].double()
            total += float(torch.log_softmax(logits, -1)[ids[t]])
    return total


@pytest.mark.parametrize("window,stride", [(64, 32), (16, 5), (12, 1)])
def test_sequence_logprobs_equal_a_per_target_float64_reference(scoring_teacher, small_tokenizer, window, stride):
    from lmdistill.models.loading import load_causal_lm

    model = load_causal_lm(scoring_teacher)
    texts = ["Blessed is the man that walketh not in the counsel of the ungodly.", "Selah.",
             "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures."]
    got = sequence_logprobs(model, small_tokenizer, texts, window=window, stride=stride, batch_size=3)
    eos = small_tokenizer.eos_token_id
    for i, text in enumerate(texts):
        ids = [eos, *small_tokenizer(text, add_special_tokens=False)["input_ids"], eos]
        assert got.n_targets[i] == len(ids) - 1
        assert got.logprob[i] == pytest.approx(_reference_logprob(model, ids, window, stride), rel=1e-5, abs=1e-4)


@settings(max_examples=60, deadline=None)
@given(scores=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=60),
       fraction=st.floats(0.01, 1.0))
def test_top_fraction_keeps_the_highest_scores_in_corpus_order(scores, fraction):
    kept = select_top_fraction(scores, fraction)
    assert len(kept) == max(1, math.floor(fraction * len(scores) + 1e-9))
    assert list(kept) == sorted(set(kept.tolist()))
    dropped = np.setdiff1d(np.arange(len(scores)), kept)
    if dropped.size:
        assert min(scores[i] for i in kept) >= max(scores[i] for i in dropped)


def test_difference_scores_follow_the_paper_and_the_byte_variant():
    teacher = SequenceScores(np.array([-10.0, -30.0]), np.array([5, 10]))
    reference = SequenceScores(np.array([-20.0, -25.0]), np.array([4, 12]))
    np.testing.assert_allclose(difference_scores(teacher, reference), [-2.0 + 5.0, -3.0 + 25 / 12])
    np.testing.assert_allclose(difference_scores(teacher, reference, n_bytes=[20, 50], normalize="byte"),
                               [10 / 20, -5 / 50])


def _select(tmp_path, corpus, teacher, reference, **selection):
    from lmdistill.cli.selection import select_miniplm

    config = {"output_dir": str(tmp_path / "out"), "data": {"corpus": str(corpus)},
              "teacher": {"path": str(teacher)}, "reference": {"path": str(reference)},
              "selection": {"batch_size": 8, **selection}}
    path = tmp_path / "miniplm.yaml"
    path.write_text(yaml.safe_dump(config))
    select_miniplm(path, None)
    out = tmp_path / "out"
    return (json.loads((out / "summary.json").read_text()),
            [json.loads(line) for line in (out / "refined.jsonl").read_text().splitlines()],
            [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()])


@pytest.mark.parametrize("normalize", ["token", "byte"])
def test_select_miniplm_across_tokenizers_keeps_text_and_drops_noise(
    tmp_path, mixed_corpus, scoring_teacher, reference_other_tokenizer, normalize, capsys
):
    summary, refined, scores = _select(tmp_path, mixed_corpus, scoring_teacher, reference_other_tokenizer,
                                       normalize=normalize)
    assert json.loads(capsys.readouterr().out)["kept"] == len(refined)
    assert summary["same_tokenizer"] is False and summary["split"] == "train"
    train_ids = [s["id"] for s in scores]
    assert all(split_of(i) == "train" for i in train_ids) and len(train_ids) == summary["documents"]
    assert len(refined) == math.floor(0.5 * len(scores))
    kept = [s for s in scores if s["kept"]]
    assert [r["id"] for r in refined] == [s["id"] for s in kept]  # corpus order
    assert min(s["score"] for s in kept) >= max(s["score"] for s in scores if not s["kept"])
    for s in scores:  # the stored score is the paper's formula of the stored log-likelihoods
        expected = (s["teacher_logprob"] / s["teacher_tokens"] - s["reference_logprob"] / s["reference_tokens"]
                    if normalize == "token" else (s["teacher_logprob"] - s["reference_logprob"]) / s["bytes"])
        assert s["score"] == pytest.approx(expected, rel=1e-9)
    # noise unlike anything the models learnt: the confident teacher finds it less likely than the flatter
    # reference, so it scores low and is removed (the paper's "noisy harmful instances")
    from lmdistill.data.corpora import load_documents

    noise = set(noise_texts(10))
    noise_ids = {d.doc_id for d in load_documents(mixed_corpus) if d.text in noise and split_of(d.doc_id) == "train"}
    assert len(noise_ids) >= 5
    assert not noise_ids & {r["id"] for r in refined}
    assert max(s["score"] for s in scores if s["id"] in noise_ids) < min(s["score"] for s in kept)


def test_same_model_as_teacher_and_reference_scores_zero(tmp_path, mixed_corpus, reference_same_tokenizer):
    summary, refined, scores = _select(tmp_path, mixed_corpus, reference_same_tokenizer, reference_same_tokenizer,
                                       fraction=0.3)
    assert summary["same_tokenizer"] is True
    assert all(s["score"] == 0.0 for s in scores)
    # all tied: the earliest documents are kept (deterministic tie-break)
    assert [r["id"] for r in refined] == [s["id"] for s in scores][: len(refined)]


def test_refined_corpus_reads_back_with_corpus_ids(tmp_path, mixed_corpus, scoring_teacher, reference_same_tokenizer):
    from lmdistill.selection.run import load_refined_documents

    _, refined, _ = _select(tmp_path, mixed_corpus, scoring_teacher, reference_same_tokenizer)
    docs = load_refined_documents(tmp_path / "out" / "refined.jsonl")
    assert [d.doc_id for d in docs] == [r["id"] for r in refined]
    assert [d.text for d in docs] == [r["text"] for r in refined]
