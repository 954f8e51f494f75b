"""KID: knowledge distillation with imperfect data.

From "Learning from Imperfect Data: Towards Efficient Knowledge Distillation of Autoregressive
Language Models for Text-to-SQL" (Zhong, Chen, Ding, Liu, Du, Tao; EMNLP 2024 Findings, arXiv
2410.11371). At inference a student conditions on its own earlier tokens and one wrong token
cascades; in training it only sees gold prefixes. KID simulates the cascading errors cheaply, without
autoregressive sampling, by rewriting the gold output y into an imperfect one y_hat.

From the paper (Section 3 and Section 4.3):

1. **masking**: sample a share alpha of the tokens of the gold output y and replace them by a
   special token (the paper's example: "<s>"); of its strategies (Random, Uniform, Hard, Easy) the
   "Random" one is the default;
2. **predicting**: feed the MASKED sequence to the student and take its predictions for the masked
   places from one forward pass;
3. **rewriting**: put those predictions at the masked places, giving y_hat;

then train the student on (x, y_hat) with the teacher's guidance (the paper uses reverse KL) plus an
auxiliary MLE loss towards the gold y. alpha in {0.1, ..., 0.5} was analysed; 0.1-0.3 all help,
0.5 degrades, and **alpha = 0.2 is the default** (``regime.kid_mask_ratio``, default 0.2).

Our exact rule and assumptions:

- the maskable positions of a row are the input positions t >= 1 holding a response token
  (``labels[t - 1] != -100``) with ``attention_mask[t] == 1`` (the closing EOS is only ever a target);
- ``k = floor(alpha * n + 1/2)`` of the n maskable positions (at least one when n > 0) are drawn
  uniformly without replacement (our reading of "Random");
- the mask token is the tokenizer's BOS (the EOS for lmdistill's tokenizers, which doubles as BOS),
  standing in for the paper's "<s>";
- position t receives ``argmax_v student_logits[t - 1, v]`` computed on the masked sequence, i.e. the
  student's greedy guess for token t given a prefix in which the earlier chosen tokens are masked;
- labels stay gold: every position is supervised by the gold next token and by the teacher, which
  sees the same imperfect prefix (the trainer computes teacher logits on the batch's ``input_ids``).
  With a mixed objective (e.g. reverse KL + cross-entropy) the cross-entropy term is taken on the
  imperfect prefix too, not on a separate gold pass; the paper's loss placement is not spelled out in
  what we read.
"""

from __future__ import annotations

import math

import torch

from lmdistill.constants import IGNORE_INDEX
from lmdistill.models.modes import eval_mode


def n_rewritten(n_candidates: int, ratio: float) -> int:
    """How many of ``n_candidates`` positions are rewritten at ``ratio`` (round half up, at least 1)."""
    if n_candidates <= 0:
        return 0
    return min(n_candidates, max(1, int(math.floor(ratio * n_candidates + 0.5))))


def candidate_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per row, the input positions holding response tokens (see the module docstring)."""
    target_next = torch.zeros_like(labels, dtype=torch.bool)
    target_next[:, 1:] = labels[:, :-1] != IGNORE_INDEX
    if attention_mask is not None:
        target_next &= attention_mask.bool()
    return [torch.nonzero(row).flatten() for row in target_next]


def choose_positions(candidates: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random subset of ``candidates`` of size :func:`n_rewritten`, sorted."""
    k = n_rewritten(int(candidates.numel()), ratio)
    if k == 0:
        return candidates[:0]
    order = torch.randperm(int(candidates.numel()), generator=generator)[:k]
    return torch.sort(candidates[order.to(candidates.device)]).values


@torch.no_grad()
def imperfect_inputs(
    student: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    ratio: float,
    *,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(rewritten ``input_ids``, the rewritten positions of each row) for a padded prompt/response
    batch (``input_ids``, ``labels``, optional ``attention_mask``): mask, predict on the masked
    sequence, rewrite (see the module docstring)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    chosen_rows = [choose_positions(c, ratio, generator) for c in candidate_positions(labels, mask)]
    masked = input_ids.clone()
    for row, chosen in enumerate(chosen_rows):
        masked[row, chosen] = mask_token_id
    with eval_mode(student):
        logits = student(input_ids=masked, attention_mask=mask).logits
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    predictions = logits.argmax(-1)  # predictions[:, t - 1] is the student's guess for token t
    new_ids = input_ids.clone()
    for row, chosen in enumerate(chosen_rows):
        if chosen.numel():
            new_ids[row, chosen] = predictions[row, chosen - 1]
    return new_ids, chosen_rows
