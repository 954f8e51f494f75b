"""Exact search: a dense inner-product index, a BM25 index (bm25s), and a top-k over score matrices.

Rankings are deterministic: equal scores are broken by corpus order (lower position first), so two runs —
or a brute-force reference — give the same list.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Ranking = list[tuple[str, float]]


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k highest scores and their column indices, ties broken by the lower column."""
    k = min(k, scores.shape[-1])
    # A stable descending sort keeps equal scores in column order (torch.topk does not promise that).
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(scores, -1, order), order


def rankings_from_scores(scores: torch.Tensor, ids: Sequence[str], k: int, chunk: int = 256) -> list[Ranking]:
    out: list[Ranking] = []
    for start in range(0, scores.shape[0], chunk):
        values, index = top_k(scores[start : start + chunk], k)
        for row_v, row_i in zip(values.tolist(), index.tolist()):
            out.append([(ids[i], v) for i, v in zip(row_i, row_v)])
    return out


class DenseIndex:
    """Brute-force inner-product search (cosine when ``similarity='cosine'``: both sides are normalised)."""

    def __init__(
        self,
        embeddings: np.ndarray | torch.Tensor,
        ids: Sequence[str],
        similarity: str = "cosine",
        *,
        normalized: bool = False,
    ) -> None:
        if similarity not in ("cosine", "dot"):
            raise ValueError(f"unknown similarity '{similarity}'; allowed: cosine, dot")
        emb = torch.as_tensor(np.asarray(embeddings) if not isinstance(embeddings, torch.Tensor) else embeddings).float()
        if emb.dim() != 2 or emb.shape[0] != len(ids):
            raise ValueError(f"need one embedding row per id: got {tuple(emb.shape)} for {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise ValueError("document ids must be unique")
        self.similarity = similarity
        # ``normalized``: rows are already unit length (e.g. reloaded), normalising again would perturb them.
        self.embeddings = F.normalize(emb, dim=-1) if similarity == "cosine" and not normalized else emb
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, query_emb: np.ndarray | torch.Tensor) -> torch.Tensor:
        q = torch.as_tensor(np.asarray(query_emb) if not isinstance(query_emb, torch.Tensor) else query_emb).float()
        q = q.reshape(-1, self.embeddings.shape[1])
        if self.similarity == "cosine":
            q = F.normalize(q, dim=-1)
        return q @ self.embeddings.T

    def search(self, query_emb: np.ndarray | torch.Tensor, k: int = 10, chunk: int = 256) -> list[Ranking]:
        q = torch.as_tensor(np.asarray(query_emb) if not isinstance(query_emb, torch.Tensor) else query_emb).float()
        q = q.reshape(-1, self.embeddings.shape[1])
        out: list[Ranking] = []
        for start in range(0, q.shape[0], chunk):
            out.extend(rankings_from_scores(self.scores(q[start : start + chunk]), self.ids, k))
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "embeddings.npy", self.embeddings.numpy())
        (path / "index.json").write_text(json.dumps({"similarity": self.similarity, "ids": self.ids}))

    @classmethod
    def load(cls, path: str | Path) -> DenseIndex:
        path = Path(path)
        meta = json.loads((path / "index.json").read_text())
        return cls(np.load(path / "embeddings.npy"), meta["ids"], meta["similarity"], normalized=True)


_WORD = re.compile(r"(?u)\b\w\w+\b")


def default_stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def bm25_tokenize(text: str, stopwords: frozenset[str] = frozenset()) -> list[str]:
    """Lower-cased words of two or more characters (bm25s' default pattern), stopwords removed."""
    return [w for w in _WORD.findall(text.lower()) if w not in stopwords]


class BM25Index:
    """Okapi BM25 over a tokenised corpus, scored by the bm25s library (Lù, arXiv 2407.03618).

    ``method`` picks bm25s' variant: 'lucene' (default; IDF log(1 + (N − n + .5)/(n + .5))) or 'robertson'
    (the classic Robertson/Okapi IDF, rank-equivalent to rank-bm25's BM25Okapi, which scales every score by
    k1 + 1 and floors negative IDFs).
    """

    def __init__(
        self,
        texts: Sequence[str],
        ids: Sequence[str],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        stopwords: frozenset[str] | None = None,
    ) -> None:
        import bm25s

        if len(texts) != len(ids):
            raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
        self.ids = list(ids)
        self.stopwords = default_stopwords() if stopwords is None else stopwords
        self.retriever = bm25s.BM25(k1=k1, b=b, method=method)
        self.retriever.index([bm25_tokenize(t, self.stopwords) for t in texts], show_progress=False)

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, queries: Sequence[str]) -> torch.Tensor:
        rows = [self.retriever.get_scores(bm25_tokenize(q, self.stopwords)) for q in queries]
        return torch.as_tensor(np.stack(rows)).float() if rows else torch.zeros(0, len(self.ids))

    def search(self, queries: Sequence[str], k: int = 10) -> list[Ranking]:
        return rankings_from_scores(self.scores(queries), self.ids, k)
