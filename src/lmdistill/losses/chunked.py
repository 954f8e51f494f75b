"""Distillation from hidden states in bounded memory: never materialise the ``[N, V]`` logits.

A 128k-vocabulary student and teacher over 8k tokens is 4 GB per fp32 logits tensor, several times over with
softmaxes and gradients. :func:`fused_linear_distill` takes the student's final hidden states and output
layer instead, and for each chunk of rows computes the logits, the objective's per-token loss and its
gradient w.r.t. those logits, and immediately folds that gradient into the gradients of the hidden states
and of the output weight (``dL/dh = g W``, ``dL/dW += g^T h``). Only the chunk's ``[chunk, V]`` tensors exist at
any time, so the extra memory is O(chunk x V), plus the gradients themselves. The gradients are computed in
the forward pass and returned by a custom autograd function (the approach Liger-Kernel popularised for
GPUs; this is an independent CPU/GPU-agnostic implementation).

Per chunk the objective's analytic kernel (:meth:`Objective.chunk_value_and_grad`) is used when it has one;
otherwise its :meth:`per_token` is differentiated with autograd on the chunk, which gives the same result.

Models whose logits are a known element-wise transform of the product (final-logit soft-capping
``cap * tanh(s z / cap)``, Gemma 2, arXiv:2408.00118; a constant logit scale ``s``) get it per chunk too: the
student's through ``student_softcap`` / ``student_scale`` (its derivative ``s (1 - tanh^2)`` is folded into the
chunk's logit gradient before the two products), the teacher's through its
:class:`~lmdistill.losses.signals.HiddenStates` fields.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.nn import functional as F

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.core import (
    Objective,
    Workspace,
    iter_chunks,
)
from lmdistill.losses.signals import CROSSTOK, Teacher, TeacherSignal, as_chunk_signal, chunk_rows

__all__ = ["fused_linear_distill", "default_chunk_size"]

# The chunk's matrix products read the whole output layer once per chunk, so their arithmetic intensity
# is about 2 x rows flops per weight element read: 256 rows keep them compute-bound (as fast as one big
# product), while a [256, V] float32 buffer stays small next to the full logits (256 MB at V = 256k).
# Beyond 256k entries the rows shrink so a buffer stays under ~256 MB.
_DEFAULT_ROWS = 256
_MAX_CHUNK_ELEMENTS = 1 << 26


def default_chunk_size(vocab_size: int, rows: int) -> int:
    """Rows per chunk: 256, fewer for vocabularies above 256k (at least 32)."""
    return max(1, min(rows, _DEFAULT_ROWS, max(32, _MAX_CHUNK_ELEMENTS // max(1, vocab_size))))


class _Runner:
    """Everything one fused call needs, so the autograd function only passes tensors around."""

    def __init__(self, teacher: TeacherSignal | None, labels: Tensor, objective: Objective, chunk: int,
                 normalizer: float, context: Any, keep_per_token: bool, softcap: float | None = None,
                 scale: float = 1.0) -> None:
        self.teacher = teacher
        self.softcap = softcap
        self.scale = scale
        self.labels = labels
        self.objective = objective
        self.chunk = chunk
        self.normalizer = normalizer
        self.context = context
        self.keep_per_token = keep_per_token
        self.per_token: Tensor | None = None

    def teacher_rows(self, start: int, stop: int, ws: Workspace | None) -> Teacher | None:
        return None if self.teacher is None else chunk_rows(self.teacher, start, stop, ws)

    def iter_teacher(self) -> Iterator[tuple[int, int, Teacher]]:
        for start, stop in iter_chunks(self.labels.shape[0], self.chunk):
            yield start, stop, self.teacher_rows(start, stop, None)

    def run(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, need: tuple[bool, bool, bool], mm_dtype: torch.dtype):
        need_h, need_w, need_b = need
        n, h_size = hidden.shape
        vocab = weight.shape[0]
        work = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        # the output layer runs in mm_dtype (the model's dtype, or autocast's), exactly like the plain path's
        # lm_head; everything after the logits runs in `work`
        w_mm = weight if weight.dtype == mm_dtype else weight.to(mm_dtype)
        b_mm = None if bias is None else (bias if bias.dtype == mm_dtype else bias.to(mm_dtype))
        exact = mm_dtype == work
        ws = Workspace(min(self.chunk, n) if n else 1, vocab, work, hidden.device)
        grad_h = torch.empty(n, h_size, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(vocab, h_size, dtype=work, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=work, device=weight.device) if (need_b and bias is not None) else None
        per_token = torch.zeros(n, dtype=work, device=hidden.device) if self.keep_per_token else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        objective = self.objective
        use_kernel = objective.has_chunk_kernel()
        for start, stop in iter_chunks(n, self.chunk):
            ws.start_chunk(stop - start)
            h = hidden[start:stop]
            if h.dtype != mm_dtype:
                h = h.to(mm_dtype)
            z = ws.buf("z")
            if exact:
                torch.mm(h, w_mm.T, out=z)
                if b_mm is not None:
                    z.add_(b_mm)
            else:
                z.copy_(F.linear(h, w_mm, b_mm))  # low-precision logits, then upcast
            slope = self._post_process(z, ws)
            labels = self.labels[start:stop]
            teacher = self.teacher_rows(start, stop, ws)
            context = objective.slice_context(self.context, start, stop) if self.context is not None else None
            result = objective.chunk_value_and_grad(z, teacher, labels, ws, context) if use_kernel else None
            if result is None:
                with torch.enable_grad():
                    leaf = z.detach().requires_grad_(True)
                    rows = objective.per_token(leaf, teacher, labels, context=context)
                    (g,) = torch.autograd.grad(rows.sum(), leaf)
                loss_rows = rows.detach()
            else:
                loss_rows, g = result
            if slope is not None:  # chain rule through the transform: dL/dz_raw = dL/dz * dz/dz_raw
                g = torch.mul(g, slope, out=slope)
            total += loss_rows.sum(dtype=torch.float64)
            if per_token is not None:
                per_token[start:stop] = loss_rows
            if not exact:
                g = g.to(mm_dtype)
            if need_h:
                if exact and hidden.dtype == work:
                    torch.mm(g, w_mm, out=grad_h[start:stop])
                else:
                    grad_h[start:stop] = g @ w_mm
            if need_w:
                if exact:
                    grad_w.addmm_(g.T, h)
                else:
                    grad_w += (g.T @ h).to(work)
            if grad_b is not None:
                grad_b += g.sum(0).to(work)
        scale = 1.0 / self.normalizer
        if grad_h is not None:
            grad_h.mul_(scale)
        if grad_w is not None:
            grad_w = grad_w.mul_(scale).to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(scale).to(bias.dtype)
        if per_token is not None:
            self.per_token = per_token
        if not _all_finite(hidden, weight, bias):
            # the kernels read non-finite logits as "probability 0" rows and would report a finite loss; a diverged
            # student must show as a non-finite loss (the trainer's guard stops on it)
            total.fill_(float("nan"))
        return (total * scale).to(work), grad_h, grad_w, grad_b

    def _post_process(self, z: Tensor, ws: Workspace) -> Tensor | None:
        """Apply the student's scale / soft-cap to the chunk's logits ``z`` in place (work dtype); return
        ``d z / d z_raw`` (a workspace buffer) or ``None`` when there is no transform."""
        softcap, scale = self.softcap, self.scale
        if softcap is None and scale == 1.0:
            return None
        slope = ws.buf("logit_transform_slope")
        if scale != 1.0:
            z.mul_(scale)
        if softcap is None:
            return slope.fill_(scale)
        z.div_(softcap).tanh_()
        # d/dz_raw of cap * tanh(s z_raw / cap) = s (1 - tanh^2), from the tanh itself (no second buffer)
        torch.mul(z, z, out=slope)
        slope.neg_().add_(1.0)
        if scale != 1.0:
            slope.mul_(scale)
        z.mul_(softcap)
        return slope


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, runner: _Runner, mm_dtype: torch.dtype) -> Tensor:
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        # the matmul dtype was resolved outside; autocast must not re-cast the out= products in here
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss, grad_h, grad_w, grad_b = runner.run(hidden, weight, bias, need, mm_dtype)
        # kept as a plain attribute (they are neither inputs nor outputs) and dropped in backward, so the
        # autograd engine holds the only reference and ``.grad`` takes the tensors over instead of copying
        # them (a copy of the output layer's gradient would be the path's peak at large vocabularies)
        ctx.grads = (grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_h, grad_w, grad_b = ctx.grads
        del ctx.grads
        if float(grad_output) != 1.0:
            grad_h = None if grad_h is None else grad_h * grad_output.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_output.to(grad_w.dtype)
            grad_b = None if grad_b is None else grad_b * grad_output.to(grad_b.dtype)
        return grad_h, grad_w, grad_b, None, None


def fused_linear_distill(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: TeacherSignal | tuple | None,
    labels: Tensor,
    objective: Objective,
    *,
    chunk_size: int | None = None,
    normalizer: float | int | Tensor | None = None,
    student_bias: Tensor | None = None,
    return_per_token: bool = False,
    student_softcap: float | None = None,
    student_scale: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reduced distillation loss from hidden states, with gradients, in O(chunk x V) extra memory.

    Args:
        student_hidden: ``[N, H]`` final hidden states (or ``[..., H]``, flattened).
        student_weight: ``[V, H]`` output-layer weight (``lm_head.weight``).
        teacher: a teacher signal (:mod:`lmdistill.losses.signals`): dense teacher logits ``[N, V]``;
            :class:`HiddenStates` / :class:`LowRankCodes` or a plain ``(teacher_hidden [N, H_t], teacher_weight
            [V, H_t][, bias])`` tuple, whose logits are computed chunk by chunk too; a :class:`SparseTeacher`;
            or ``None`` for objectives that need no teacher. The teacher is constant
            (no gradient flows to it).
        labels: ``[N]`` long, ``-100`` = ignored position.
        objective: any :class:`Objective` (temperature and parameters are its own). Stateful objectives
            (TAID) work unchanged: their state only changes in ``on_step_end``. Batch-coupled ones need
            whole row groups per chunk (SinKD: the chunk size is rounded down to a multiple of its
            ``group_size``; with ``group_size=None`` it cannot be chunked and a ``ValueError`` says so).
        chunk_size: rows per chunk (default: :func:`default_chunk_size`, 256 rows up to V = 256k).
        normalizer: divides the summed per-token losses (default: number of valid tokens here); pass the
            global batch's valid-token count for exact gradient accumulation, as with :func:`reduce_tokens`.
        student_bias: optional ``[V]`` output-layer bias.
        return_per_token: also return the detached per-token losses ``[N]``.
        student_softcap / student_scale: the student's own logit post-processing
            (:func:`lmdistill.models.heads.logit_transform`): its logits are
            ``softcap * tanh(scale * (hidden @ weight.T + bias) / softcap)``, computed per chunk (float32/64 work
            dtype) with the gradient through it. The teacher's own transform travels in its
            :class:`~lmdistill.losses.signals.HiddenStates`.

    Returns the scalar loss (float32, float64 for float64 inputs): the same value and the same gradients
    w.r.t. ``student_hidden``, ``student_weight`` and ``student_bias`` as
    ``reduce_tokens(objective.per_token(hidden @ weight.T + bias, teacher_logits, labels), labels, normalizer)``
    (with the student's transform applied to the product, when given).
    """
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be an Objective (see build_objective), got {type(objective).__name__}")
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = hidden.shape[0]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"student_weight {tuple(student_weight.shape)} must be [V, H] with H = {hidden.shape[1]} (hidden {tuple(student_hidden.shape)})"
        )
    vocab = student_weight.shape[0]
    flat_labels = labels.reshape(-1)
    if flat_labels.shape[0] != n:
        raise ValueError(f"labels have {flat_labels.shape[0]} positions but the hidden states have {n} rows")
    if student_bias is not None and student_bias.shape != (vocab,):
        raise ValueError(f"student_bias {tuple(student_bias.shape)} must be [{vocab}]")
    teacher = _check_teacher(teacher, n, vocab, objective)
    if student_softcap is not None and not (math.isfinite(student_softcap) and student_softcap > 0):
        raise ValueError(f"student_softcap must be a positive finite number (or None), got {student_softcap}")
    if not (math.isfinite(student_scale) and student_scale != 0):
        raise ValueError(f"student_scale must be a finite nonzero number, got {student_scale}")

    chunk = default_chunk_size(vocab, n) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if objective.batch_coupled:
        group = objective.row_group_size
        if group is None:
            raise ValueError(
                f"objective '{objective.name}' couples all rows of the batch and cannot be computed in chunks; "
                "give it a group_size (rows coupled per block) or use the plain path"
            )
        chunk = max(group, chunk // group * group)

    if normalizer is None:
        normalizer = max(1, int((flat_labels != IGNORE_INDEX).sum()))
    elif isinstance(normalizer, Tensor):
        normalizer = float(normalizer)
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")

    runner = _Runner(teacher, flat_labels, objective, chunk, float(normalizer), None, return_per_token,
                     None if student_softcap is None else float(student_softcap), float(student_scale))
    if objective.needs_batch_context:
        with torch.no_grad():
            runner.context = objective.batch_context(runner.iter_teacher, flat_labels, vocab)
    loss = _FusedLinearDistill.apply(hidden, student_weight, student_bias, runner, _matmul_dtype(hidden, student_weight))
    if return_per_token:
        return loss, runner.per_token
    return loss


def _all_finite(*tensors: Tensor | None) -> bool:
    """Every value of every given tensor finite (one pass over the inputs: small next to the chunks' products)."""
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would run in here (autocast's, if active for that device)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if hidden.dtype == weight.dtype:
        return hidden.dtype
    return torch.promote_types(hidden.dtype, weight.dtype)


def _check_teacher(teacher: TeacherSignal | tuple | None, n: int, vocab: int, objective: Objective) -> TeacherSignal | None:
    if teacher is None:
        if objective.requires_teacher:
            raise ValueError(f"objective '{objective.name}' needs a teacher")
        return None
    if getattr(teacher, "kind", None) == CROSSTOK and not objective.takes_aligned_windows:
        raise ValueError(f"objective '{objective.name}' couples each sequence's rows across tokenizers and cannot be "
                         "computed in chunks of student rows; use the plain path (or projected_kd, which can)")
    return as_chunk_signal(teacher, n, vocab)
