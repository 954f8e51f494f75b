"""Teacher signals: the named forms in which a teacher's knowledge reaches a loss.

A teacher source (a live model, an offline cache, later a remote teacher; see :mod:`lmdistill.teachers`) hands
the trainer one of these per batch, rows in the student's flattened ``[B*L]`` order. Each has a *kind*, which
objectives declare they accept (:attr:`lmdistill.losses.Objective.accepted_signals`) and teachers declare they
serve, so a mismatch is refused before training instead of failing (or silently biasing) inside a loss:

============  ==================================================  =============================================
kind          form                                                what a loss does with it
============  ==================================================  =============================================
``dense``     ``Tensor [N, V]`` teacher logits                     softmax at the objective's temperature
``topk``      :class:`SparseTeacher` (top-k log-probs + residual)  completes the distribution by its tail rule
``sampled``   :class:`SparseTeacher` with ``sampled=True``         an unbiased estimate: forward KL and CE only
``hidden``    :class:`HiddenStates` (hidden, output layer, bias)   logits built chunk by chunk (chunked path)
``lowrank``   :class:`LowRankCodes` (codes, projected layer, bias)  logits built chunk by chunk (chunked path)
``crosstok``  :class:`AlignedTeacher` (its own tokens' logits     compared through the character-offset alignment
              and their alignment with the student's tokens)       (cross-tokenizer objectives only)
============  ==================================================  =============================================

Per-token objectives see only dense logits or a :class:`SparseTeacher` (:data:`Teacher`); the chunked path
turns ``hidden`` and ``lowrank`` signals into dense logits one chunk of rows at a time (:func:`chunk_rows`).
Every switch over the forms lives in this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Union

import torch
from torch import Tensor
from torch.nn import functional as F

if TYPE_CHECKING:
    from lmdistill.losses.core import Workspace

TAIL_SHAPES = ("student", "uniform")

DENSE, TOPK, SAMPLED, HIDDEN, LOWRANK, CROSSTOK = "dense", "topk", "sampled", "hidden", "lowrank", "crosstok"
SIGNAL_KINDS = (DENSE, TOPK, SAMPLED, HIDDEN, LOWRANK, CROSSTOK)
# kinds that carry the teacher's exact (or completed) distribution: every divergence accepts them
EXACT_KINDS = frozenset({DENSE, TOPK, HIDDEN, LOWRANK})

__all__ = [
    "SIGNAL_KINDS",
    "EXACT_KINDS",
    "SparseTeacher",
    "HiddenStates",
    "LowRankCodes",
    "Teacher",
    "TeacherSignal",
    "signal_kind",
    "is_sparse",
    "is_dense",
    "signal_values",
    "flatten_teacher",
    "teacher_rows",
    "teacher_log_probs",
    "teacher_log_probs_into",
    "as_chunk_signal",
    "chunk_rows",
]


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher given as its top-k log-probabilities (e.g. read from an offline cache).

    Attributes:
        logprobs: ``[N, k]`` teacher log-probabilities *at the distillation temperature* (any float dtype).
        indices: ``[N, k]`` long token ids of those entries; distinct within a row.
        residual: optional ``[N]`` probability mass **not** covered by the top-k entries. When omitted it is
            taken as ``max(0, 1 - sum(exp(logprobs)))``.
        temperature: optional temperature the log-probs were computed at; when given, an objective with a
            different temperature refuses the teacher instead of silently mixing temperatures.
        sampled: the entries are draws from the teacher (a sampled or hybrid cache: an unbiased estimate of its
            distribution, no residual) rather than its k most likely tokens; the signal kind is then ``sampled``,
            which only objectives linear in the teacher's probabilities accept.

    How the missing mass is treated (``tail``; one scheme for every objective). The teacher is completed to a
    full distribution over the student's ``V`` tokens: the top-k entries keep their probabilities and the
    residual mass ``r`` goes to the ``V - k`` other tokens, shaped by ``tail``:

    * ``"uniform"`` (the default): spread uniformly, ``p_v = r / ((V - k) Z)`` (the maximum-entropy
      completion). It is the default because its students are better: from a k = 32 top-k cache of the KJV demo
      teacher, a student reached 118.8 validation perplexity with it and 127.7 with ``"student"``
      (``bench/cache.py``); a flat tail target still carries the tail's total mass to every tail token.
    * ``"student"``: in proportion to the **student's own (detached) probabilities** ``q`` on
      those tokens,

          p_v = exp(logprobs_v) / Z                       for v in the top-k
          p_v = (r / Z) * q_v / Q_tail                    otherwise,  Q_tail = sum of q over the non-top-k tokens

      For every objective that sums ``phi(q_v, p_v)`` with ``phi`` positively homogeneous of degree 1 (every
      f-divergence: forward/reverse KL, JSD, TVD, skew KL/RKL, and TAID's KL to its interpolated target), this
      gives exactly the value and the gradient of the divergence between the two distributions *coarse-grained*
      to k + 1 categories (the top-k tokens and one "everything else" bucket holding ``r`` and ``Q_tail``):
      the cache says how much mass the teacher puts outside its top-k, not how it is shared, so the student is
      taught that total and left free in its shape. Rows whose student puts no mass on the tail fall back to
      the uniform shape. Teacher-only statistics computed without a student (ATKD's uncertainty ``1 - p_y``
      for a gold token outside the top-k) use the uniform shape.

    ``Z = sum(exp(logprobs)) + r`` only corrects rounding of low-precision caches (it is 1 for exact inputs).
    Every objective then sees an ordinary dense distribution, so all of them (TAID, ATKD, SinKD, ...) accept
    sparse teachers, and ``k = V`` reproduces the dense teacher exactly (there is no tail, the residual is
    ignored). A zero residual with ``k < V`` gives the tail probability 0: forward-type divergences ignore it,
    reverse-type divergences (reverse KL, skew reverse KL with alpha = 0) are then +inf wherever the student
    puts mass there, as the mathematics says; caches should store the residual.
    """

    logprobs: Tensor
    indices: Tensor
    residual: Tensor | None = None
    temperature: float | None = None
    tail: str = "uniform"
    sampled: bool = False

    def __post_init__(self) -> None:
        if self.logprobs.shape != self.indices.shape:
            raise ValueError(
                f"SparseTeacher: logprobs {tuple(self.logprobs.shape)} and indices "
                f"{tuple(self.indices.shape)} must have the same shape [N, k]"
            )
        if self.logprobs.dim() < 2:
            raise ValueError("SparseTeacher: logprobs must be [N, k] (or [..., k])")
        if not self.logprobs.is_floating_point():
            raise ValueError("SparseTeacher: logprobs must be a floating tensor")
        if self.indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"SparseTeacher: indices must be an integer tensor, got {self.indices.dtype}")
        if self.residual is not None and self.residual.shape != self.logprobs.shape[:-1]:
            raise ValueError(
                f"SparseTeacher: residual {tuple(self.residual.shape)} must have shape "
                f"{tuple(self.logprobs.shape[:-1])}"
            )
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError("SparseTeacher: temperature must be > 0")
        if self.tail not in TAIL_SHAPES:
            raise ValueError(f"SparseTeacher: tail must be one of {TAIL_SHAPES}, got {self.tail!r}")

    @property
    def k(self) -> int:
        return self.logprobs.shape[-1]

    @property
    def num_rows(self) -> int:
        return math.prod(self.logprobs.shape[:-1])

    def flatten(self) -> "SparseTeacher":
        """The same teacher with leading dimensions flattened to ``[N, k]``."""
        if self.logprobs.dim() == 2:
            return self
        return SparseTeacher(
            self.logprobs.reshape(-1, self.k),
            self.indices.reshape(-1, self.k),
            None if self.residual is None else self.residual.reshape(-1),
            self.temperature,
            self.tail,
            self.sampled,
        )

    def rows(self, start: int, stop: int) -> "SparseTeacher":
        """Rows ``start:stop`` (views, no copy)."""
        flat = self.flatten()
        return SparseTeacher(
            flat.logprobs[start:stop],
            flat.indices[start:stop],
            None if flat.residual is None else flat.residual[start:stop],
            self.temperature,
            self.tail,
            self.sampled,
        )

    def normalized_log_probs(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(log p_topk [N, k], log r [N])`` in ``dtype``, both divided by ``Z = sum(exp(logprobs)) + r``
        (the residual defaults to ``1 - sum(exp(logprobs))``; ``log r`` is -inf where there is none)."""
        flat = self.flatten()
        top = flat.logprobs.to(dtype)
        top_mass_log = torch.logsumexp(top, dim=-1)
        if flat.residual is not None:
            residual = flat.residual.to(dtype).clamp(min=0.0)
        else:
            residual = (1.0 - top_mass_log.exp()).clamp(min=0.0)
        log_residual = torch.log(residual)
        log_total = torch.logaddexp(top_mass_log, log_residual)
        return top - log_total.unsqueeze(-1), log_residual - log_total

    def to_dense_log_probs(
        self,
        vocab_size: int,
        dtype: torch.dtype = torch.float32,
        out: Tensor | None = None,
        student_logp: Tensor | None = None,
    ) -> Tensor:
        """The completed teacher distribution as dense log-probabilities ``[N, V]`` (see the class docstring).

        ``student_logp``: the student's log-probabilities ``[N, V]`` at the same temperature, which shape the
        tail when ``tail == "student"`` (read, never differentiated through); without it the tail is uniform.
        """
        flat = self.flatten()
        n, k = flat.logprobs.shape
        if k > vocab_size:
            raise ValueError(f"SparseTeacher: k={k} exceeds the vocabulary size {vocab_size}")
        indices = flat.indices.long()
        if n and (int(indices.min()) < 0 or int(indices.max()) >= vocab_size):
            raise ValueError(
                f"SparseTeacher: token ids must lie in [0, {vocab_size}); got "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        tail = vocab_size - k
        if out is None:
            out = torch.empty(n, vocab_size, dtype=dtype, device=flat.logprobs.device)
        if tail == 0:
            # no token outside the top-k: the residual can only be rounding, renormalise the top-k
            top = flat.logprobs.to(dtype)
            out.fill_(float("-inf"))
            out.scatter_(1, indices, top - torch.logsumexp(top, dim=-1, keepdim=True))
            return out
        top_logp, log_r = self.normalized_log_probs(dtype)  # log_r: -inf where there is no residual
        uniform_log = log_r - math.log(tail)
        if self.tail == "student" and student_logp is not None:
            if student_logp.shape != (n, vocab_size):
                raise ValueError(
                    f"SparseTeacher: student log-probs {tuple(student_logp.shape)} must be [{n}, {vocab_size}]"
                )
            with torch.no_grad():
                out.copy_(student_logp)
                out.scatter_(1, indices, float("-inf"))
                log_student_tail = torch.logsumexp(out, dim=-1)  # log Q_tail
                shaped = torch.isfinite(log_student_tail)
                # p_v = (r / Z) q_v / Q_tail; the top-k entries stay -inf until the scatter below
                out.add_(torch.where(shaped, log_r - log_student_tail, 0.0).unsqueeze(-1))
                if not bool(shaped.all()):
                    out[~shaped] = uniform_log[~shaped].unsqueeze(-1)
        else:
            out.copy_(uniform_log.unsqueeze(-1).expand(n, vocab_size))
        out.scatter_(1, indices, top_logp)
        return out

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0, tail: str = "uniform") -> "SparseTeacher":
        """Top-k of ``log_softmax(logits / T)`` with its exact residual (what a teacher cache stores)."""
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logp = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
        top, idx = torch.topk(logp, k, dim=-1)
        if k < logits.shape[-1]:
            # the complement's mass summed directly (no 1 - sum cancellation)
            residual = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1).exp()
        else:
            residual = torch.zeros(top.shape[:-1], dtype=dtype, device=top.device)
        return cls(top, idx, residual, temperature, tail)

    def to(self, device: torch.device | str) -> "SparseTeacher":
        """The same teacher with its tensors on ``device``."""
        if self.logprobs.device == torch.device(device):
            return self
        residual = None if self.residual is None else self.residual.to(device)
        return dataclasses.replace(self, logprobs=self.logprobs.to(device), indices=self.indices.to(device), residual=residual)


class HiddenStates(NamedTuple):
    """A teacher given as its final hidden states and output layer (kind ``hidden``): ``logits = hidden @
    weight.T + bias``, built one chunk of rows at a time by the chunked path, so the ``[N, V]`` teacher logits
    never exist. A live teacher serves this (:meth:`lmdistill.teachers.LiveTeacher.chunked_signal`).

    ``softcap`` / ``scale``: the teacher's own known logit post-processing
    (:class:`lmdistill.models.heads.LogitTransform`), applied to each chunk's product:
    ``logits = softcap * tanh(scale * z / softcap)`` (Gemma 2's final-logit soft-capping, arXiv:2408.00118;
    Cohere's / Granite's logit scale). The defaults are a plain product.

    A tuple, so ``(hidden, weight)`` / ``(hidden, weight, bias)`` written by hand are the same thing."""

    hidden: Tensor  # [N, H_t]
    weight: Tensor  # [V, H_t]
    bias: Tensor | None = None  # [V]
    softcap: float | None = None  # cap * tanh(z / cap) after the product (and the scale)
    scale: float = 1.0  # multiplies the product before any soft-cap

    kind = HIDDEN  # not annotated: a class attribute, not a tuple field

    @property
    def num_rows(self) -> int:
        return math.prod(self.hidden.shape[:-1])

    def logits_rows(self, start: int, stop: int, ws: "Workspace | None" = None) -> Tensor:
        """Dense teacher logits of rows ``start:stop``; written into a reused workspace buffer when one is given
        and the product can run in place (a fresh ``[chunk, V]`` tensor per chunk costs page faults)."""
        weight, bias = self.weight, self.bias
        h = self.hidden[start:stop]
        # the product in the teacher's dtype when hidden, weight and bias share one: float32, or bfloat16 /
        # float16 (a low-rank cache's logits dtype; the losses upcast the result)
        if ws is not None and h.dtype == weight.dtype and (bias is None or bias.dtype == h.dtype) and (
            h.dtype == ws.dtype or h.dtype in (torch.bfloat16, torch.float16)
        ):
            out = ws.buf("teacher_logits", h.dtype)
            if bias is None:
                torch.mm(h, weight.T, out=out)
            else:
                torch.addmm(bias, h, weight.T, out=out)
        else:
            out = F.linear(h, weight, bias)
        return self._post_process(out)

    def _post_process(self, z: Tensor) -> Tensor:
        """The scale and soft-cap, in place, in the logits' own dtype (as the model computes them)."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z


class LowRankCodes(HiddenStates):
    """A low-rank teacher cache's signal (kind ``lowrank``): the teacher's final hidden state as coordinates on
    its k principal directions (``hidden``, ``[N, k]``, dequantised) and the teacher's output layer projected
    onto them (``weight`` ``[V, k]``, ``bias`` ``[V]``: the centre's logits). Same product as
    :class:`HiddenStates`; see :mod:`lmdistill.teachers.lowrank`."""

    __slots__ = ()
    kind = LOWRANK


Teacher = Union[Tensor, SparseTeacher]  # what per-token objectives accept
TeacherSignal = Union[Tensor, SparseTeacher, HiddenStates]  # what teacher sources give (LowRankCodes is a HiddenStates)


def signal_kind(signal: TeacherSignal) -> str:
    """The kind of a signal (module docstring)."""
    if isinstance(signal, SparseTeacher):
        return SAMPLED if signal.sampled else TOPK
    if isinstance(signal, HiddenStates):
        return signal.kind
    if isinstance(signal, Tensor):
        return DENSE
    raise TypeError(f"not a teacher signal: {type(signal).__name__}")


def is_sparse(teacher: Teacher | None) -> bool:
    """True for a :class:`SparseTeacher` (top-k or sampled), False for dense logits."""
    return isinstance(teacher, SparseTeacher)


def is_dense(teacher: object) -> bool:
    """True for dense teacher logits (a tensor)."""
    return isinstance(teacher, Tensor)


def signal_values(teacher: Teacher) -> Tensor:
    """The floating tensor whose dtype a per-token teacher carries (logits, or a sparse teacher's log-probs)."""
    return teacher.logprobs if isinstance(teacher, SparseTeacher) else teacher


def flatten_teacher(teacher: Teacher, lead: torch.Size, student_shape: tuple[int, ...]) -> Teacher:
    """A per-token teacher flattened to rows, checked against the student's leading shape ``lead``."""
    n = math.prod(lead)
    if isinstance(teacher, SparseTeacher):
        teacher = teacher.flatten()
        if teacher.num_rows != n:
            raise ValueError(f"sparse teacher has {teacher.num_rows} rows but the student has {n}")
        return teacher
    if teacher.shape[:-1] != lead:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match student logits {tuple(student_shape)}")
    return teacher.reshape(-1, teacher.shape[-1])


def log_softmax_at(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """``log_softmax(z / T)`` in ``dtype`` (differentiable; the input is upcast before it is divided)."""
    logits = logits.to(dtype)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def teacher_rows(teacher: Teacher, start: int, stop: int) -> Teacher:
    """Rows ``start:stop`` of a flattened per-token teacher (views)."""
    if isinstance(teacher, SparseTeacher):
        return teacher.rows(start, stop)
    return teacher[start:stop]


def teacher_log_probs(
    teacher: Teacher, temperature: float, vocab_size: int, dtype: torch.dtype, student_logp: Tensor | None = None
) -> Tensor:
    """Teacher log-probabilities ``[N, V]`` at ``temperature`` from dense logits or a :class:`SparseTeacher`.

    ``student_logp`` (the student's log-probabilities at ``temperature``) shapes a sparse teacher's tail (see
    :class:`SparseTeacher`); dense teachers ignore it. The result never carries a gradient to the student.
    """
    if isinstance(teacher, SparseTeacher):
        check_sparse_temperature(teacher, temperature)
        return teacher.to_dense_log_probs(vocab_size, dtype, student_logp=student_logp)
    if teacher.shape[-1] != vocab_size:
        raise ValueError(
            f"teacher logits have {teacher.shape[-1]} vocabulary entries but the student has {vocab_size}; "
            "slice both to the shared real vocabulary first"
        )
    return log_softmax_at(teacher, temperature, dtype)


def check_sparse_temperature(teacher: SparseTeacher, temperature: float) -> None:
    if teacher.temperature is not None and not math.isclose(teacher.temperature, temperature, rel_tol=1e-6):
        raise ValueError(
            f"the sparse teacher holds log-probs at temperature {teacher.temperature} but the objective "
            f"uses temperature {temperature}; rebuild the cache or set the objective's temperature to match"
        )


def teacher_log_probs_into(
    teacher: Teacher, temperature: float, out: Tensor, student_logp: Tensor | None = None
) -> Tensor:
    """:func:`teacher_log_probs` written into ``out`` (``[rows, V]``, the work dtype): dense logits are upcast
    exactly before they are divided or normalised (never in bf16); a sparse teacher's tail is shaped by
    ``student_logp`` when its rule is ``student`` (then it is required)."""
    if isinstance(teacher, SparseTeacher):
        check_sparse_temperature(teacher, temperature)
        if student_logp is None and teacher.tail == "student":
            raise RuntimeError("teacher_log_probs_into: a sparse teacher's student-shaped tail needs the student's log-probs")
        return teacher.to_dense_log_probs(out.shape[-1], out.dtype, out=out, student_logp=student_logp)
    if teacher.dtype == out.dtype:
        if temperature != 1.0:
            torch.div(teacher, temperature, out=out)
            return torch.log_softmax(out, -1, out=out)
        return torch.log_softmax(teacher, -1, out=out)
    out.copy_(teacher)
    if temperature != 1.0:
        out.div_(temperature)
    return torch.log_softmax(out, -1, out=out)


def as_chunk_signal(teacher: TeacherSignal | tuple | list, n: int, vocab: int) -> TeacherSignal:
    """Check a chunked-path teacher against ``n`` student rows and ``vocab`` entries and return it flattened,
    detached and in one dtype (a hand-written ``(hidden, weight[, bias])`` tuple becomes :class:`HiddenStates`).
    A cross-tokenizer teacher (:class:`~lmdistill.losses.crosstok.AlignedTeacher`) stays whole: its rows are the
    teacher's own, and each chunk gets it cut to the chunk's student rows."""
    if getattr(teacher, "kind", None) == CROSSTOK:
        if teacher.student_rows != n:
            raise ValueError(f"the teacher's alignment covers {teacher.student_rows} student rows but the student has {n}")
        return teacher
    if isinstance(teacher, SparseTeacher):
        teacher = teacher.flatten()
        if teacher.num_rows != n:
            raise ValueError(f"sparse teacher has {teacher.num_rows} rows but the student has {n}")
        return teacher
    if isinstance(teacher, (tuple, list)):
        kind = type(teacher) if isinstance(teacher, HiddenStates) else HiddenStates
        if not isinstance(teacher, HiddenStates) and len(teacher) not in (2, 3):
            raise ValueError("a teacher given by its output layer is (hidden, weight) or (hidden, weight, bias)")
        softcap, scale = (teacher.softcap, teacher.scale) if isinstance(teacher, HiddenStates) else (None, 1.0)
        t_hidden = teacher[0].reshape(-1, teacher[0].shape[-1]).detach()
        t_weight = teacher[1].detach()
        if t_hidden.shape[0] != n:
            raise ValueError(f"teacher hidden states have {t_hidden.shape[0]} rows but the student has {n}")
        if t_weight.dim() != 2 or t_weight.shape != (vocab, t_hidden.shape[1]):
            raise ValueError(
                f"teacher weight {tuple(t_weight.shape)} must be [V={vocab}, H_t={t_hidden.shape[1]}]; "
                "slice padded vocabularies to the shared real tokens first"
            )
        t_bias = teacher[2].detach() if len(teacher) >= 3 and teacher[2] is not None else None
        common = torch.promote_types(t_hidden.dtype, t_weight.dtype)
        if t_bias is not None:
            common = torch.promote_types(common, t_bias.dtype)
        # e.g. bf16 hidden states from an autocast forward with an fp32 output layer: upcast once, exactly
        t_bias = None if t_bias is None else t_bias.to(common)
        return kind(t_hidden.to(common), t_weight.to(common), t_bias, softcap, scale)
    dense = teacher.reshape(-1, teacher.shape[-1]).detach()
    if dense.shape != (n, vocab):
        raise ValueError(f"teacher logits {tuple(teacher.shape)} must be [N={n}, V={vocab}]")
    return dense


def chunk_rows(signal: TeacherSignal, start: int, stop: int, ws: "Workspace | None" = None) -> Teacher:
    """Rows ``start:stop`` of a (checked, flattened) chunked-path signal as a per-token teacher: dense logits
    (built from hidden states or low-rank codes), a sparse teacher, or a cross-tokenizer teacher cut to those
    student rows."""
    if getattr(signal, "kind", None) == CROSSTOK:
        return signal.cut(start, stop)
    if isinstance(signal, HiddenStates):
        return signal.logits_rows(start, stop, ws)
    return teacher_rows(signal, start, stop)
