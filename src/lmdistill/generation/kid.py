"""KID: knowledge distillation with imperfect data.

From "Learning from Imperfect Data: Towards Efficient Knowledge Distillation of Autoregressive
Language Models for Text-to-SQL" (Zhong et al., EMNLP 2024 Findings, arXiv 2410.11371). At inference
a student conditions on its own earlier tokens, and one wrong token cascades; in training it only
ever sees gold prefixes (the training-inference mismatch). KID simulates the cascading errors
cheaply, without sampling whole sequences: it builds IMPERFECT training inputs in three steps,

1. **masking**: choose a share ``ratio`` of the response's input tokens,
2. **predicting**: the current student predicts each of them (one teacher-forced forward pass on the
   gold sequence; its greedy choice for position t given the gold prefix before t),
3. **rewriting**: replace the chosen tokens by those predictions,

and trains on them with the targets of the gold sequence: every position is still supervised by the
gold next token (labels unchanged) and by the teacher, which sees the same imperfect prefix and so
shows how to continue correctly after the student's own mistakes (the trainer computes teacher
logits on the batch's ``input_ids``).

Exact rule used here: the candidate positions of a row are the input positions t >= 1 holding a
response token (``labels[t - 1] != -100``: token t was a target) with ``attention_mask[t] == 1``;
``k = floor(ratio * n + 1/2)`` of the n candidates are drawn uniformly without replacement (at least
one when n > 0); position t receives ``argmax_v student_logits[t - 1, v]``. Prompt tokens, padding,
labels and the attention mask are unchanged. The default ratio (0.3) is configurable
(``regime.kid_mask_ratio``); it could not be checked against the paper's text from here, so set it to
the paper's value when reproducing its numbers.
"""

from __future__ import annotations

import math

import torch


def n_rewritten(n_candidates: int, ratio: float) -> int:
    """How many of ``n_candidates`` positions are rewritten at ``ratio`` (round half up, at least 1)."""
    if n_candidates <= 0:
        return 0
    return min(n_candidates, max(1, int(math.floor(ratio * n_candidates + 0.5))))


def candidate_positions(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per row, the input positions holding response tokens (see the module docstring)."""
    target_next = torch.zeros_like(labels, dtype=torch.bool)
    target_next[:, 1:] = labels[:, :-1] != -100
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
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(rewritten ``input_ids``, the rewritten positions of each row) for a padded prompt/response
    batch (``input_ids``, ``labels``, optional ``attention_mask``)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    was_training = student.training
    student.eval()
    try:
        logits = student(input_ids=input_ids, attention_mask=mask).logits
    finally:
        if was_training:
            student.train()
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    predictions = logits.argmax(-1)  # predictions[:, t - 1] is the student's guess for token t
    new_ids = input_ids.clone()
    chosen_rows = []
    for row, candidates in enumerate(candidate_positions(labels, mask)):
        chosen = choose_positions(candidates, ratio, generator)
        if chosen.numel():
            new_ids[row, chosen] = predictions[row, chosen - 1]
        chosen_rows.append(chosen)
    return new_ids, chosen_rows
