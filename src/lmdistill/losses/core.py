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
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.fused import fused_applies, fused_dense_chunk
from lmdistill.losses.signals import (
    EXACT_KINDS,
    SparseTeacher,
    Teacher,
    check_sparse_temperature,
    flatten_teacher,
    log_softmax_at,
    signal_values,
    teacher_log_probs,
    teacher_log_probs_into,
)

__all__ = [
    "IGNORE_INDEX",
    "SparseTeacher",
    "Teacher",
    "Objective",
    "OuterStep",
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
    return log_softmax_at(student_logits, temperature, dtype)


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
    if teacher is not None:
        teacher = flatten_teacher(teacher, lead, tuple(student_logits.shape))
    return logits, teacher, labels, lead


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
            # a sparse teacher's student-shaped tail needs the student at this temperature: kernels ask for it first
            teacher_log_probs_into(teacher, temperature, hit, self._cache.get(("student", temperature)))
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
    * ``takes_aligned_windows``: :meth:`per_token` also accepts a cross-tokenizer teacher
      (:class:`~lmdistill.losses.crosstok.AlignedTeacher`) cut to a window of the student's rows, so the chunked
      path can run across tokenizers (projected_kd: each student row's target depends on teacher rows only).

    What it accepts, and what it does beyond a loss:

    * ``accepted_signals``: the teacher-signal kinds (:mod:`lmdistill.losses.signals`) it computes correctly
      from. Every divergence accepts the exact and completed kinds; only objectives linear in the teacher's
      probabilities (forward KL, cross-entropy) also accept ``sampled`` (an unbiased estimate).
    * :meth:`bind_models`: what it needs from the run's two models (vocabulary maps, projection sizes).
    * ``uses_states`` / :meth:`state_per_token`: representation KD on both models' hidden states; with
      ``reads_logits`` False the objective has no logit part (a mixture then sums its parts of each kind).
    * :meth:`outer_step`: work of its own once per optimizer step, after the student's gradients and before
      the update (TGeo-KD's one-step lookahead for its fusion network); a no-op for the others. Objectives
      with one set ``has_outer_step`` and cannot sit inside a mixture.
    """

    name: ClassVar[str] = "objective"
    # class defaults; a Mixture sets them per instance from its parts
    requires_teacher: bool = True
    batch_coupled: bool = False
    needs_batch_context: bool = False
    row_group_size: int | None = None
    takes_aligned_windows: bool = False
    accepted_signals: frozenset[str] = EXACT_KINDS
    has_outer_step: ClassVar[bool] = False
    # constructor parameters that come from the run (its models), never from a config
    bound_params: ClassVar[tuple[str, ...]] = ()
    # representation objectives read both models' hidden states (state_per_token), not the logits
    reads_logits: bool = True
    uses_states: bool = False

    def leaves(self) -> list["Objective"]:
        """The plain objectives this one is made of (itself; a mixture's parts, flattened)."""
        return [self]

    def refusals(self, kind: str) -> list[str]:
        """Names of the parts that need a teacher and cannot compute from a ``kind`` signal (empty: accepted)."""
        return [o.name for o in self.leaves() if o.requires_teacher and kind not in o.accepted_signals]

    def outer_step(self, step: "OuterStep") -> None:
        """Once per optimizer step, after backward and before the optimizer: see the class docstring."""

    def bind_models(self, pair: Any) -> None:
        """Once before training, with the run's teacher and student (:class:`lmdistill.losses.pairing.ModelPair`:
        tokenizers and shapes): cross-tokenizer objectives build their vocabulary maps here, representation
        objectives their projections; a no-op for the others."""

    def state_per_token(self, student_states: tuple[Tensor, ...], teacher_states: tuple[Tensor, ...],
                        labels: Tensor) -> Tensor:
        """Representation objectives (``uses_states``): the per-token loss ``[B*L]`` from both models' hidden
        states (``output_hidden_states`` tuples of ``[B, L, d]``: embeddings, then each block), 0 where the label
        is ignored. Added to the logit part's per-token loss before the one reduction."""
        raise NotImplementedError(f"objective '{self.name}' does not read hidden states")

    def for_batch(self, batch: dict[str, Tensor]) -> "Objective":
        """This objective bound to one batch's per-row fields (which rows the student generated, span ids; see
        :mod:`lmdistill.losses.batch_rows`); itself for objectives that read nothing but logits, teacher, labels."""
        return self

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


@dataclass
class OuterStep:
    """What the trainer offers an objective's :meth:`Objective.outer_step` (all on the training device).

    ``student_hidden(input_ids, attention_mask)`` gives the student's final hidden states without gradients and
    without consuming dropout randomness; ``output_layer`` is the student's (weight, bias) sliced to the shared
    vocabulary; ``teacher_signal(batch)`` the per-token teacher of a batch; ``held_out(batch)`` a reproducible
    batch of training blocks outside ``batch`` (None when there is none); ``backward(loss)`` adds the loss's
    gradients the way the student's are added (loss scaling included); ``mean_over_ranks(t)`` averages a
    tensor over data-parallel ranks."""

    step: int
    lr: float
    batch: dict[str, Tensor]
    student_hidden: Callable[[Tensor, Tensor | None], Tensor]
    output_layer: tuple[Tensor, Tensor | None]
    teacher_signal: Callable[[dict[str, Tensor]], Teacher]
    held_out: Callable[[dict[str, Tensor]], dict[str, Tensor] | None]
    backward: Callable[[Tensor], None]
    mean_over_ranks: Callable[[Tensor], Tensor]


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
        dtype = compute_dtype(logits, signal_values(teacher))
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
