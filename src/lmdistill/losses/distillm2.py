"""DistiLLM-2: skew KL on teacher-generated responses and skew reverse KL on student-generated ones."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.batch_rows import RowBound, sequence_rows
from lmdistill.losses.core import Objective, compute_dtype, flatten_inputs, kl_from_log_probs, student_log_probs
from lmdistill.losses.signals import Teacher, signal_values, teacher_log_probs

__all__ = ["DistiLLM2", "STUDENT_GENERATED_FIELD"]

# The batch field that marks student-generated sequences ([B], 1.0 for a student sample): the one the on-policy
# generation regimes already put in their batches (lmdistill.generation.sources).
STUDENT_GENERATED_FIELD = "on_policy"

_ALPHA_FLOOR = 1e-2  # the official code's lower clip of the adaptive skew coefficient
_GAP_EPS = 1e-5  # and its guard in the denominator


def _log_mix_rows(a_logp: Tensor, b_logp: Tensor, weight_a: Tensor) -> Tensor:
    """``log(w a + (1 - w) b)`` with one weight per row (``weight_a``: ``[N]`` in [0, 1)), NaN-free where both
    are 0 (the stable form of :func:`lmdistill.losses.core.log_mix`)."""
    w = weight_a.unsqueeze(-1)
    x = a_logp + torch.log(w)
    y = b_logp + torch.log1p(-w)
    dead = torch.isneginf(x) & torch.isneginf(y)
    if bool(dead.any()):  # logaddexp(-inf, -inf) has a NaN derivative: evaluate it at 0 and put -inf back
        return torch.logaddexp(x.masked_fill(dead, 0.0), y.masked_fill(dead, 0.0)).masked_fill(dead, float("-inf"))
    return torch.logaddexp(x, y)


def _check_number(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value and (
        value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be a number in [{low}, {high}{')' if high_open else ']'}, got {value!r}")
    return float(value)


class DistiLLM2(Objective):
    """DistiLLM-2's contrastive objective: ``(2 - beta) SKL`` on teacher-generated responses, ``beta SRKL`` on
    student-generated ones.

    Ko et al., "DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs", ICML 2025, arXiv 2503.07067
    (official code jongwooko/distillm-2). Per token, with p the teacher and q the student at ``temperature``:

    * teacher-generated row: ``(2 - beta) KL(p || a1 p + (1 - a1) q)`` (skew KL; the gradient flows through
      the mixture), which raises the student's likelihood of the teacher's responses;
    * student-generated row: ``beta KL(q || (1 - a2) p + a2 sg(q))`` (skew reverse KL with the student's share
      of the mixture detached, as in the official code), which lowers it where the teacher disagrees.

    Which rows are student-generated: the keyword ``student_generated`` of :meth:`per_token`, one flag per row or
    one per sequence (``[B]``, rows in the flattened ``[B * L]`` order); without it every row is
    teacher-generated. Through the trainer the flag is the batch field ``on_policy`` (``[B]``, 1.0 for student
    samples: see :data:`STUDENT_GENERATED_FIELD`), bound by :meth:`for_batch`. A batch may mix both kinds.

    Curriculum (state, saved by :meth:`state_dict`, advanced by :meth:`on_step_end`):

    * ``beta`` grows from ``beta_start`` to ``beta_end`` linearly over the first ``beta_warmup`` fraction of the
      steps, ``beta = beta_start + (beta_end - beta_start) min(1, step / (beta_warmup total_steps))``: the
      official trainer's ``gradual_beta`` as two public ports of it state it (1 -> 1.5 over the first half of
      training); its released configuration turns it off, which is ``beta_end = beta_start = 1`` here. The
      weights ``2 - beta`` and ``beta`` keep the total at 2.
    * ``adaptive_alpha`` (off by default, as released): each sequence's skew coefficient follows its sentence-level
      gap, ``g = exp(mean_t log p(y_t)) - exp(mean_t log q(y_t))`` for teacher-generated sequences (the reverse
      difference for student-generated ones), as ``a = clip(1 - (1 - a0) g0 / (g + 1e-5), 0.01, a0)``: a
      sequence whose gap has shrunk below the anchor ``g0`` is distilled with less skew (the official loss
      code's rule). That code takes the anchors from attributes set outside the loss (how, could not be read
      here); ASSUMPTION: they are the mean gaps of the first optimizer step's sequences of each kind (measured
      on training calls, i.e. with gradients enabled), and ``a = a0`` until then. The coefficient is a constant for the gradient (the official code lets gradient flow through the
      student's log-probabilities in it). It needs the sequences: [B, L, V] logits, per-sequence flags, or
      ``sequence_length``; chunks of the chunked path then hold whole sequences.

    Reduction: lmdistill averages over all valid tokens (one reduction for every objective); the official code
    averages each response's tokens, then the responses.
    """

    name = "distillm2"
    batch_fields: ClassVar[tuple[str, ...]] = (STUDENT_GENERATED_FIELD,)

    def __init__(
        self,
        alpha_skl: float = 0.1,
        alpha_srkl: float = 0.1,
        beta_start: float = 1.0,
        beta_end: float = 1.5,
        beta_warmup: float = 0.5,
        adaptive_alpha: bool = False,
        temperature: float = 1.0,
    ) -> None:
        self.alpha_skl = _check_number("alpha_skl", alpha_skl, 0.0, 1.0, high_open=True)
        self.alpha_srkl = _check_number("alpha_srkl", alpha_srkl, 0.0, 1.0, high_open=True)
        self.beta_start = _check_number("beta_start", beta_start, 0.0, 2.0)
        self.beta_end = _check_number("beta_end", beta_end, 0.0, 2.0)
        self.beta_warmup = _check_number("beta_warmup", beta_warmup, 0.0, 1.0)
        if not isinstance(adaptive_alpha, bool):
            raise ValueError(f"adaptive_alpha must be true or false, got {adaptive_alpha!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        self.adaptive_alpha = adaptive_alpha
        self.temperature = float(temperature)
        self.beta = self.beta_start
        self.anchors: dict[str, float | None] = {"teacher": None, "student": None}
        self._pending: dict[str, list[float]] = {"teacher": [0.0, 0.0], "student": [0.0, 0.0]}

    # --- which rows are which -----------------------------------------------------------------------------
    def for_batch(self, batch: Mapping[str, Tensor]) -> RowBound:
        """This objective bound to a batch's ``on_policy`` flags (``[B]``; absent: all teacher-generated)."""
        b, length = sequence_rows(batch, STUDENT_GENERATED_FIELD)
        flags = batch.get(STUDENT_GENERATED_FIELD)
        if flags is None:
            flags = torch.zeros(b, dtype=torch.bool, device=batch["input_ids"].device)
        flags = flags.reshape(-1)
        if flags.numel() != b:
            raise ValueError(f"batch field '{STUDENT_GENERATED_FIELD}' must have one flag per sequence ([{b}]), "
                             f"got {tuple(flags.shape)}")
        rows = (flags != 0).repeat_interleave(length)
        return RowBound(self, {"student_generated": rows}, {"sequence_length": length},
                        group_rows=length if self.adaptive_alpha else None,
                        field_names={"student_generated": STUDENT_GENERATED_FIELD})

    def _row_flags(self, flags: Tensor | None, sequence_length: int | None, lead: torch.Size, n: int,
                   device: torch.device) -> tuple[Tensor, int | None]:
        length = sequence_length if sequence_length is not None else (int(lead[1]) if len(lead) == 2 else None)
        if flags is None:
            return torch.zeros(n, dtype=torch.bool, device=device), length
        flags = flags.reshape(-1).to(device)
        m = flags.numel()
        if m != n:
            if m == 0 or n % m:
                raise ValueError(f"student_generated has {m} flags; give one per row ({n}) or one per sequence "
                                 f"(a count that divides {n})")
            if length is not None and length != n // m:
                raise ValueError(f"student_generated has {m} sequence flags for {n} rows, but sequences have "
                                 f"{length} rows")
            length = n // m
            flags = flags.repeat_interleave(length)
        return flags != 0, length

    # --- skew coefficients ---------------------------------------------------------------------------------
    def skew_coefficients(self, s_logp: Tensor, t_logp: Tensor, labels: Tensor, flags: Tensor,
                          sequence_length: int | None) -> tuple[Tensor, Tensor]:
        """Per-row ``(a1, a2)`` for the skew KL and the skew reverse KL (constants for the gradient)."""
        n, dtype, device = s_logp.shape[0], s_logp.dtype, s_logp.device
        a1 = torch.full((n,), self.alpha_skl, dtype=dtype, device=device)
        a2 = torch.full((n,), self.alpha_srkl, dtype=dtype, device=device)
        if not self.adaptive_alpha:
            return a1, a2
        recording = torch.is_grad_enabled()  # training calls measure the anchors; evaluation does not
        if sequence_length is None or sequence_length < 1 or n % sequence_length:
            raise ValueError(
                "distillm2 with adaptive_alpha needs whole sequences: pass [B, L, V] logits, student_generated with one "
                f"flag per sequence, or sequence_length (got {sequence_length} for {n} rows)"
            )
        with torch.no_grad():
            shape = (n // sequence_length, sequence_length)
            valid = labels != IGNORE_INDEX
            safe = torch.where(valid, labels, 0).unsqueeze(-1)
            count = valid.reshape(shape).sum(-1)
            zero = torch.zeros((), dtype=dtype, device=device)

            def sentence_prob(logp: Tensor) -> Tensor:  # exp of the mean gold log-probability per sequence
                gold = torch.where(valid, logp.gather(-1, safe).squeeze(-1), zero)
                return (gold.reshape(shape).sum(-1) / count.clamp(min=1)).exp()

            gap_teacher = sentence_prob(t_logp) - sentence_prob(s_logp)
            student_seq = flags.reshape(shape)[:, 0]
            has_tokens = count > 0
            for kind, gap, members in (("teacher", gap_teacher, ~student_seq), ("student", -gap_teacher, student_seq)):
                chosen = members & has_tokens
                if recording and self.anchors[kind] is None and bool(chosen.any()):
                    self._pending[kind][0] += float(gap[chosen].sum())
                    self._pending[kind][1] += float(chosen.sum())
            for kind, gap, base, out in (("teacher", gap_teacher, self.alpha_skl, a1),
                                         ("student", -gap_teacher, self.alpha_srkl, a2)):
                anchor = self.anchors[kind]
                if anchor is None:
                    continue
                alpha = (1.0 - (1.0 - base) * anchor / (gap + _GAP_EPS)).clamp(min=min(_ALPHA_FLOOR, base), max=base)
                out.copy_(torch.where(has_tokens, alpha, torch.full_like(alpha, base)).repeat_interleave(sequence_length))
        return a1, a2

    # --- the loss ------------------------------------------------------------------------------------------
    def per_token(
        self,
        student_logits: Tensor,
        teacher: Teacher | None,
        labels: Tensor | None,
        *,
        context: Any = None,
        student_generated: Tensor | None = None,
        sequence_length: int | None = None,
    ) -> Tensor:
        """Per-token loss; ``student_generated``: ``[N]`` per row or ``[B]`` per sequence (bool or 0/1)."""
        if teacher is None:
            raise ValueError("objective 'distillm2' needs a teacher")
        logits, teacher, flat_labels, lead = flatten_inputs(student_logits, teacher, labels)
        n = logits.shape[0]
        flags, length = self._row_flags(student_generated, sequence_length, lead, n, logits.device)
        dtype = compute_dtype(logits, signal_values(teacher))
        s_logp = student_log_probs(logits, self.temperature, dtype)
        t_logp = teacher_log_probs(teacher, self.temperature, logits.shape[-1], dtype, s_logp.detach())
        a1, a2 = self.skew_coefficients(s_logp.detach(), t_logp, flat_labels, flags, length)
        loss = torch.zeros(n, dtype=dtype, device=logits.device)
        teacher_rows, student_rows = ~flags, flags
        if bool(teacher_rows.any()):
            s, t = s_logp[teacher_rows], t_logp[teacher_rows]
            skl = kl_from_log_probs(t, _log_mix_rows(t, s, a1[teacher_rows]))
            loss = loss.index_put((teacher_rows,), (2.0 - self.beta) * skl)
        if bool(student_rows.any()):
            s, t = s_logp[student_rows], t_logp[student_rows]
            srkl = kl_from_log_probs(s, _log_mix_rows(t, s.detach(), 1.0 - a2[student_rows]))
            loss = loss.index_put((student_rows,), self.beta * srkl)
        loss = torch.where(flat_labels != IGNORE_INDEX, loss, torch.zeros((), dtype=dtype, device=loss.device))
        return loss.reshape(lead)

    # --- the curriculum ------------------------------------------------------------------------------------
    def on_step_end(self, loss: float, step: int, total_steps: int) -> None:
        if self.beta_warmup > 0 and total_steps > 0:
            progress = min(1.0, step / (self.beta_warmup * total_steps))
        else:
            progress = 1.0
        self.beta = self.beta_start + (self.beta_end - self.beta_start) * progress
        for kind, (total, count) in self._pending.items():
            if self.anchors[kind] is None and count > 0:
                self.anchors[kind] = total / count
        self._pending = {"teacher": [0.0, 0.0], "student": [0.0, 0.0]}

    def state_dict(self) -> dict:
        return {"beta": self.beta, "anchor_teacher": self.anchors["teacher"], "anchor_student": self.anchors["student"]}

    def load_state_dict(self, state: dict) -> None:
        expected = {"beta", "anchor_teacher", "anchor_student"}
        if set(state) != expected:
            raise ValueError(f"distillm2 state must have keys {sorted(expected)}, got {sorted(state)}")
        self.beta = float(state["beta"])
        for kind in ("teacher", "student"):
            value = state[f"anchor_{kind}"]
            if value is not None and not math.isfinite(float(value)):
                raise ValueError(f"distillm2 state: anchor_{kind} must be finite, got {value!r}")
            self.anchors[kind] = None if value is None else float(value)

    def config(self) -> dict:
        return {
            "name": self.name,
            "alpha_skl": self.alpha_skl,
            "alpha_srkl": self.alpha_srkl,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_warmup": self.beta_warmup,
            "adaptive_alpha": self.adaptive_alpha,
            "temperature": self.temperature,
        }
