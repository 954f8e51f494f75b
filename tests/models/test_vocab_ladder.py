"""The vocabulary ladder: rung detection on real tokenizers, forced rungs, token normalisation, and the fold of
two vocabularies onto shared columns (checked against a float64 reference written from the rule)."""

from __future__ import annotations

import copy
import itertools
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmdistill.data.tokenizer import train_bpe_tokenizer
from lmdistill.errors import ConfigError
from lmdistill.models.vocab import (
    SAME_MAP_RUNGS,
    SharedVocab,
    VocabAlignment,
    fold_log_probs,
    require_rung,
    shared_vocab,
    token_keys,
    vocab_ladder,
)


@pytest.fixture(scope="module")
def kjv_bpe(kjv_verses):
    return train_bpe_tokenizer([t for _, t in kjv_verses[:3000]], vocab_size=600)


@pytest.fixture(scope="module")
def other_bpe(real_texts):
    """A byte-level BPE of another size on other text (GCIDE entries and fortunes)."""
    return train_bpe_tokenizer(real_texts[-1500:], vocab_size=900)


def _wrap(backend: Tokenizer, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special)


@pytest.fixture(scope="module")
def word_level(kjv_verses):
    """Whole words, no byte pieces: little in common with a byte-level BPE."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([t for _, t in kjv_verses[:3000]],
                                trainers.WordLevelTrainer(vocab_size=400, special_tokens=["</s>", "[UNK]"]))
    return _wrap(backend, eos_token="</s>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def sentencepiece_style():
    """A hand-made SentencePiece-style vocabulary: '▁' for spaces, <0xNN> byte fallback, '</s>' as eos."""
    vocab = {"<unk>": 0, "</s>": 1, "<0x0A>": 2, "<0xC3>": 3, "▁": 4, "t": 5, "h": 6, "e": 7, "▁t": 8, "▁the": 9, "he": 10}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return _wrap(backend, eos_token="</s>", unk_token="<unk>")


# ------------------------------------------------------------------------------------------ normalised keys
def test_byte_level_keys_spell_the_text(kjv_bpe, other_bpe, real_texts):
    """Independent of the byte table: the keys of any tokenization concatenate to the text's UTF-8 bytes."""
    for tok in (kjv_bpe, other_bpe):
        keys = token_keys(tok)
        for text in real_texts[::97][:40] + ["naïve café — 日本語 🙂\n\ttabs"]:
            ids = tok(text, add_special_tokens=False).input_ids
            assert b"".join(keys[i] for i in ids) == text.encode("utf-8")


def test_markers_and_specials_normalise_across_tokenizer_kinds(kjv_bpe, sentencepiece_style, word_level):
    sp = token_keys(sentencepiece_style)
    vocab = sentencepiece_style.get_vocab()
    assert sp[vocab["▁the"]] == b" the" and sp[vocab["<0x0A>"]] == b"\n" and sp[vocab["<0xC3>"]] == b"\xc3"
    bl = token_keys(kjv_bpe)
    assert bl[kjv_bpe.convert_tokens_to_ids("Ġthe")] == b" the" == sp[vocab["▁the"]]
    # eos by role, whatever its spelling
    assert sp[vocab["</s>"]] == bl[kjv_bpe.eos_token_id] == token_keys(word_level)[word_level.eos_token_id] == ("special", "eos")
    pairing = shared_vocab(sentencepiece_style, kjv_bpe, teacher_rows=len(sentencepiece_style), student_rows=len(kjv_bpe))
    assert b" the" in pairing.shared_keys and ("special", "eos") in pairing.shared_keys


# ------------------------------------------------------------------------------------------ rungs
def test_auto_rungs_on_real_tokenizers(kjv_bpe, other_bpe, word_level, caplog):
    n = len(kjv_bpe)
    same = vocab_ladder(kjv_bpe, kjv_bpe, teacher_rows=n, student_rows=n)
    assert isinstance(same, VocabAlignment) and same.rung == "identical"
    padded = vocab_ladder(kjv_bpe, kjv_bpe, teacher_rows=n + 64, student_rows=n)
    assert padded.rung == "padded" and str(n + 64) in padded.reason and padded.real_vocab_size == n
    with caplog.at_level(logging.INFO, logger="lmdistill.models.vocab"):
        partial = vocab_ladder(other_bpe, kjv_bpe, teacher_rows=len(other_bpe), student_rows=n)
    assert isinstance(partial, SharedVocab) and partial.rung == "partial"
    assert "vocabulary rung 3 (partial)" in caplog.text and "shared" in partial.reason
    different = vocab_ladder(word_level, kjv_bpe, teacher_rows=len(word_level), student_rows=n)
    assert different.rung == "different" and "below" in different.reason
    # the fraction the rule uses, counted independently from the two key lists
    t_keys, s_keys = set(token_keys(other_bpe)) - {None}, set(token_keys(kjv_bpe)) - {None}
    assert partial.num_shared == len(t_keys & s_keys)
    assert partial.shared_fraction == pytest.approx(len(t_keys & s_keys) / min(len(t_keys), len(s_keys)))


