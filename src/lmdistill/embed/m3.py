"""One encoder, three retrieval heads, trained by self-knowledge distillation (BGE M3).

Chen et al., "M3-Embedding: Multi-Linguality, Multi-Functionality, Multi-Granularity Text Embeddings
Through Self-Knowledge Distillation", arXiv 2402.03216, Sec. 3.2:

* dense: the pooled, normalised hidden state e; s_dense = ⟨e_q, e_p⟩. The paper pools [CLS]; we use the
  backbone's own pooling (mean for all-MiniLM, which was trained that way).
* sparse (lexical weights): w_t = ReLU(W_lex·h_t) per token, a term's weight is its maximum over its
  occurrences, special tokens get none; s_lex = Σ_{t ∈ q ∩ p} w_{q,t}·w_{p,t}.
* multi-vector: E = norm(W_mul·H) per token (without the [CLS] position, as in the reference code);
  s_mul = (1/N_q) Σ_i max_j E_q[i]·E_p[j] (late interaction, ColBERT-style).

Training combines them (`losses.m3_self_distillation_loss`); retrieval can use any head or the weighted sum.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from lmdistill.embed.encoder import TextEncoder
from lmdistill.models.modes import eval_mode


@dataclass
class M3Output:
    dense: torch.Tensor  # (B, H), normalised
    token_weights: torch.Tensor  # (B, T), zero on special tokens and padding
    input_ids: torch.Tensor  # (B, T)
    multi: torch.Tensor  # (B, T-1, C), normalised, zero on padding
    multi_mask: torch.Tensor  # (B, T-1)


class M3Encoder(nn.Module):
    def __init__(self, backbone: TextEncoder, colbert_dim: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.sparse_linear = nn.Linear(backbone.dim, 1)
        self.colbert_linear = nn.Linear(backbone.dim, colbert_dim)
        tok = backbone.tokenizer
        specials = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id}
        self.register_buffer(
            "special_ids", torch.tensor(sorted(i for i in specials if i is not None), dtype=torch.long), persistent=False
        )
        self.vocab_size = len(tok)

    @property
    def colbert_dim(self) -> int:
        return self.colbert_linear.out_features

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def forward(self, texts: Sequence[str]) -> M3Output:
        feats = self.backbone.tokenize(texts)
        states = self.backbone.token_states(feats)
        mask = feats["attention_mask"]
        ids = feats["input_ids"]
        dense = F.normalize(self.backbone.pool(states, mask), dim=-1)
        weights = torch.relu(self.sparse_linear(states)).squeeze(-1)
        keep = mask.bool() & ~torch.isin(ids, self.special_ids)
        weights = weights * keep.to(weights.dtype)
        multi = F.normalize(self.colbert_linear(states[:, 1:]), dim=-1)
        multi_mask = mask[:, 1:]
        multi = multi * multi_mask.unsqueeze(-1).to(multi.dtype)
        return M3Output(dense, weights, ids, multi, multi_mask)

    # ---- scores between query and document outputs (training: with gradients) ----
    def lexical_vectors(self, out: M3Output) -> torch.Tensor:
        """(B, vocab) term weights: each term's maximum weight over its occurrences (weights are >= 0)."""
        vec = torch.zeros(out.input_ids.shape[0], self.vocab_size, dtype=out.token_weights.dtype, device=out.token_weights.device)
        return vec.scatter_reduce(1, out.input_ids, out.token_weights, reduce="amax", include_self=True)

    @staticmethod
    def dense_scores(q: M3Output, d: M3Output) -> torch.Tensor:
        return q.dense @ d.dense.T

    def sparse_scores(self, q: M3Output, d: M3Output) -> torch.Tensor:
        return self.lexical_vectors(q) @ self.lexical_vectors(d).T

    @staticmethod
    def multi_scores(q: M3Output, d: M3Output) -> torch.Tensor:
        return maxsim_scores(q.multi, q.multi_mask, d.multi, d.multi_mask)

    # ---- inference ----
    def encode_all(self, texts: Sequence[str], batch_size: int = 32) -> M3Index:
        """Encode texts into the three representations, for scoring against many queries."""
        dense, lex_rows, multi_rows = [], [], []
        with eval_mode(self), torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                out = self(list(texts[start : start + batch_size]))
                dense.append(out.dense.float())
                lex = self.lexical_vectors(out).float()
                lex_rows.append(sp.csr_matrix(lex.numpy()))
                for row, m in zip(out.multi.float(), out.multi_mask):
                    multi_rows.append(row[m.bool()])
        return M3Index(torch.cat(dense), sp.vstack(lex_rows).tocsr(), multi_rows, self.colbert_dim)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.backbone.save(path)
        torch.save(
            {"sparse_linear": self.sparse_linear.state_dict(), "colbert_linear": self.colbert_linear.state_dict()},
            path / "m3_heads.pt",
        )
        (path / "m3.json").write_text(json.dumps({"colbert_dim": self.colbert_dim}))

    @classmethod
    def load(cls, path: str | Path) -> M3Encoder:
        path = Path(path)
        meta = json.loads((path / "m3.json").read_text())
        model = cls(TextEncoder.from_pretrained(path), colbert_dim=meta["colbert_dim"])
        heads = torch.load(path / "m3_heads.pt", weights_only=True)
        model.sparse_linear.load_state_dict(heads["sparse_linear"])
        model.colbert_linear.load_state_dict(heads["colbert_linear"])
        return model


def maxsim_scores(q: torch.Tensor, q_mask: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """(Q, N) late-interaction scores: mean over valid query tokens of the max over valid document tokens."""
    sims = torch.einsum("qic,njc->qinj", q, d)
    sims = sims.masked_fill(~d_mask.bool()[None, None], float("-inf"))
    best = sims.max(-1).values  # (Q, Lq, N)
    best = best.masked_fill(~q_mask.bool()[:, :, None], 0.0)
    return best.sum(1) / q_mask.sum(1, keepdim=True).clamp(min=1).to(best.dtype)


@dataclass
class M3Index:
    dense: torch.Tensor  # (N, H)
    lexical: sp.csr_matrix  # (N, vocab)
    multi: list[torch.Tensor]  # N tensors of (tokens_i, C)
    colbert_dim: int

    def __len__(self) -> int:
        return self.dense.shape[0]

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(m.shape[0] for m in self.multi)
        vecs = torch.zeros(len(self.multi), longest, self.colbert_dim)
        mask = torch.zeros(len(self.multi), longest, dtype=torch.bool)
        for i, m in enumerate(self.multi):
            vecs[i, : m.shape[0]] = m
            mask[i, : m.shape[0]] = True
        return vecs, mask

    def scores(self, queries: M3Index, chunk_rows: int = 2_000_000) -> dict[str, torch.Tensor]:
        """Exhaustive (Q, N) score matrices for each head."""
        dense = queries.dense @ self.dense.T
        sparse = torch.from_numpy(np.asarray((queries.lexical @ self.lexical.T).todense(), dtype=np.float32))
        d_vecs, d_mask = self._padded()
        q_vecs, q_mask = queries._padded()
        # One GEMM per query chunk: (chunk*Lq, C) x (C, N*Ld), sized to keep memory bounded.
        per_query = q_vecs.shape[1] * d_vecs.shape[0] * d_vecs.shape[1]
        step = max(1, chunk_rows * 16 // max(per_query, 1))
        multi = torch.cat(
            [maxsim_scores(q_vecs[s : s + step], q_mask[s : s + step], d_vecs, d_mask) for s in range(0, len(queries), step)]
        )
        return {"dense": dense, "sparse": sparse, "multi": multi}
