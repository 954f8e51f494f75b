"""TAID: distillation towards a time-dependent interpolation of the (detached) student and the teacher."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.core import (
    Objective,
    compute_dtype,
    fast_exp,
    finish_chunk,
    flatten_inputs,
    kl_from_log_probs,
    student_log_probs,
)
from lmdistill.losses.signals import (
    Teacher,
    signal_values,
    teacher_log_probs,
)
from lmdistill.losses.fused import fused_applies, fused_dense_chunk

__all__ = ["TAID"]


class TAID(Objective):
    """Temporally Adaptive Interpolated Distillation.

    Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in
    Language Models", arXiv 2501.16937 (reference code SakanaAI/TAID). The target is an interpolation in
    logit space between the detached student and the teacher,

        p_t = softmax((1 - t) * sg(z_S / T) + t * z_T / T),      loss = KL(p_t || q)

    (logits and log-probabilities give the same p_t, since the softmax ignores per-row shifts, so sparse
    teachers work through their completed log-probabilities). ``form="ce"`` gives the reference code's
    cross-entropy ``-sum p_t log q`` instead: same gradient, a value larger by the entropy of p_t.

    The schedule is state, saved by :meth:`state_dict` and advanced by :meth:`on_step_end` with each
    optimizer step's loss l (as in the reference code; the first call only records l):

        rel = (l_prev - l) / (l_prev + 1e-15);   m <- beta * m + (1 - beta) * rel
        delta = alpha * sigmoid(m) * (1 - t);    t_lin = t_start + (t_end - t_start) * step / total_steps
        t <- min(t_end, max(t_lin, t + delta))            (t <- t_lin with adaptive=False)

    Defaults are the reference's: t_start 0.4, t_end 1.0, alpha 5e-4, beta 0.99. ``step`` is the number of
    optimizer steps completed (1-based). Gradient w.r.t. the student logits: ``(q - p_t) / T``.
    """

    name = "taid"

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        temperature: float = 1.0,
        adaptive: bool = True,
        form: str = "kl",
    ) -> None:
        for key, value in (("t_start", t_start), ("t_end", t_end), ("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be a number in [0, 1], got {value!r}")
        if not t_start <= t_end:
            raise ValueError(f"t_start ({t_start}) must not exceed t_end ({t_end})")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be true or false, got {adaptive!r}")
        if form not in ("kl", "ce"):
            raise ValueError(f"form must be 'kl' or 'ce', got {form!r}")
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.adaptive = adaptive
        self.form = form
        self.t = self.t_start
        self.prev_loss: float | None = None
        self.momentum = 0.0

    # --- the loss -------------------------------------------------------------------------------------
    def target_log_probs(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        """log p_t from the student's (detached) and the teacher's log-probabilities."""
        t = self.t
        if t >= 1.0:
            return t_logp
        student = s_logp.detach()
        if t <= 0.0:
            return student
        return torch.log_softmax((1.0 - t) * student + t * t_logp, dim=-1)

    def per_token(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *, context: Any = None) -> Tensor:
        if teacher is None:
            raise ValueError("objective 'taid' needs a teacher")
        logits, teacher, flat_labels, lead = flatten_inputs(student_logits, teacher, labels)
        dtype = compute_dtype(logits, signal_values(teacher))
        s_logp = student_log_probs(logits, self.temperature, dtype)
        t_logp = teacher_log_probs(teacher, self.temperature, logits.shape[-1], dtype, s_logp.detach())
        target = self.target_log_probs(s_logp, t_logp)
        if self.form == "kl":
            loss = kl_from_log_probs(target, s_logp)
        else:
            p = target.exp()
            loss = -(p * torch.where(p > 0, s_logp, torch.zeros((), dtype=dtype))).sum(-1)
        loss = torch.where(flat_labels != IGNORE_INDEX, loss, torch.zeros((), dtype=dtype, device=loss.device))
        return loss.reshape(lead)

    def chunk_value_and_grad(self, z, teacher, labels, ws, context=None):
        T, t = self.temperature, self.t
        if self.form == "kl" and t > 0.0 and fused_applies(z, teacher):
            # the target softmax((1 - t) s + t tl) is the softmax of the logit interpolation (1 - t) z + t z_T
            # (the log-softmaxes' row constants cancel), so this is forward KL to that interpolation: one
            # element-wise pass builds it, then the compiled forward-KL kernel (None: not applicable)
            mixed = teacher if t >= 1.0 else torch.mul(z, 1.0 - t, out=ws.buf("taid_mixed")).add_(teacher, alpha=t)
            fused = fused_dense_chunk("forward_kl", z, mixed, T, ws.buf("tmp"))
            if fused is not None:
                return finish_chunk(*fused, labels, 1.0)
        s = ws.student_logp(z, T)
        tl = ws.teacher_logp(teacher, T)
        target = ws.buf("m")
        if t >= 1.0:
            target.copy_(tl)
        elif t <= 0.0:
            target.copy_(s)
        else:
            torch.mul(s, 1.0 - t, out=target)
            target.add_(tl, alpha=t)
            torch.log_softmax(target, -1, out=target)
        p = fast_exp(target, ws.buf("p_target"))
        tmp = ws.buf("tmp")
        if self.form == "kl":
            torch.sub(target, s, out=tmp)
        else:
            torch.neg(s, out=tmp)
        torch.mul(tmp, p, out=tmp)
        loss = tmp.sum(-1)
        bad = torch.isnan(loss)
        if bool(bad.any()):  # 0 * inf where the target has zero probability
            loss[bad] = tmp[bad].nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(-1)
        grad = fast_exp(s, tmp)
        grad.sub_(p)
        if T != 1.0:
            grad.div_(T)
        return finish_chunk(loss, grad, labels, 1.0)

    # --- the schedule ---------------------------------------------------------------------------------
    def on_step_end(self, loss: float, step: int, total_steps: int) -> None:
        loss = float(loss)
        if not math.isfinite(loss):
            return  # a non-finite loss says nothing about progress; the trainer stops on it anyway
        if self.prev_loss is None:
            self.prev_loss = loss
            return
        relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * relative_change
        progress = min(1.0, step / total_steps) if total_steps > 0 else 1.0
        t_linear = self.t_start + (self.t_end - self.t_start) * progress
        if self.adaptive:
            delta = self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.t)
            self.t = min(self.t_end, max(t_linear, self.t + delta))
        else:
            self.t = t_linear
        self.prev_loss = loss

    def state_dict(self) -> dict:
        return {"t": self.t, "prev_loss": self.prev_loss, "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        expected = {"t", "prev_loss", "momentum"}
        if set(state) != expected:
            raise ValueError(f"TAID state must have keys {sorted(expected)}, got {sorted(state)}")
        self.t = float(state["t"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.momentum = float(state["momentum"])

    def config(self) -> dict:
        return {
            "name": self.name,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "alpha": self.alpha,
            "beta": self.beta,
            "temperature": self.temperature,
            "adaptive": self.adaptive,
            "form": self.form,
        }
