"""Evaluate retrievers on a `RetrievalTask`: metrics, encode throughput, model size, and the table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from lmdistill.embed.index import BM25Index, DenseIndex, Ranking, rankings_from_scores
from lmdistill.embed.metrics import DEFAULT_METRICS, evaluate_rankings
from lmdistill.embed.task import RetrievalTask

EncodeFn = Callable[[Sequence[str]], np.ndarray | torch.Tensor]
M3_HEADS = ("dense", "sparse", "multi", "combined")


@dataclass
class EvalRow:
    name: str
    metrics: dict[str, float]
    texts_per_s: float | None = None
    params: int | None = None
    trainable_params: int | None = None
    train_seconds: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "metrics": self.metrics,
            "texts_per_s": self.texts_per_s,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "train_seconds": self.train_seconds,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict) -> EvalRow:
        return cls(**data)


def _ids(rankings: list[Ranking], qids: Sequence[str]) -> dict[str, list[str]]:
    return {qid: [doc for doc, _ in ranking] for qid, ranking in zip(qids, rankings)}


def metrics_from_scores(task: RetrievalTask, scores: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Metrics from a (queries x corpus) score matrix in task order."""
    qids = list(task.queries)
    return evaluate_rankings(_ids(rankings_from_scores(scores, list(task.corpus), k), qids), task.qrels, DEFAULT_METRICS)


def evaluate_encoder(
    encode: EncodeFn, task: RetrievalTask, *, similarity: str = "cosine", k: int = 10
) -> dict[str, float]:
    """Encode corpus and queries, search a `DenseIndex`, score the rankings."""
    index = DenseIndex(encode(list(task.corpus.values())), list(task.corpus), similarity=similarity)
    qids = list(task.queries)
    rankings = index.search(encode([task.queries[q] for q in qids]), k=k)
    return evaluate_rankings(_ids(rankings, qids), task.qrels, DEFAULT_METRICS)


def evaluate_bm25(task: RetrievalTask, *, k: int = 10, **bm25_args) -> dict[str, float]:
    index = BM25Index(list(task.corpus.values()), list(task.corpus), **bm25_args)
    qids = list(task.queries)
    rankings = index.search([task.queries[q] for q in qids], k=k)
    return evaluate_rankings(_ids(rankings, qids), task.qrels, DEFAULT_METRICS)


def bm25_throughput(task: RetrievalTask, n: int) -> float:
    texts = list(task.corpus.values())[:n]
    start = time.perf_counter()
    BM25Index(texts, [str(i) for i in range(len(texts))])
    return len(texts) / max(time.perf_counter() - start, 1e-9)


def evaluate_m3(model, task: RetrievalTask, *, batch_size: int, score_weights: tuple[float, float, float]) -> dict[str, dict[str, float]]:
    """Each M3 head alone and the weighted combination w1·dense + w2·sparse + w3·multi, exhaustively."""
    docs = model.encode_all(list(task.corpus.values()), batch_size=batch_size)
    queries = model.encode_all([task.queries[q] for q in task.queries], batch_size=batch_size)
    scores = docs.scores(queries)
    w1, w2, w3 = score_weights
    scores["combined"] = w1 * scores["dense"] + w2 * scores["sparse"] + w3 * scores["multi"]
    return {head: metrics_from_scores(task, scores[head]) for head in M3_HEADS}


def measure_throughput(encode: EncodeFn, texts: Sequence[str]) -> float:
    """Texts per second for ``encode`` over ``texts`` (after a short warm-up batch)."""
    texts = list(texts)
    encode(texts[: min(8, len(texts))])
    start = time.perf_counter()
    encode(texts)
    return len(texts) / max(time.perf_counter() - start, 1e-9)


def format_table(rows: Sequence[EvalRow], metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """A Markdown table: one row per retriever."""
    head = ["method", *metrics, "texts/s", "params (M)", "trainable (M)", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]

    def num(v: float | None, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for r in rows:
        cells = [r.name, *(num(r.metrics.get(m), ".3f") for m in metrics)]
        cells += [
            num(r.texts_per_s, ".0f"),
            num(None if r.params is None else r.params / 1e6, ".1f"),
            num(None if r.trainable_params is None else r.trainable_params / 1e6, ".2f"),
            num(r.train_seconds, ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
