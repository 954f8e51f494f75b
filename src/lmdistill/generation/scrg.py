"""SCRG: sequence correction and re-generation.

From "Multi-Granularity Semantic Revision for Large Language Model Distillation" (Liu et al. 2024,
arXiv 2407.10068; ACL 2026), the sequence-level part of the method: student-generated sequences
carry generation errors that would misguide distillation, so before training on a student sample the
teacher finds the error token, replaces it with its own token, and the student re-generates the rest
of the sequence from the corrected prefix.

What the sources available here state (the paper's method section itself could not be read here, only
its abstract and reviews of it; see the project report):

- paper abstract: SCRG "calculates the semantic cognitive difference between the teacher and
  student to detect the error token, then corrects it with the teacher-generated one, and
  re-generates the sequence";
- OpenReview (ICLR 2025) reviewer: error tokens are "the ones with the most disagreement" by the
  teacher;
- detailed reviews of the paper's text: the difference is a token-wise KL divergence between teacher
  and student, the error token is the single position of MAXIMUM divergence, and the paper's
  Eq. (3) takes that maximum only over positions where the student's token differs from the
  teacher's (y_i^s != y_i^t); one token is corrected per sample and SCRG round.

Implemented (defaults follow the above):

1. Teacher and student are both run (teacher forcing) on prompt + student sample y. At response
   position j the score compares their next-token distributions p_T(. | x, y_<j), p_S(. | x, y_<j):
   ``kl`` = KL(p_T || p_S) (default; the direction of the paper's KL is our assumption),
   ``tvd`` = 1/2 sum |p_T - p_S|, or ``teacher_nll`` = -log p_T(y_j) (our additions).
2. Candidates are the positions where the teacher's token argmax p_T (our reading of "the
   teacher-generated token": its greedy choice on the student's prefix) differs from y_j and the score
   exceeds ``threshold`` (default 0: every disagreeing position, as in the paper; a positive threshold
   is our option to leave near-agreements alone). ``selection="max"`` (default, the paper) takes the
   candidate with the largest score; ``selection="first"`` (the variant of the method sheet / issue)
   takes the earliest one.
3. y_j is replaced by the teacher's token; if that token is EOS the response ends there, otherwise
   the student continues from x, y_<j, teacher token with the same sampling settings, up to the
   original length budget (our assumption: the paper's budget rule is not stated in what we read).

Samples without a candidate are kept unchanged. One correction per sample and call (the paper's
"SCRG frequency" > 1 corresponds to calling :func:`scrg_revise` again on the result).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmdistill.generation.sampling import SamplingParams, generate
from lmdistill.models.modes import eval_mode

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def position_scores(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, metric: str = "kl"
) -> torch.Tensor:
    """Per-position divergence scores [L] from next-token logits [L, V] and the sampled tokens [L]."""
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
    log_q = F.log_softmax(student_logits.to(dtype), dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype), dim=-1)
    if metric == "kl":
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=dtype)).sum(-1)
    if metric == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if metric == "teacher_nll":
        return -log_p.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    raise ValueError(f"unknown SCRG metric {metric!r}; use kl, tvd or teacher_nll")


SELECTIONS = ("max", "first")


def first_divergence(scores: torch.Tensor, teacher_choice: torch.Tensor, tokens: torch.Tensor, threshold: float) -> int | None:
    """Index of the first position with score > threshold where the teacher's choice differs from
    the sampled token; None when there is none."""
    hits = torch.nonzero((scores > threshold) & (teacher_choice != tokens)).flatten()
    return int(hits[0]) if hits.numel() else None


def max_divergence(scores: torch.Tensor, teacher_choice: torch.Tensor, tokens: torch.Tensor, threshold: float = 0.0) -> int | None:
    """Index of the highest-scoring position among those where the teacher's choice differs from the
    sampled token and the score exceeds ``threshold`` (the paper's Eq. (3) as reported: arg max of the
    divergence over positions with y_s != y_t); the earliest one on ties; None when there is none."""
    candidates = (scores > threshold) & (teacher_choice != tokens)
    if not bool(candidates.any()):
        return None
    masked = torch.where(candidates, scores, torch.full_like(scores, float("-inf")))
    best = masked.max()
    return int(torch.nonzero(masked == best).flatten()[0])


def error_position(scores: torch.Tensor, teacher_choice: torch.Tensor, tokens: torch.Tensor, threshold: float,
                   selection: str = "max") -> int | None:
    """The position SCRG corrects: :func:`max_divergence` (``max``) or :func:`first_divergence` (``first``)."""
    if selection == "max":
        return max_divergence(scores, teacher_choice, tokens, threshold)
    if selection == "first":
        return first_divergence(scores, teacher_choice, tokens, threshold)
    raise ValueError(f"unknown SCRG selection {selection!r}; use one of {SELECTIONS}")


@dataclass(frozen=True)
class Revision:
    response: list[int]  # the revised response (EOS last when the sequence ended)
    position: int | None  # index of the replaced token in the response, None when unchanged
    replaced: int | None = None  # the student's token that was replaced
    teacher_token: int | None = None


def _as_logits_fn(model: Any) -> LogitsFn:
    """A callable (input_ids, attention_mask) -> logits [B, L, V] for a teacher object (``.logits``),
    a Hugging Face model, or a callable already."""
    if hasattr(model, "logits") and callable(model.logits):
        return model.logits
    if isinstance(model, torch.nn.Module):
        return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits
    return model


@torch.no_grad()
def scrg_revise(
    student: torch.nn.Module,
    teacher: Any,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    threshold: float = 0.0,
    metric: str = "kl",
    selection: str = "max",
    eos_token_id: int,
    pad_token_id: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    use_cache: bool = True,
) -> list[Revision]:
    """Revise each student response (see the module docstring). ``params.max_new_tokens`` is the
    length budget of a whole response, as when it was sampled."""
    if len(prompts) != len(responses):
        raise ValueError("scrg_revise: prompts and responses differ in number")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown SCRG selection {selection!r}; use one of {SELECTIONS}")
    teacher_fn = _as_logits_fn(teacher)
    device = next(student.parameters()).device
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
        mask[i, : len(s)] = 1
    with eval_mode(student):
        s_logits = student(input_ids=ids, attention_mask=mask).logits
    t_logits = teacher_fn(ids, mask)
    if vocab_size is not None:
        s_logits, t_logits = s_logits[..., :vocab_size], t_logits[..., :vocab_size]
    n_real = min(s_logits.shape[-1], t_logits.shape[-1])
    s_logits, t_logits = s_logits[..., :n_real], t_logits[..., :n_real]

    revisions: list[Revision | None] = []
    regen_rows: list[int] = []
    regen_prompts: list[list[int]] = []
    regen_budget: list[int] = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not r:
            revisions.append(Revision(list(r), None))
            continue
        pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=device)
        tokens = torch.tensor(list(r), dtype=torch.long, device=device)
        scores = position_scores(s_logits[i, pos], t_logits[i, pos], tokens, metric)
        teacher_choice = t_logits[i, pos].argmax(-1)
        j = error_position(scores, teacher_choice, tokens, threshold, selection)
        if j is None:
            revisions.append(Revision(list(r), None))
            continue
        fixed = list(r[:j]) + [int(teacher_choice[j])]
        budget = params.max_new_tokens - len(fixed)
        if fixed[-1] == eos_token_id or budget <= 0:
            revisions.append(Revision(fixed, j, int(r[j]), fixed[-1]))
            continue
        revisions.append(Revision(fixed, j, int(r[j]), fixed[-1]))  # completed below
        regen_rows.append(i)
        regen_prompts.append(list(p) + fixed)
        regen_budget.append(budget)
    # re-generate the rest of every corrected sample with the student, batched by budget
    for budget in sorted(set(regen_budget)):
        rows = [k for k, b in enumerate(regen_budget) if b == budget]
        sub = SamplingParams(params.greedy, params.temperature, params.top_k, params.top_p, budget)
        tails = generate(student, [regen_prompts[k] for k in rows], eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         params=sub, generator=generator, vocab_size=vocab_size, use_cache=use_cache)
        for k, tail in zip(rows, tails):
            row = regen_rows[k]
            old = revisions[row]
            assert old is not None
            revisions[row] = Revision(old.response + tail, old.position, old.replaced, old.teacher_token)
    return [r for r in revisions if r is not None]
