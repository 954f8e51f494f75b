"""ROUGE-L from the LCS definition (hand-computed cases, brute-force LCS), exact match."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.generation.metrics import exact_match, lcs_length, rouge_l, rouge_tokens, score_texts


def brute_lcs(a, b) -> int:
    """Longest common subsequence by trying every subsequence of the shorter sequence (independent of
    the dynamic programme)."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)

    def is_subsequence(sub, seq) -> bool:
        it = iter(seq)
        return all(any(x == y for y in it) for x in sub)

    for k in range(len(short), 0, -1):
        if any(is_subsequence(c, long_) for c in itertools.combinations(short, k)):
            return k
    return 0


def test_lin_2004_example_sentences():
    # Lin (2004), section 3.1: reference S1, candidates S2 and S3.
    s1 = "police killed the gunman"
    assert rouge_l("police kill the gunman", s1) == pytest.approx(3 / 4)  # LCS "police the gunman"
    assert rouge_l("the gunman kill police", s1) == pytest.approx(2 / 4)  # LCS "the gunman"


def test_hand_computed_f_measures():
    # LCS = the cat on the mat (5 of 6 words each way): R = P = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # candidate "a b" vs reference "a b c d": LCS 2, R = 1/2, P = 1
    assert rouge_l("a b", "a b c d") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert rouge_l("a b", "a b c d", beta=2.0) == pytest.approx(5 * 0.5 * 1.0 / (0.5 + 4 * 1.0))
    # order matters: the reversed sentence shares only one word in order
    assert rouge_l("d c b a", "a b c d") == pytest.approx(1 / 4)


def test_tokenisation_ignores_case_and_punctuation():
    assert rouge_tokens("And God said, Let there be light:") == ["and", "god", "said", "let", "there", "be", "light"]
    assert rouge_l("and god said let", "And God said, Let") == 1.0


def test_degenerate_inputs_score_zero():
    assert rouge_l("", "a b") == 0.0
    assert rouge_l("a b", "") == 0.0
    assert rouge_l("x y z", "a b c") == 0.0
    assert rouge_l("...", "a") == 0.0


def test_exact_match_normalises_whitespace_and_case_only():
    assert exact_match("  Unto Moses,\tsaying, ", "unto moses, saying,")
    assert not exact_match("unto Moses saying", "unto Moses, saying,")
    assert score_texts(["a b", "c"], ["a b", "d"]) == (pytest.approx(0.5), 0.5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=8), st.lists(st.sampled_from("abcd"), max_size=8))
def test_lcs_matches_brute_force(a, b):
    assert lcs_length(a, b) == brute_lcs(a, b) == lcs_length(b, a)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["in", "the", "beginning", "god", "created"]), min_size=1, max_size=8),
       st.lists(st.sampled_from(["in", "the", "beginning", "god", "created"]), min_size=1, max_size=8))
def test_rouge_l_formula_and_bounds(cand, ref):
    c, r = " ".join(cand), " ".join(ref)
    lcs = brute_lcs(cand, ref)
    expected = 0.0 if lcs == 0 else 2 * (lcs / len(ref)) * (lcs / len(cand)) / (lcs / len(ref) + lcs / len(cand))
    assert rouge_l(c, r) == pytest.approx(expected)
    assert 0.0 <= rouge_l(c, r) <= 1.0
    assert rouge_l(c, c) == 1.0
