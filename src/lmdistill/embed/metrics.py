"""Retrieval metrics over ranked lists with binary relevance (TREC conventions).

For one query with relevant set R and ranking d_1, d_2, ...:
* Recall@k = |R ∩ {d_1..d_k}| / |R|
* MRR@k = 1 / (rank of the first relevant document) if it is within the top k, else 0
* nDCG@k = DCG@k / IDCG@k with DCG@k = Σ_{i≤k} rel_i / log2(i + 1) and IDCG@k the DCG of an ideal ranking
  (min(|R|, k) relevant documents first) — Järvelin & Kekäläinen, "Cumulated gain-based evaluation of IR
  techniques", TOIS 2002.
Each is averaged over the queries; a query without relevant documents is an error (it cannot be scored).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

DEFAULT_METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")


def recall_at_k(ranking: Sequence[str], relevant: set[str], k: int) -> float:
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at_k(ranking: Sequence[str], relevant: set[str], k: int) -> float:
    for position, doc_id in enumerate(ranking[:k], start=1):
        if doc_id in relevant:
            return 1.0 / position
    return 0.0


def ndcg_at_k(ranking: Sequence[str], relevant: set[str], k: int) -> float:
    dcg = sum(1.0 / math.log2(i + 2) for i, doc_id in enumerate(ranking[:k]) if doc_id in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal


_FUNCTIONS = {"recall": recall_at_k, "mrr": mrr_at_k, "ndcg": ndcg_at_k}


def evaluate_rankings(
    rankings: Mapping[str, Sequence[str]],
    qrels: Mapping[str, set[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Mean of each metric ("recall@1", "mrr@10", ...) over the queries in ``qrels``.

    A ranking must be duplicate-free; a query missing from ``rankings`` counts as an empty ranking.
    """
    parsed = []
    for name in metrics:
        kind, _, cutoff = name.partition("@")
        if kind not in _FUNCTIONS or not cutoff.isdigit() or int(cutoff) < 1:
            raise ValueError(f"unknown metric '{name}'; use recall@k, mrr@k or ndcg@k")
        parsed.append((name, _FUNCTIONS[kind], int(cutoff)))
    if not qrels:
        raise ValueError("no queries to evaluate")
    totals = {name: 0.0 for name, _, _ in parsed}
    for qid, relevant in qrels.items():
        if not relevant:
            raise ValueError(f"query '{qid}' has no relevant documents")
        ranking = list(rankings.get(qid, ()))
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"ranking for query '{qid}' lists a document twice")
        for name, fn, k in parsed:
            totals[name] += fn(ranking, set(relevant), k)
    return {name: total / len(qrels) for name, total in totals.items()}
