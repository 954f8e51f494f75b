"""Shared pieces of every logit-distillation objective.

Conventions (the whole ``lmdistill.losses`` package follows them):

* Student logits are ``[N, V]`` (callers flatten batch x time; a leading ``[..., V]`` shape is also
  accepted and flattened), labels are ``[N]`` long with ``-100`` marking ignored positions.
* Objectives return **per-token** losses ``[N]``: float32 (float64 when an input is float64), exactly 0 at
  ignored positions. Divergences are always computed in float32 or wider, whatever the models' dtype, so a
  bf16 teacher and an fp32 student cannot produce a negative KL from rounding the softmax in bf16.
* Temperature ``T`` divides both the student's and the teacher's logits before the softmax. A
  :class:`SparseTeacher` already holds log-probabilities *at* the distillation temperature, so ``T`` is only
  applied to the student for it.
* One reduction is used everywhere: :func:`reduce_tokens` = sum over valid tokens / normaliser (default:
  number of valid tokens). The trainer passes the number of valid tokens of the whole global batch as the
  normaliser, which makes gradient accumulation and data parallelism exact for token-separable objectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Union

import torch
from torch import Tensor

from lmdistill.losses.fused import fused_applies, fused_dense_chunk

IGNORE_INDEX = -100
TAIL_SHAPES = ("student", "uniform")

__all__ = [
    "IGNORE_INDEX",
    "SparseTeacher",
    "Teacher",
    "Objective",
    "Divergence",
    "reduce_tokens",
    "valid_mask",
    "compute_dtype",
    "teacher_log_probs",
    "student_log_probs",
    "kl_from_log_probs",
    "log_mix",
    "Workspace",
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


Teacher = Union[Tensor, SparseTeacher]


def valid_mask(labels_or_mask: Tensor) -> Tensor:
    """Boolean mask of valid positions from labels (``!= -100``) or from a mask (bool or 0/1 values)."""
    if labels_or_mask.dtype == torch.bool:
        return labels_or_mask
    if labels_or_mask.is_floating_point():
        return labels_or_mask != 0
    return labels_or_mask != IGNORE_INDEX


def reduce_tokens(per_token: Tensor, labels_or_mask: Tensor, normalizer: float | int | Tensor | None = None) -> Tensor:
    """The one reduction: sum of ``per_token`` over valid positions divided by ``normalizer``.

    ``normalizer`` defaults to the number of valid positions here (clamped to at least 1, so an all-ignored
    batch gives 0 with a valid gradient path rather than NaN). For exact gradient accumulation and data
    parallelism, pass the number of valid tokens of the whole global batch: the sum of the micro-batch
    results then equals the loss of the global batch.
    """
    mask = valid_mask(labels_or_mask).reshape(per_token.shape)
    total = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device)).sum()
    if normalizer is None:
        normalizer = mask.sum().clamp(min=1)
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.to(device=total.device, dtype=total.dtype)
    return total / normalizer


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (never lower)."""
    for tensor in tensors:
        if tensor is not None and tensor.dtype == torch.float64:
            return torch.float64
    return torch.float32


