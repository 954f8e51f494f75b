"""Teacher signal for the training pairs: cached teacher embeddings and mined hard negatives.

A bi-encoder teacher is encoded once over the training queries and the training corpus; any teacher score
t(q, d) is then an inner product of cached vectors, so distillation steps never run the teacher
(Hofstätter et al., arXiv 2010.02666, likewise precompute teacher scores for their training triples).
Hard negatives are the highest-scoring documents of another headword (a different group), optionally
skipping the very top hits, which are the likeliest unlabelled positives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lmdistill.embed.index import BM25Index
from lmdistill.embed.task import RetrievalTask

EncodeFn = Callable[[Sequence[str]], np.ndarray | torch.Tensor]


@dataclass
class TrainingSignal:
    """Everything a training loop needs beyond the texts, indexed like ``task.train``."""

    doc_ids: list[str]  # the training corpus, in a fixed order
    positive_index: list[int]  # per training pair: its positive's row in doc_ids
    negatives: list[list[int]]  # per training pair: candidate hard negatives (rows in doc_ids), best first
    doc_groups: list[str]
    teacher_query: torch.Tensor | None = None  # (pairs, dim), normalised when the teacher is cosine
    teacher_docs: torch.Tensor | None = None  # (docs, dim)

    def teacher_scores(self, pair_rows: Sequence[int], doc_rows: Sequence[int]) -> torch.Tensor:
        """t(q_i, d_j) for the given pair rows x doc rows, from the cached teacher embeddings."""
        if self.teacher_query is None or self.teacher_docs is None:
            raise ValueError("no teacher embeddings were computed for this signal")
        q = self.teacher_query[torch.as_tensor(list(pair_rows), dtype=torch.long)]
        d = self.teacher_docs[torch.as_tensor(list(doc_rows), dtype=torch.long)]
        return q @ d.T

    def teacher_pair_scores(self, pair_rows: Sequence[int], doc_rows: Sequence[int]) -> torch.Tensor:
        """t(q_i, d_i) for aligned lists of pair rows and document rows."""
        if self.teacher_query is None or self.teacher_docs is None:
            raise ValueError("no teacher embeddings were computed for this signal")
        q = self.teacher_query[torch.as_tensor(list(pair_rows), dtype=torch.long)]
        d = self.teacher_docs[torch.as_tensor(list(doc_rows), dtype=torch.long)]
        return (q * d).sum(-1)


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).float()


def _negatives_from_scores(
    scores: torch.Tensor, pair_groups: list[str], doc_groups: list[str], top_k: int, skip_top: int
) -> list[list[int]]:
    out: list[list[int]] = []
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    for row, group in zip(order.tolist(), pair_groups):
        picked = [j for j in row if doc_groups[j] != group]
        out.append(picked[skip_top : skip_top + top_k])
    return out


def build_training_signal(
    task: RetrievalTask,
    *,
    teacher_encode: EncodeFn | None = None,
    teacher_similarity: str = "cosine",
    negatives_from: str = "teacher",
    top_k: int = 20,
    skip_top: int = 0,
) -> TrainingSignal:
    """Cache teacher embeddings (when a teacher is given) and mine hard negatives.

    ``negatives_from``: 'teacher' (rank the training corpus with the teacher), 'bm25' (lexical, no model),
    or 'none' (in-batch negatives only).
    """
    if not task.train_corpus:
        raise ValueError("the task has no training corpus to mine negatives from")
    doc_ids = list(task.train_corpus)
    row_of = {d: i for i, d in enumerate(doc_ids)}
    doc_groups = [task.train_groups[d] for d in doc_ids]
    pair_groups = [p.group for p in task.train]
    positive_index = [row_of[p.positive_id] for p in task.train]
    queries = [p.query for p in task.train]

    teacher_query = teacher_docs = None
    if teacher_encode is not None:
        teacher_query = _as_tensor(teacher_encode(queries))
        teacher_docs = _as_tensor(teacher_encode([task.train_corpus[d] for d in doc_ids]))
        if teacher_similarity == "cosine":
            teacher_query, teacher_docs = F.normalize(teacher_query, dim=-1), F.normalize(teacher_docs, dim=-1)

    if negatives_from == "none":
        negatives: list[list[int]] = [[] for _ in queries]
    elif negatives_from == "teacher":
        if teacher_query is None or teacher_docs is None:
            raise ValueError("negatives_from='teacher' needs a teacher")
        negatives = []
        for start in range(0, len(queries), 512):
            scores = teacher_query[start : start + 512] @ teacher_docs.T
            negatives += _negatives_from_scores(scores, pair_groups[start : start + 512], doc_groups, top_k, skip_top)
    elif negatives_from == "bm25":
        index = BM25Index([task.train_corpus[d] for d in doc_ids], doc_ids)
        negatives = []
        for start in range(0, len(queries), 512):
            scores = index.scores(queries[start : start + 512])
            negatives += _negatives_from_scores(scores, pair_groups[start : start + 512], doc_groups, top_k, skip_top)
    else:
        raise ValueError(f"unknown negatives source '{negatives_from}'; allowed: teacher, bm25, none")
    return TrainingSignal(doc_ids, positive_index, negatives, doc_groups, teacher_query, teacher_docs)