def test_forced_rungs(kjv_bpe, other_bpe, word_level):
    n = len(kjv_bpe)
    with pytest.raises(ConfigError) as err:
        vocab_ladder(other_bpe, kjv_bpe, teacher_rows=len(other_bpe), student_rows=n, rung="identical")
    assert "tokenizers differ" in str(err.value) and "only in" in str(err.value)
    with pytest.raises(ConfigError, match="padded"):
        vocab_ladder(kjv_bpe, kjv_bpe, teacher_rows=n + 8, student_rows=n, rung="identical")
    forced = vocab_ladder(word_level, kjv_bpe, teacher_rows=len(word_level), student_rows=n, rung="partial")
    assert forced.rung == "partial" and "forced by vocab.rung: partial" in forced.reason
    with pytest.raises(ConfigError, match="vocab.rung must be auto or one of identical, padded, partial, different"):
        vocab_ladder(kjv_bpe, kjv_bpe, teacher_rows=n, student_rows=n, rung="rung3")
    with pytest.raises(ConfigError, match="output layer has"):
        vocab_ladder(other_bpe, kjv_bpe, teacher_rows=len(other_bpe), student_rows=n - 1)


def test_a_method_that_cannot_handle_the_rung_names_the_differing_tokens(kjv_bpe, other_bpe):
    partial = vocab_ladder(other_bpe, kjv_bpe, teacher_rows=len(other_bpe), student_rows=len(kjv_bpe))
    require_rung(partial, "span_kd", {"partial", "different"})
    with pytest.raises(ConfigError) as err:
        require_rung(partial, "forward_kl", SAME_MAP_RUNGS)
    msg = str(err.value)
    assert "'forward_kl'" in msg and "rung 3 (partial" in msg and "only in teacher" in msg and "sequence_kd" in msg


# ------------------------------------------------------------------------------------------ the fold
def _reference_fold(t_keys, s_keys, fold):
    """Column of every id of both sides, from the rule in SharedVocab's docstring (plain Python)."""
    shared = sorted(set(k for k in t_keys if k is not None) & set(k for k in s_keys if k is not None),
                    key=lambda k: t_keys.index(k))
    col = {k: c for c, k in enumerate(shared)}

    def side(keys):
        out = []
        for key in keys:
            if key in col:
                out.append(col[key])
            elif fold == "prefix" and isinstance(key, bytes) and any(key[:e] in col for e in range(1, len(key))):
                out.append(col[max((key[:e] for e in range(1, len(key)) if key[:e] in col), key=len)])
            else:
                out.append("bucket")
        return out

    t_cols, s_cols = side(t_keys), side(s_keys)
    bucket = "bucket" in t_cols and "bucket" in s_cols  # else the side that has bucket tokens drops them

    def resolve(cols):
        return [(len(shared) if bucket else None) if c == "bucket" else c for c in cols]

    return len(shared) + int(bucket), resolve(t_cols), resolve(s_cols)


def _reference_project(logits, columns, num_columns):
    p = np.exp(logits - logits.max())
    p /= p.sum()
    out = np.zeros(num_columns)
    for v, c in enumerate(columns):
        if c is not None:
            out[c] += p[v]
    return out / out.sum()


@pytest.mark.parametrize("fold", ["prefix", "bucket"])
def test_projection_matches_a_float64_reference(other_bpe, kjv_bpe, fold):
    pairing = shared_vocab(other_bpe, kjv_bpe, teacher_rows=len(other_bpe), student_rows=len(kjv_bpe), fold=fold)
    n_cols, t_cols, s_cols = _reference_fold(token_keys(other_bpe), token_keys(kjv_bpe), fold)
    assert pairing.num_columns == n_cols
    g = torch.Generator().manual_seed(3)
    zt = torch.randn(4, len(other_bpe) + 16, generator=g, dtype=torch.float64) * 3
    zt[:, len(other_bpe):] = 50.0  # padding rows: dropped, never mass
    zs = torch.randn(4, len(kjv_bpe), generator=g, dtype=torch.float64) * 3
    pt, ps = pairing.project_to_shared(torch.log_softmax(zt[:, : len(other_bpe)], -1), torch.log_softmax(zs, -1))
    pt_padded = pairing.project(torch.log_softmax(zt, -1), "teacher")  # a wider input is sliced first
    for r in range(4):
        np.testing.assert_allclose(pt[r].exp().numpy(), _reference_project(zt[r, : len(other_bpe)].numpy(), t_cols, n_cols), atol=1e-12)
        np.testing.assert_allclose(ps[r].exp().numpy(), _reference_project(zs[r].numpy(), s_cols, n_cols), atol=1e-12)
    assert torch.isfinite(pt_padded).any()
    assert torch.logsumexp(pt, -1).abs().max() < 1e-12 and torch.logsumexp(ps, -1).abs().max() < 1e-12


