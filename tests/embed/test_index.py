"""Index and search correctness on small fixed corpora, checked against brute force and rank-bm25."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rank_bm25 import BM25Okapi

from lmdistill.embed.index import BM25Index, DenseIndex, bm25_tokenize, top_k

CORPUS = {
    "cat": "The cat is a small domesticated carnivorous mammal with soft fur.",
    "dog": "The dog is a domesticated descendant of the wolf, kept as a pet.",
    "oak": "An oak is a tree or shrub in the genus Quercus bearing acorns.",
    "river": "A river is a natural flowing watercourse, usually freshwater, flowing towards an ocean.",
    "bank": "The bank of a river is the land alongside it; a bank also keeps money.",
    "acorn": "The acorn is the nut of the oaks, usually containing one seed.",
}


def test_dense_index_fixed_corpus_exact_results():
    # Four documents on axes/diagonals of the plane: cosine rankings are known in closed form.
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    index = DenseIndex(emb, ["east", "north", "northeast", "west"])
    (ranking,) = index.search(np.array([[2.0, 0.1]]), k=4)
    assert [d for d, _ in ranking] == ["east", "northeast", "north", "west"]
    assert ranking[0][1] == pytest.approx(2.0 / np.hypot(2.0, 0.1))
    assert ranking[-1][1] == pytest.approx(-2.0 / np.hypot(2.0, 0.1))
    # Dot product ranks by raw inner product instead: the long diagonal wins for a diagonal query.
    dot = DenseIndex(emb * np.array([[1.0], [1.0], [3.0], [1.0]]), ["east", "north", "northeast", "west"], similarity="dot")
    (ranking,) = dot.search(np.array([[1.0, 1.0]]), k=2)
    assert [d for d, _ in ranking] == ["northeast", "east"]
    assert ranking[0][1] == pytest.approx(6.0)


def test_ties_are_broken_by_corpus_order():
    index = DenseIndex(np.ones((5, 3)), ["e", "d", "c", "b", "a"], similarity="dot")
    (ranking,) = index.search(np.ones((1, 3)), k=3)
    assert [d for d, _ in ranking] == ["e", "d", "c"]
    values, order = top_k(torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]]), 4)
    assert order.tolist() == [[1, 2, 4, 3]]


@settings(max_examples=40, deadline=None)
@given(
    n_docs=st.integers(1, 40),
    n_queries=st.integers(1, 5),
    dim=st.integers(1, 8),
    k=st.integers(1, 50),
    seed=st.integers(0, 10_000),
)
def test_dense_search_equals_brute_force(n_docs, n_queries, dim, k, seed):
    rng = np.random.default_rng(seed)
    docs, queries = rng.normal(size=(n_docs, dim)), rng.normal(size=(n_queries, dim))
    ids = [f"d{i}" for i in range(n_docs)]
    got = DenseIndex(docs, ids).search(queries, k=k, chunk=2)
    dn = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    for qi, q in enumerate(queries):
        cos = dn @ (q / np.linalg.norm(q))
        expected = sorted(range(n_docs), key=lambda j: (-cos[j], j))[: min(k, n_docs)]
        assert [d for d, _ in got[qi]] == [ids[j] for j in expected]
        assert [s for _, s in got[qi]] == pytest.approx([cos[j] for j in expected], abs=1e-5)


def test_dense_index_validates_and_round_trips(tmp_path):
    with pytest.raises(ValueError):
        DenseIndex(np.zeros((2, 3)), ["a"])
    with pytest.raises(ValueError):
        DenseIndex(np.zeros((2, 3)), ["a", "a"])
    rng = np.random.default_rng(0)
    index = DenseIndex(rng.normal(size=(6, 4)), list("abcdef"))
    index.save(tmp_path / "idx")
    again = DenseIndex.load(tmp_path / "idx")
    q = rng.normal(size=(2, 4))
    assert again.search(q, k=6) == index.search(q, k=6)


def test_bm25_scores_match_rank_bm25():
    """bm25s' Robertson variant equals rank-bm25's BM25Okapi up to its constant (k1 + 1) factor."""
    ids, texts = list(CORPUS), list(CORPUS.values())
    stop = frozenset()
    k1, b = 1.5, 0.75
    index = BM25Index(texts, ids, k1=k1, b=b, method="robertson", stopwords=stop)
    reference = BM25Okapi([bm25_tokenize(t, stop) for t in texts], k1=k1, b=b)
    for query in ("acorn oak nut", "flowing river watercourse", "domesticated pet wolf", "money"):
        got = index.scores([query])[0].numpy()
        ref = reference.get_scores(bm25_tokenize(query, stop))
        # Only terms with positive IDF are compared exactly: rank-bm25 floors negative IDFs, and none occur here.
        np.testing.assert_allclose(got * (k1 + 1), ref, rtol=1e-5, atol=1e-6)


def test_bm25_search_finds_the_lexical_match_and_handles_unknown_words():
    ids, texts = list(CORPUS), list(CORPUS.values())
    index = BM25Index(texts, ids)
    rankings = index.search(["the nut with one seed", "soft fur mammal", "zzzz qqqq"], k=2)
    assert rankings[0][0][0] == "acorn"
    assert rankings[1][0][0] == "cat"
    assert [s for _, s in rankings[2]] == [0.0, 0.0]  # nothing matches: zero scores, corpus order
    assert [d for d, _ in rankings[2]] == ids[:2]


def test_bm25_tokenize_drops_stopwords_and_short_tokens():
    assert bm25_tokenize("The Cat, a dog: ok!", frozenset({"the"})) == ["cat", "dog", "ok"]
