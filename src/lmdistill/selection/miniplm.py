"""MiniPLM difference sampling: keep the documents a large teacher finds much likelier than a small
reference model does.

Gu et al. 2024, "MiniPLM: Knowledge Distillation for Pre-Training Language Models", arXiv:2410.17215
(its "Difference Sampling", Fig. 3 of the paper; reference code thu-coai/MiniPLM,
scripts/miniplm/difference_sampling). Every training instance x gets the score

    r(x) = (1/|x|) sum_t log p_teacher(x_t | x_<t)  -  (1/|x|) sum_t log p_ref(x_t | x_<t)

i.e. the teacher's mean token log-likelihood minus the reference model's (the paper's reference code
computes it as the reference loss minus the teacher loss, the same number). The top ``fraction``
(r = 0.5 in the paper) of instances by score are kept, in their original order. Instances both models
find easy score near 0 and are down-sampled; instances only the large teacher has learned score high
(hard but valuable); noise that neither model predicts, or the small model fits better, scores low.
The reference model is a small LM pretrained on (a part of) the same corpus; the student never scores
anything, so selection works across model families.

Here an instance is a document. Its tokens are scored as the training stream sees them: the text
followed by EOS, predicted after an EOS (which doubles as BOS). Documents longer than the model's
context are scored in sliding windows of ``window`` tokens advancing by ``stride``: every token is
scored exactly once, and every token after the first window sees at least ``window - stride`` tokens
of context. Teacher and reference score the text with their own tokenizers, so they may differ:
``normalize="token"`` divides each model's log-likelihood by its own token count (the paper's
formula), ``normalize="byte"`` divides the log-likelihood difference by the text's UTF-8 bytes (a
per-byte score independent of tokenization).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lmdistill.constants import IGNORE_INDEX
from lmdistill.errors import ConfigError

Normalize = Literal["token", "byte"]


def model_context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (None when unbounded/unknown)."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def scoring_windows(n_positions: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of ``n_positions`` tokens whose targets are positions 1..n-1.

    Returns ``(start, end, first_target)``: the model reads tokens ``[start, end)`` and the window
    scores targets ``first_target .. end - 1`` (target t predicted from tokens ``[start, t)``).
    Together the windows score every target once; each window after the first scores ``stride``
    new targets with at least ``window - stride`` tokens of context.
    """
    if window < 2:
        raise ConfigError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window - 1:
        raise ConfigError(f"stride must be between 1 and window - 1 = {window - 1}, got {stride}")
    if n_positions < 2:
        return []
    out = []
    start, first = 0, 1
    while True:
        end = min(start + window, n_positions)
        out.append((start, end, first))
        if end == n_positions:
            return out
        first = end
        start = end - (window - stride)


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


@dataclass
class SequenceScores:
    """Per text: summed log-likelihood (nats) of its tokens + EOS, and how many targets that is."""

    logprob: np.ndarray  # float64 [n]
    n_targets: np.ndarray  # int64 [n]

    @property
    def mean_logprob(self) -> np.ndarray:
        return self.logprob / np.maximum(self.n_targets, 1)


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    show_progress: bool = False,
    desc: str = "scoring",
) -> SequenceScores:
    """log p(text + EOS | EOS) under ``model`` for every text, in sliding windows (see the module doc).

    Windows of all texts are batched together, longest first, right-padded: in a causal model padding
    after a position cannot change that position's prediction, and padded targets are not counted.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the scoring tokenizer has no EOS token")
    limit = model_context_length(model)
    window = window or limit or 1024
    if limit is not None and window > limit:
        raise ConfigError(f"window {window} exceeds the model's context of {limit} positions")
    stride = stride or max(1, window // 2)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.eval()
    sequences = [[eos, *ids, eos] for ids in _encode(tokenizer, texts)]
    jobs = []  # (text index, start, end, first target)
    for i, seq in enumerate(sequences):
        jobs.extend((i, s, e, f) for s, e, f in scoring_windows(len(seq), window, stride))
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)
    totals = np.zeros(len(texts), dtype=np.float64)
    counts = np.array([len(s) - 1 for s in sequences], dtype=np.int64)
    from tqdm.auto import tqdm

    for b in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not show_progress, leave=False):
        chunk = jobs[b : b + batch_size]
        width = chunk[0][2] - chunk[0][1]
        input_ids = torch.full((len(chunk), width), eos, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, (i, s, e, f) in enumerate(chunk):
            seq = sequences[i]
            input_ids[row, : e - s] = torch.tensor(seq[s:e])
            attention[row, : e - s] = 1
            # logits at input position j predict token s + j + 1; count targets f .. e-1 only
            for t in range(f, e):
                targets[row, t - s - 1] = seq[t]
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        valid = targets != IGNORE_INDEX
        picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        per_row = torch.where(valid, picked, torch.zeros((), dtype=picked.dtype)).double().sum(-1)
        for row, (i, _, _, _) in enumerate(chunk):
            totals[i] += float(per_row[row])
    return SequenceScores(logprob=totals, n_targets=counts)


def difference_scores(
    teacher: SequenceScores, reference: SequenceScores, *, n_bytes: Sequence[int] | np.ndarray | None = None,
    normalize: Normalize = "token",
) -> np.ndarray:
    """MiniPLM's score per document (larger = keep): teacher minus reference log-likelihood, per token of
    each model (``"token"``, the paper) or per UTF-8 byte of the text (``"byte"``)."""
    if normalize == "token":
        return teacher.mean_logprob - reference.mean_logprob
    if normalize == "byte":
        if n_bytes is None:
            raise ValueError("normalize='byte' needs n_bytes")
        return (teacher.logprob - reference.logprob) / np.maximum(np.asarray(n_bytes, dtype=np.float64), 1.0)
    raise ConfigError(f"normalize must be 'token' or 'byte', got {normalize!r}")


def select_top_fraction(scores: Sequence[float] | np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the ``floor(fraction * n)`` (at least 1) highest scores, returned in original order.
    Ties are broken by position (earlier first), so the selection is deterministic."""
    scores = np.asarray(scores, dtype=np.float64)
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n_keep = max(1, int(math.floor(fraction * scores.size + 1e-9)))
    order = np.lexsort((np.arange(scores.size), -scores))  # by score descending, then position
    return np.sort(order[:n_keep])


__all__ = [
    "SequenceScores",
    "difference_scores",
    "model_context_length",
    "scoring_windows",
    "select_top_fraction",
    "sequence_logprobs",
]
