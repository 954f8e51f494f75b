"""Retrieval metrics against hand-computed values and an independent numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.embed.metrics import evaluate_rankings, mrr_at_k, ndcg_at_k, recall_at_k


def test_hand_computed_example():
    ranking = ["d3", "d1", "d7", "d2"]
    relevant = {"d1", "d2"}
    assert recall_at_k(ranking, relevant, 1) == 0.0
    assert recall_at_k(ranking, relevant, 2) == 0.5
    assert recall_at_k(ranking, relevant, 10) == 1.0
    assert mrr_at_k(ranking, relevant, 10) == 0.5
    assert mrr_at_k(ranking, relevant, 1) == 0.0
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(ranking, relevant, 10) == pytest.approx(dcg / idcg)


def _reference(ranking: list[int], relevant: set[int], k: int) -> tuple[float, float, float]:
    """numpy formulation: gains vector over the top k."""
    top = np.array(ranking[:k])
    gains = np.isin(top, list(relevant)).astype(np.float64)
    recall = gains.sum() / len(relevant)
    hits = np.flatnonzero(gains)
    mrr = 1.0 / (hits[0] + 1) if hits.size else 0.0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (gains * discounts[: gains.size]).sum()
    idcg = discounts[: min(len(relevant), k)].sum()
    return recall, mrr, dcg / idcg


@settings(max_examples=80, deadline=None)
@given(
    n_docs=st.integers(1, 30),
    data=st.data(),
    k=st.integers(1, 12),
)
def test_metrics_match_numpy_reference(n_docs, data, k):
    ranking = data.draw(st.permutations(list(range(n_docs))))
    relevant = data.draw(st.sets(st.integers(0, n_docs - 1), min_size=1, max_size=n_docs))
    r_ids = [str(x) for x in ranking]
    rel_ids = {str(x) for x in relevant}
    ref = _reference(list(ranking), set(relevant), k)
    got = (recall_at_k(r_ids, rel_ids, k), mrr_at_k(r_ids, rel_ids, k), ndcg_at_k(r_ids, rel_ids, k))
    assert got == pytest.approx(ref, abs=1e-12)
    assert all(0.0 <= v <= 1.0 for v in got)


@settings(max_examples=50, deadline=None)
@given(n_docs=st.integers(2, 20), data=st.data())
def test_recall_grows_with_k_and_ideal_ranking_scores_one(n_docs, data):
    relevant = data.draw(st.sets(st.integers(0, n_docs - 1), min_size=1, max_size=n_docs))
    rest = [d for d in range(n_docs) if d not in relevant]
    ideal = [str(d) for d in sorted(relevant)] + [str(d) for d in rest]
    rel = {str(d) for d in relevant}
    recalls = [recall_at_k(ideal, rel, k) for k in range(1, n_docs + 1)]
    assert recalls == sorted(recalls)
    assert ndcg_at_k(ideal, rel, 10) == pytest.approx(1.0)
    assert mrr_at_k(ideal, rel, 10) == 1.0


def test_evaluate_rankings_averages_over_queries_and_validates():
    qrels = {"a": {"x"}, "b": {"y"}}
    out = evaluate_rankings({"a": ["x", "y"], "b": ["x", "z"]}, qrels, ["recall@1", "mrr@10"])
    assert out == {"recall@1": 0.5, "mrr@10": 0.5}
    # A missing query counts as an empty ranking.
    assert evaluate_rankings({"a": ["x"]}, qrels, ["recall@1"])["recall@1"] == 0.5
    with pytest.raises(ValueError, match="twice"):
        evaluate_rankings({"a": ["x", "x"]}, {"a": {"x"}}, ["recall@1"])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_rankings({}, qrels, ["map@10"])
    with pytest.raises(ValueError, match="no relevant"):
        evaluate_rankings({}, {"a": set()}, ["recall@1"])