def student_log_probs(student_logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """``log_softmax(z / T)`` in ``dtype`` (differentiable)."""
    logits = student_logits.to(dtype)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


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
    return student_log_probs(teacher, temperature, dtype)


def check_sparse_temperature(teacher: SparseTeacher, temperature: float) -> None:
    if teacher.temperature is not None and not math.isclose(teacher.temperature, temperature, rel_tol=1e-6):
        raise ValueError(
            f"the sparse teacher holds log-probs at temperature {teacher.temperature} but the objective "
            f"uses temperature {temperature}; rebuild the cache or set the objective's temperature to match"
        )


def kl_from_log_probs(a_logp: Tensor, b_logp: Tensor) -> Tensor:
    """Row-wise ``KL(a || b) = sum_v a_v (log a_v - log b_v)`` from log-probabilities.

    Terms with ``a_v = 0`` count 0 (also when ``b_v = 0``, e.g. vocabulary padding masked with -inf in
    both), and the log-ratio is zeroed *before* the product so no NaN reaches the gradient.
    """
    a = a_logp.exp()
    alive = a > 0
    log_ratio = torch.where(alive, a_logp - b_logp, torch.zeros((), dtype=a.dtype, device=a.device))
    return (a * log_ratio).sum(-1)


def log_mix(a_logp: Tensor, b_logp: Tensor, weight_a: float) -> Tensor:
    """``log(w a + (1 - w) b)`` from log-probabilities, stable and NaN-free where both are 0."""
    if weight_a == 0.0:
        return b_logp
    if weight_a == 1.0:
        return a_logp
    x = a_logp + math.log(weight_a)
    y = b_logp + math.log1p(-weight_a)
    dead = torch.isneginf(x) & torch.isneginf(y)
    if bool(dead.any()):
        # logaddexp(-inf, -inf) has a NaN derivative: evaluate it at 0 and put -inf back
        x = x.masked_fill(dead, 0.0)
        y = y.masked_fill(dead, 0.0)
        return torch.logaddexp(x, y).masked_fill(dead, float("-inf"))
    return torch.logaddexp(x, y)


def flatten_inputs(student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None):
    """Flatten ``[..., V]`` inputs to rows; returns (logits [N,V], teacher, labels [N], leading shape)."""
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    logits = student_logits.reshape(-1, vocab)
    n = logits.shape[0]
    if labels is None:
        labels = torch.zeros(n, dtype=torch.long, device=logits.device)
    else:
        if labels.shape != lead:
            raise ValueError(f"labels {tuple(labels.shape)} must have shape {tuple(lead)} (student logits {tuple(student_logits.shape)})")
        labels = labels.reshape(-1)
    if isinstance(teacher, SparseTeacher):
        teacher = teacher.flatten()
        if teacher.num_rows != n:
            raise ValueError(f"sparse teacher has {teacher.num_rows} rows but the student has {n}")
    elif teacher is not None:
        if teacher.shape[:-1] != lead:
            raise ValueError(
                f"teacher logits {tuple(teacher.shape)} do not match student logits {tuple(student_logits.shape)}"
            )
        teacher = teacher.reshape(-1, teacher.shape[-1])
    return logits, teacher, labels, lead


def teacher_rows(teacher: Teacher, start: int, stop: int) -> Teacher:
    if isinstance(teacher, SparseTeacher):
        return teacher.rows(start, stop)
    return teacher[start:stop]


def finite_products(t: Tensor) -> Tensor:
    """In place: the NaNs of 0 * inf products (zero probability against a -inf log-probability) become 0;
    real infinities stay."""
    return t.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


_LOG2E = 1.4426950408889634


def fast_exp(x: Tensor, out: Tensor) -> Tensor:
    """``exp(x)`` into ``out`` as ``exp2(x * log2(e))``: on CPU PyTorch's exp2 kernel is ~3x faster than its
    exp (the extra multiply costs far less), at a relative error of a few float32 ulps times |x|."""
    torch.mul(x, _LOG2E, out=out)
    return torch.exp2(out, out=out)


class Workspace:
    """Reusable ``[chunk, V]`` buffers for the chunked path.

    Allocating fresh multi-megabyte tensors for every chunk costs page faults that, on a CPU, can cost more
    than the arithmetic; kernels therefore write into named buffers that live for the whole call. Cached
    student/teacher log-probabilities are per chunk (``start_chunk`` clears them) and read-only for kernels.
    """

    def __init__(self, rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows = rows
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.device = device
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        self._cache: dict[tuple, Tensor] = {}
        self.current_rows = rows

    def start_chunk(self, rows: int) -> None:
        self.current_rows = rows
        self._cache.clear()

    def buf(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """A ``[current_rows, V]`` view of the persistent buffer ``name`` (contents undefined), in the work dtype
        unless ``dtype`` is given (one buffer per name and dtype)."""
        key = (name, dtype or self.dtype)
        full = self._buffers.get(key)
        if full is None:
            full = torch.empty(self.rows, self.vocab_size, dtype=key[1], device=self.device)
            self._buffers[key] = full
        return full[: self.current_rows]

    def student_logp(self, z: Tensor, temperature: float) -> Tensor:
        key = ("student", temperature)
        hit = self._cache.get(key)
        if hit is None:
            hit = self.buf(f"slogp@{temperature}")
            if temperature != 1.0:
                torch.div(z, temperature, out=hit)
                torch.log_softmax(hit, -1, out=hit)
            else:
                torch.log_softmax(z, -1, out=hit)
            self._cache[key] = hit
        return hit

    def cached_student_logp(self, temperature: float) -> Tensor | None:
        """The student log-probabilities another kernel already computed for this chunk, or ``None``."""
        return self._cache.get(("student", temperature))

    def teacher_logp(self, teacher: Teacher, temperature: float) -> Tensor:
        key = ("teacher", temperature)
        hit = self._cache.get(key)
        if hit is None:
            hit = self.buf(f"tlogp@{temperature}")
            if isinstance(teacher, SparseTeacher):
                check_sparse_temperature(teacher, temperature)
                # the student-shaped tail needs the student at this temperature: kernels ask for it first
                student = self._cache.get(("student", temperature))
                if student is None and teacher.tail == "student":
                    raise RuntimeError("Workspace.teacher_logp: call student_logp first (a sparse teacher's tail is shaped by the student)")
                teacher.to_dense_log_probs(self.vocab_size, self.dtype, out=hit, student_logp=student)
            elif teacher.dtype == self.dtype:
                if temperature != 1.0:
                    torch.div(teacher, temperature, out=hit)
                    torch.log_softmax(hit, -1, out=hit)
                else:
                    torch.log_softmax(teacher, -1, out=hit)
            else:
                hit.copy_(teacher)  # exact upcast first: never divide or normalise in bf16
                if temperature != 1.0:
                    hit.div_(temperature)
                torch.log_softmax(hit, -1, out=hit)
            self._cache[key] = hit
        return hit

    def student_q(self, temperature: float) -> Tensor:
        """``exp`` of the cached student log-probabilities (call :meth:`student_logp` first)."""
        return self._exp_of(("student", temperature), "q")

    def teacher_p(self, temperature: float) -> Tensor:
        """``exp`` of the cached teacher log-probabilities (call :meth:`teacher_logp` first)."""
        return self._exp_of(("teacher", temperature), "p")

    def _exp_of(self, key: tuple, name: str) -> Tensor:
        exp_key = (name,) + key
        hit = self._cache.get(exp_key)
        if hit is None:
            hit = fast_exp(self._cache[key], self.buf(f"{name}@{key[1]}"))
            self._cache[exp_key] = hit
        return hit


class Objective:
    """Base class of every objective.

    Subclasses set ``name`` and ``requires_teacher`` and implement :meth:`per_token`. Stateless objectives
    keep the default (empty) state and no-op :meth:`on_step_end`; stateful ones (TAID) override them.

    Optional hooks used by the chunked path (:func:`lmdistill.losses.fused_linear_distill`):

    * :meth:`chunk_value_and_grad`: an analytic per-chunk loss and gradient w.r.t. the logits, written into
      reusable buffers; when it returns ``None`` the chunked path differentiates :meth:`per_token` with
      autograd chunk by chunk (same result, slower).
    * ``row_group_size``: rows are coupled in consecutive position blocks of this size (SinKD); ``None`` means
      rows are independent. ``batch_coupled = True`` with no group size means the loss couples all rows and
      cannot be chunked.
    * :meth:`batch_context`: statistics over *all* rows that per-row losses need (ATKD's uncertainty
      threshold); computed once from the teacher before the chunks.
    """

    name: ClassVar[str] = "objective"
    # class defaults; a Mixture sets them per instance from its parts
    requires_teacher: bool = True
    batch_coupled: bool = False
    needs_batch_context: bool = False
    row_group_size: int | None = None

    def per_token(
        self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *, context: Any = None
    ) -> Tensor:
        raise NotImplementedError

    def __call__(
        self,
        student_logits: Tensor,
        teacher: Teacher | None,
        labels: Tensor,
        normalizer: float | int | Tensor | None = None,
    ) -> Tensor:
        """Reduced loss: ``reduce_tokens(per_token(...), labels, normalizer)``."""
        return reduce_tokens(self.per_token(student_logits, teacher, labels), labels, normalizer)

    # --- chunked-path hooks -------------------------------------------------------------------------
    def chunk_value_and_grad(
        self, z: Tensor, teacher: Teacher | None, labels: Tensor, ws: Workspace, context: Any = None
    ) -> tuple[Tensor, Tensor] | None:
        return None

    def batch_context(self, teacher_chunks: Callable[[], Iterable[tuple[int, int, Teacher]]], labels: Tensor, vocab_size: int) -> Any:
        """Statistics over all rows (``teacher_chunks()`` yields ``(start, stop, teacher_rows)``)."""
        return None

    def slice_context(self, context: Any, start: int, stop: int) -> Any:
        """The part of a batch context that rows ``start:stop`` need."""
        return context

    def has_chunk_kernel(self) -> bool:
        """True when :meth:`chunk_value_and_grad` is implemented (no autograd needed in chunks)."""
        return type(self).chunk_value_and_grad is not Objective.chunk_value_and_grad

    # --- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"objective '{self.name}' is stateless but got state keys {sorted(state)}")

    def on_step_end(self, loss: float, step: int, total_steps: int) -> None:
        """Called by the trainer once per optimizer step with that step's loss."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """Learnable parameters the trainer must add to its optimizer (none for most objectives)."""
        return []

    def config(self) -> dict:
        """The constructor parameters, as a spec ``build_objective`` accepts."""
        return {"name": self.name}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({params})"


class Divergence(Objective):
    """A per-token comparison of the student's and teacher's distributions at one temperature.

    Subclasses implement :meth:`divergence` on log-probabilities; the base class handles dtype promotion,
    flattening, sparse teachers, masking and the optional ``T**2`` factor (Hinton et al. 2015 scale soft
    targets' gradients by T^2 so their magnitude does not shrink with temperature; off by default here).
    """

    def __init__(self, temperature: float = 1.0, scale_by_t2: bool = False) -> None:
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if not isinstance(scale_by_t2, bool):
            raise ValueError(f"scale_by_t2 must be true or false, got {scale_by_t2!r}")
        self.temperature = float(temperature)
        self.scale_by_t2 = scale_by_t2

    @property
    def loss_scale(self) -> float:
        return self.temperature**2 if self.scale_by_t2 else 1.0

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        raise NotImplementedError

    #: the compiled dense-teacher kernel of :mod:`lmdistill.losses.fused` computing this divergence, if any
    fused_kind: ClassVar[str | None] = None

    def fused_spec(self) -> tuple[str, tuple[float, ...]] | None:
        """``(kernel name, extra parameters)`` of the compiled kernel for this instance, or ``None``."""
        return None if self.fused_kind is None else (self.fused_kind, ())

    def chunk_value_and_grad(
        self, z: Tensor, teacher: Teacher | None, labels: Tensor, ws: Workspace, context: Any = None
    ) -> tuple[Tensor, Tensor] | None:
        """The compiled kernel for a dense teacher where it applies (:mod:`lmdistill.losses.fused`), else
        :meth:`eager_chunk`; both compute the same loss and gradient."""
        spec = self.fused_spec()
        if spec is not None and fused_applies(z, teacher):
            fused = fused_dense_chunk(spec[0], z, teacher, self.temperature, ws.buf("tmp"), *spec[1])
            if fused is not None:
                return finish_chunk(*fused, labels, self.loss_scale)
        return self.eager_chunk(z, teacher, labels, ws, context)

    def eager_chunk(
        self, z: Tensor, teacher: Teacher | None, labels: Tensor, ws: Workspace, context: Any = None
    ) -> tuple[Tensor, Tensor] | None:
        """The chunk's loss and gradient from PyTorch operations on ``ws`` buffers (``None``: use autograd)."""
        return None

    def per_token(
        self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *, context: Any = None
    ) -> Tensor:
        if teacher is None:
            raise ValueError(f"objective '{self.name}' needs a teacher")
        logits, teacher, flat_labels, lead = flatten_inputs(student_logits, teacher, labels)
        dtype = compute_dtype(logits, teacher if isinstance(teacher, Tensor) else teacher.logprobs)
        s_logp = student_log_probs(logits, self.temperature, dtype)
        t_logp = teacher_log_probs(teacher, self.temperature, logits.shape[-1], dtype, s_logp.detach())
        loss = self.divergence(s_logp, t_logp)
        if self.scale_by_t2:
            loss = loss * self.loss_scale
        loss = torch.where(flat_labels != IGNORE_INDEX, loss, torch.zeros((), dtype=dtype, device=loss.device))
        return loss.reshape(lead)

    def config(self) -> dict:
        return {"name": self.name, "temperature": self.temperature, "scale_by_t2": self.scale_by_t2}


def finish_chunk(loss: Tensor, grad: Tensor, labels: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Apply the loss scale and zero ignored rows of a kernel's (loss, grad) in place."""
    ignored = labels == IGNORE_INDEX
    if scale != 1.0:
        loss.mul_(scale)
        grad.mul_(scale)
    if bool(ignored.any()):
        loss[ignored] = 0.0
        grad[ignored] = 0.0
    return loss, grad


def iter_chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def sparse_forward_kl_chunk(
    z: Tensor, teacher: SparseTeacher, temperature: float, ws: Workspace
) -> tuple[Tensor, Tensor] | None:
    """Forward KL against a sparse teacher with the student-shaped tail or no residual (a sampled cache),
    without densifying the teacher.

    With ``p_v = r q_v / Q_tail`` outside the top-k (see :class:`SparseTeacher`) the forward KL is the KL of
    the k + 1 bucket distributions, ``sum_topk p_i (log p_i - log q_i) + r (log r - log Q_tail)``, and its
    gradient w.r.t. the logits is ``(q - p) / T``: ``q_v (1 - r / Q_tail) / T`` on the tail and
    ``(q_i - p_i) / T`` on the top-k. That needs one softmax and one scaled copy of it, the cost of a
    cross-entropy, instead of building the dense ``[rows, V]`` teacher.

    Returns per-row (loss, grad) in ``ws`` buffers, or ``None`` when the dense path must handle the chunk
    (a uniform tail with a residual, ``k = V``, or a row whose student puts no float-representable mass outside the top-k,
    where the completion falls back to uniform). Rows where ``1 - sum(top-k)`` would lose its relative
    precision (student tail below 1e-3) get their tail mass summed directly.
    """
    if teacher.k >= ws.vocab_size:
        return None
    no_residual = teacher.residual is not None and not bool(teacher.residual.any())
    if teacher.tail != "student" and not no_residual:  # with no residual every tail shape is the same: zero
        return None
    check_sparse_temperature(teacher, temperature)
    s = ws.student_logp(z, temperature)
    q = ws.student_q(temperature)
    indices = teacher.indices.long()
    s_top = s.gather(1, indices)
    q_top = s_top.exp()
    student_tail = (1.0 - q_top.sum(-1)).clamp(min=0.0)
    confident = student_tail < 1e-3
    if bool(confident.any()):
        # 1 - sum(top-k) has lost its relative precision there: sum the tail itself for those rows
        rows = s[confident].scatter(1, indices[confident], float("-inf"))
        student_tail[confident] = torch.logsumexp(rows, dim=-1).exp()
        if not bool((student_tail > 0).all()):
            return None
    p_top_log, log_r = teacher.normalized_log_probs(ws.dtype)
    p_top = p_top_log.exp()
    r = log_r.exp()
    # 0 log 0 = 0 for an exactly zero residual
    tail_term = torch.where(r > 0, r * (torch.log(r) - torch.log(student_tail)), torch.zeros_like(r))
    # 0 log 0 = 0 for stored entries of probability 0 (a sampled cache's filler ids have log-prob -inf)
    top_terms = torch.where(p_top > 0, p_top * (p_top_log - s_top), torch.zeros((), dtype=p_top.dtype))
    loss = top_terms.sum(-1) + tail_term
    grad = ws.buf("sparse_kl_grad")
    torch.mul(q, (1.0 - r / student_tail).unsqueeze(-1), out=grad)
    grad.scatter_(1, indices, q_top - p_top)
    if temperature != 1.0:
        grad.mul_(1.0 / temperature)
    return loss, grad
