"""MiniLLM: reverse KL over whole student responses, optimised by policy gradient.

Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation of Large Language Models", arXiv 2306.08543
(Section 2.2; reference code microsoft/LMOps ``minillm/``, read for behaviour only).

The objective is the sequence-level reverse KL ``L(theta) = KL(q_theta(y|x) || p(y|x))`` over responses the
student generates. Its policy gradient, split by the paper's *single-step decomposition* (Eq. 3) and written
for responses sampled from the *teacher-mixed* policy ``p~ = alpha p + (1 - alpha) q_theta`` (Eqs. 4-5) with
the *length-normalised* long-term reward (Eq. 6), is::

    grad L = - E_{x, y ~ p~} sum_t w_t [ grad sum_v q_t(v) log(p_t(v) / q_t(v))       (Single: exact over V)
                                        + R^Norm_{t+1} grad log q_t(y_t) ]            (Long: policy gradient)

with ``q_t = q_theta(. | y_<t, x)``, ``p_t`` the teacher's, ``r_t = log p_t(y_t) - log q_t(y_t)``,
``R^Norm_{t+1}`` the mean of ``r_t'`` over the response tokens after ``t`` and ``w_t = q_t(y_t) / p~_t(y_t)``
the per-token importance weight (the paper's approximation of the product over steps ``t' <= t``).

What :func:`minillm_parts` computes per response token (rows whose label is ``-100`` give 0), everything
inside ``sg(.)`` detached::

    w_t      = sg( q_t(y_t) / (alpha p_t(y_t) + (1 - alpha) q_t(y_t)) )         in (0, 1 / (1 - alpha)]
    r_t      = sg( log p_t(y_t) - log q_t(y_t) )
    A_t      = sg( sum_{t' in F_t} r_t' / |F_t| )      F_t: the valid positions after t in the same row
               (0 when F_t is empty; the plain sum when ``length_normalize=False``)
    single_t = w_t * KL(q_t || p_t)                    (its gradient is -w_t grad E_{y~q_t}[r_t])
    rho_t    = exp(log q_t(y_t) - sg(log q_t(y_t)))   (1 in value, gradient grad log q_t(y_t))
    long_t   = max(-A_t w_t rho_t, -A_t clip(w_t rho_t, 1 - eps, 1 + eps))    (``clip_range=eps``)
             = -A_t w_t rho_t                                                   (``clip_range=None``)
    loss_t   = single_t + long_t

so ``grad sum_t loss_t`` is the paper's estimator for the sampled responses (with ``clip_range=None`` exactly;
with clipping, the long term of a token whose weight lies outside ``[1 - eps, 1 + eps]`` on the side the
advantage would push it further is dropped, PPO's pessimistic bound, Schulman et al. 2017 arXiv 1707.06347, which
the paper adds "to further improve stability"). The trainer divides the summed per-token losses by the number of
response tokens of the global batch, a constant factor on the paper's per-sequence sum. The value of ``loss_t``
is ``w_t KL_t - w_t A_t`` (clipped): both parts estimate a per-token reverse KL, so it reads as one.

Assumptions where the paper is ambiguous (stated because they change numbers):

- Length normalisation: Eq. 6 writes ``1 / (T - t - 1) sum_{t'=t+1}^{T} r_t'``. With t counted from 1 that
  normaliser is one less than the number of terms (and 0 at ``t = T - 1``); with t counted from 0 (tokens
  ``0 .. T-1``) it is exactly the number of future tokens. We read it as the mean over the future tokens, and
  ``R^Norm_{T+1} = 0`` for the last token. The reference code's advantage includes the token's own reward and
  divides by the count including it; we follow the paper (future rewards only: the own reward is the single-step
  term's, taken exactly).
- Importance weights: the paper's approximation ``w_t ~ q_t(y_t) / p~_t(y_t)``, applied to both terms as in
  Eq. 5 (the reference code applies it to the long term only). ``q`` here is the student being trained, which
  is also the policy that sampled (one update per sample batch: the regime samples afresh every step), so the
  PPO ratio to the sampling policy is 1 and only ``w_t`` is clipped.
- Not reproduced from the reference code: its discount (gamma = 0.95), reward clipping to [-1, 1], advantage
  whitening, several PPO epochs over a rollout buffer, and the pre-training LM loss ``L_PT`` (Section 2.3). The
  last is a separate term the paper adds on a pre-training corpus; lmdistill trains it as another run or not at
  all (a ``mix`` with ``cross_entropy`` here would apply it to the sampled responses, which is something else).
- Temperature 1 throughout: the regime samples from ``p~`` at temperature 1 with no top-k/top-p, the only
  sampling distribution for which these weights are right (:mod:`lmdistill.generation.sources`).

Through the trainer the mixing coefficient comes from the batch (field ``mix_alpha``, written by the ``minillm``
regime's source), so the regime's ``mix_alpha`` is the one setting; bound to a batch without it the objective
refuses (it is a policy gradient on the regime's samples). Called directly, ``mix_alpha`` defaults to 0 (samples
from the student itself) and all rows of a flat ``[N, V]`` input are one response (``[B, L, V]``: B responses).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.errors import ConfigError
from lmdistill.losses.batch_rows import RowBound, sequence_rows
from lmdistill.losses.core import Objective, compute_dtype, flatten_inputs, kl_from_log_probs, student_log_probs
from lmdistill.losses.signals import Teacher, signal_values, teacher_log_probs

__all__ = ["MiniLLM", "MIX_ALPHA_FIELD", "minillm_parts", "future_mean"]

#: the batch field (``[B]``) carrying the teacher-mixing coefficient the regime sampled with
MIX_ALPHA_FIELD = "mix_alpha"


def future_mean(rewards: Tensor, valid: Tensor, normalize: bool = True) -> Tensor:
    """Per position of ``[B, L]`` rows: the sum of ``rewards`` over the valid positions strictly after it in the
    same row, divided by their number when ``normalize`` (0 where there are none)."""
    r = torch.where(valid, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    inclusive = r.flip(-1).cumsum(-1).flip(-1)
    count_inclusive = valid.to(rewards.dtype).flip(-1).cumsum(-1).flip(-1)
    zero = torch.zeros_like(inclusive[..., :1])
    future = torch.cat([inclusive[..., 1:], zero], dim=-1)  # exclusive: positions t+1 .. end
    if not normalize:
        return future
    count = torch.cat([count_inclusive[..., 1:], zero], dim=-1)
    return future / count.clamp(min=1.0)


def _alpha_rows(mix_alpha: float | Tensor, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(mix_alpha, Tensor):
        alpha = mix_alpha.reshape(-1).to(device=device, dtype=dtype)
        if alpha.numel() == 1:
            alpha = alpha.expand(n)
        if alpha.numel() != n:
            raise ValueError(f"mix_alpha has {alpha.numel()} values; give one, or one per row ({n})")
    else:
        alpha = torch.full((n,), float(mix_alpha), dtype=dtype, device=device)
    if bool(((alpha < 0) | (alpha > 1) | torch.isnan(alpha)).any()):
        raise ValueError("mix_alpha must lie in [0, 1]")
    return alpha


def minillm_parts(
    student_logits: Tensor,
    teacher: Teacher,
    labels: Tensor,
    *,
    mix_alpha: float | Tensor = 0.0,
    sequence_length: int | None = None,
    length_normalize: bool = True,
    clip_range: float | None = 0.2,
) -> dict[str, Tensor]:
    """The per-token pieces of the MiniLLM loss (see the module docstring), each ``[N]`` (``N`` rows of the flattened
    input, 0 at ignored rows): ``loss`` (= ``single + long``, differentiable), ``single``, ``long`` (the surrogate),
    and the detached ``weight`` (w_t), ``reward`` (r_t) and ``advantage`` (A_t).

    ``labels`` are the sampled response tokens (``-100`` on prompt and padding); ``sequence_length`` splits the rows
    into responses (default: ``L`` of a ``[B, L, V]`` input, else all rows are one response); ``mix_alpha`` is a
    number or one value per row."""
    logits, teacher, flat_labels, lead = flatten_inputs(student_logits, teacher, labels)
    n = logits.shape[0]
    length = sequence_length if sequence_length is not None else (int(lead[1]) if len(lead) == 2 else n)
    if length < 1 or n % length:
        raise ValueError(f"minillm: {n} rows do not split into responses of {length} rows")
    dtype = compute_dtype(logits, signal_values(teacher))
    s_logp = student_log_probs(logits, 1.0, dtype)
    t_logp = teacher_log_probs(teacher, 1.0, logits.shape[-1], dtype, s_logp.detach())
    valid = flat_labels != IGNORE_INDEX
    index = torch.where(valid, flat_labels, torch.zeros_like(flat_labels)).unsqueeze(-1)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    s_tok = torch.where(valid, s_logp.gather(-1, index).squeeze(-1), zero)  # log q_t(y_t), with gradient
    with torch.no_grad():
        t_tok = t_logp.gather(-1, index).squeeze(-1)
        s_det = s_tok.detach()
        alpha = _alpha_rows(mix_alpha, n, dtype, logits.device)
        log_mix = torch.logaddexp(torch.log(alpha) + t_tok, torch.log1p(-alpha) + s_det)
        weight = torch.where(valid, torch.exp(s_det - log_mix), zero)
        reward = torch.where(valid, t_tok - s_det, zero)
        advantage = future_mean(reward.reshape(-1, length), valid.reshape(-1, length), length_normalize).reshape(-1)
    single = weight * kl_from_log_probs(s_logp, t_logp)
    ratio = weight * torch.exp(s_tok - s_det)
    long = -advantage * ratio
    if clip_range is not None:
        long = torch.maximum(long, -advantage * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    single = torch.where(valid, single, zero)
    long = torch.where(valid, long, zero)
    parts = {"loss": single + long, "single": single, "long": long,
             "weight": weight, "reward": reward, "advantage": torch.where(valid, advantage, zero)}
    return {k: v.reshape(lead) for k, v in parts.items()}


class MiniLLM(Objective):
    """MiniLLM's policy-gradient reverse KL on teacher-mixed student samples (Gu et al., "MiniLLM: Knowledge
    Distillation of Large Language Models", arXiv 2306.08543): the per-token surrogate of
    :func:`minillm_parts`, whose gradient is the paper's single-step + length-normalised long-term estimator with
    per-token importance weights. Trains with ``regime: {kind: minillm}``, whose samples it scores.

    ``length_normalize`` (Eq. 6; default on), ``clip_range`` (PPO-style clipping of the importance weight in the
    long-term term, default 0.2 as in the reference code; ``None``: the unclipped estimator).
    """

    name = "minillm"
    # the rows of one response are coupled (future rewards); bound to a batch, chunks hold whole responses
    batch_coupled = True
    row_group_size = None

    def __init__(self, length_normalize: bool = True, clip_range: float | None = 0.2) -> None:
        if not isinstance(length_normalize, bool):
            raise ValueError(f"length_normalize must be true or false, got {length_normalize!r}")
        if clip_range is not None and (isinstance(clip_range, bool) or not isinstance(clip_range, (int, float))
                                       or not (0 < clip_range < 1) or not math.isfinite(clip_range)):
            raise ValueError(f"clip_range must be a number in (0, 1) or null, got {clip_range!r}")
        self.length_normalize = length_normalize
        self.clip_range = None if clip_range is None else float(clip_range)

    def for_batch(self, batch: Mapping[str, Tensor]) -> RowBound:
        """Bound to a batch of the ``minillm`` regime: its ``mix_alpha`` ([B]) spread over rows, responses of L rows."""
        b, length = sequence_rows(batch, MIX_ALPHA_FIELD)
        alpha = batch.get(MIX_ALPHA_FIELD)
        if alpha is None:
            raise ConfigError("objective 'minillm' is a policy gradient on the minillm regime's samples (the batch "
                              "has no 'mix_alpha'): train it with regime: {kind: minillm}")
        alpha = alpha.reshape(-1)
        if alpha.numel() != b:
            raise ValueError(f"batch field '{MIX_ALPHA_FIELD}' must have one value per sequence ([{b}]), got "
                             f"{tuple(alpha.shape)}")
        return RowBound(self, {"mix_alpha": alpha.repeat_interleave(length)}, {"sequence_length": length},
                        group_rows=length, field_names={"mix_alpha": MIX_ALPHA_FIELD})

    def per_token(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *,
                  context: Any = None, mix_alpha: float | Tensor = 0.0, sequence_length: int | None = None) -> Tensor:
        if teacher is None:
            raise ValueError("objective 'minillm' needs a teacher")
        if labels is None:
            raise ValueError("objective 'minillm' needs the sampled tokens as labels")
        return minillm_parts(student_logits, teacher, labels, mix_alpha=mix_alpha, sequence_length=sequence_length,
                             length_normalize=self.length_normalize, clip_range=self.clip_range)["loss"]

    def config(self) -> dict:
        return {"name": self.name, "length_normalize": self.length_normalize, "clip_range": self.clip_range}