def test_a_category_only_one_side_has_is_dropped_and_renormalised(kjv_bpe):
    """The teacher has a special token the student lacks: the student cannot express it, so the teacher's mass
    there is dropped and the rest renormalised (no infinite divergence for want of a column)."""
    extended = copy.deepcopy(kjv_bpe)
    extended.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    extra = extended.convert_tokens_to_ids("<|im_start|>")
    pairing = shared_vocab(extended, kjv_bpe, teacher_rows=len(extended), student_rows=len(kjv_bpe))
    assert not pairing.has_bucket and pairing.teacher.drops and not pairing.student.drops
    logp = torch.log_softmax(torch.randn(2, len(extended), dtype=torch.float64), -1)
    folded = pairing.project(logp, "teacher")
    kept = torch.cat([logp[:, :extra], logp[:, extra + 1:]], -1)
    expected = kept - torch.logsumexp(kept, -1, keepdim=True)
    torch.testing.assert_close(folded.sort(-1).values, expected.sort(-1).values)


def test_identical_tokenizers_fold_to_a_permutation(kjv_bpe):
    n = len(kjv_bpe)
    pairing = vocab_ladder(kjv_bpe, kjv_bpe, teacher_rows=n, student_rows=n, rung="different")
    assert pairing.num_columns == n and not pairing.has_bucket
    logp = torch.log_softmax(torch.randn(3, n, dtype=torch.float64), -1)
    folded = pairing.project(logp, "student")
    assert torch.allclose(folded.sort(-1).values, logp.sort(-1).values, atol=1e-14, rtol=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9), st.integers(1, 5), st.integers(0, 10_000), st.floats(0.3, 6.0))
def test_fold_invariants(vocab, num_columns, seed, scale):
    """Mass is kept, and coarse-graining never increases a KL divergence (data processing inequality)."""
    g = torch.Generator().manual_seed(seed)
    columns = torch.randint(0, num_columns, (vocab,), generator=g)
    p = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * scale, -1)
    q = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * scale, -1)
    fp, fq = fold_log_probs(p, columns, num_columns), fold_log_probs(q, columns, num_columns)
    assert abs(float(torch.logsumexp(fp, -1))) < 1e-12
    kl = float((p.exp() * (p - q)).sum())
    alive = fp > float("-inf")
    kl_folded = float((fp[alive].exp() * (fp[alive] - fq[alive])).sum())
    assert kl_folded <= kl + 1e-12
    for c in range(num_columns):
        members = p[columns == c]
        expected = math.log(float(members.exp().sum())) if members.numel() else float("-inf")
        assert float(fp[c]) == pytest.approx(expected, abs=1e-12)


def test_fold_gradient_and_empty_columns():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    columns = torch.tensor([0, 2, 2, 0, 3, 2, 0])  # column 1 is empty
    torch.autograd.gradcheck(lambda t: fold_log_probs(t, columns, 4)[:, [0, 2, 3]], (x,))
    y = x.detach().clone()
    y[:, 4] = float("-inf")  # column 3's only member has no mass
    y.requires_grad_(True)
    out = fold_log_probs(y, columns, 4)
    assert torch.isneginf(out[:, 1]).all() and torch.isneginf(out[:, 3]).all()
    out[:, [0, 2]].sum().backward()
    assert torch.isfinite(y.grad).all() and (y.grad[:, 4] == 0).all()


def test_fold_sums_columns_exactly_across_a_wide_spread():
    """float32 rows spanning hundreds of nats: a column far below the row's maximum is still summed exactly."""
    row = torch.tensor([[0.0, -200.0, -201.0, -5.0, float("-inf")]], requires_grad=True)
    out = fold_log_probs(row, [0, 1, 1, 0, 2], 3)
    expected = [math.log1p(math.exp(-5.0)), -200.0 + math.log1p(math.exp(-1.0)), float("-inf")]
    assert out[0, 0].item() == pytest.approx(expected[0], rel=1e-6)
    assert out[0, 1].item() == pytest.approx(expected[1], rel=1e-6) and math.isinf(out[0, 2].item())
    out[0, :2].sum().backward()
    assert torch.isfinite(row.grad).all() and row.grad[0, 1].item() == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-5)


@pytest.mark.slow
def test_qwen_and_a_small_bpe_are_a_partial_pair(qwen_hf, kjv_bpe, real_texts):
    """A real large byte-level vocabulary: keys spell the text, and a corpus BPE mostly lives inside it."""
    keys = token_keys(qwen_hf)
    for text in real_texts[::211][:10]:
        assert b"".join(keys[i] for i in qwen_hf(text, add_special_tokens=False).input_ids) == text.encode("utf-8")
    pairing = vocab_ladder(qwen_hf, kjv_bpe, teacher_rows=len(qwen_hf), student_rows=len(kjv_bpe))
    assert pairing.rung == "partial" and pairing.shared_fraction > 0.8
    assert list(itertools.islice((k for k in pairing.only_student), 3))  # a few KJV merges Qwen does not have
