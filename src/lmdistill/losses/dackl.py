"""DAC-KL and span-level correlation consistency, the token- and span-level losses of Multi-Granularity
Semantic Revision (Liu et al., arXiv 2407.10068; its sequence level, SCRG, is a generation regime).

The paper's equations could not be read from a primary source here; both losses implement the structure its
text and its published reviews document, and every assumption is marked ASSUMPTION in the docstrings.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.batch_rows import RowBound, sequence_rows
from lmdistill.losses.core import (
    Objective,
    OuterStep,
    compute_dtype,
    flatten_inputs,
    iter_chunks,
    kl_from_log_probs,
    reduce_tokens,
    student_log_probs,
)
from lmdistill.losses.signals import Teacher, flatten_teacher, signal_values, teacher_log_probs, teacher_rows

__all__ = ["DACKL", "SpanCorrelation", "SPANS_FIELD", "clipped_log_weights"]

SPANS_FIELD = "spans"  # batch field of span ids ([B, L] long, -1 outside any span), e.g. from a phrase chunker


def _check(name: str, value: Any, ok: bool, want: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


def clipped_log_weights(t_logp: Tensor, lower: Tensor, upper: Tensor, sharpness: float) -> Tensor:
    """``log m`` ``[N, V]``: each token's weight in DAC-KL's clipped distributions.

    With the teacher's probabilities sorted in descending order (stable) and ``c_r`` the teacher mass *before*
    rank ``r``, ``m_r = sigmoid((c_r - lower) / s) * sigmoid((upper - c_r) / s)`` (``s = sharpness``): about 1
    inside the quantile window ``[lower, upper]`` of the teacher's cumulative distribution, about 0 outside.
    The teacher's most likely token (rank 0, the target class) always has weight 1.
    """
    p_sorted, order = torch.sort(t_logp.exp(), dim=-1, descending=True, stable=True)
    before = torch.cumsum(p_sorted, dim=-1) - p_sorted
    log_m = F.logsigmoid((before - lower.unsqueeze(-1)) / sharpness) + F.logsigmoid((upper.unsqueeze(-1) - before) / sharpness)
    log_m = torch.cat([torch.zeros_like(log_m[:, :1]), log_m[:, 1:]], dim=-1)
    return torch.empty_like(log_m).scatter(-1, order, log_m)


class DACKL(Objective):
    """Distribution adaptive clipping KL: forward KL restricted to the high-density part of the teacher's
    distribution, whose bounds a small network predicts per token.

    Liu et al., "Multi-Granularity Semantic Revision for Large Language Model Distillation", arXiv 2407.10068
    (token level). Per token, at ``temperature``:

    1. A network (``n_inputs`` -> ``hidden_size`` -> 2, tanh) reads the teacher's ``n_inputs`` largest
       probabilities (sorted; zero-padded) and predicts quantile bounds of the teacher's distribution,
       ``0 <= lower < upper <= 1`` with ``upper - lower >= min_window``.
    2. Each token gets a weight ``m`` (:func:`clipped_log_weights`): about 1 when the teacher mass ranked before
       it lies in ``[lower, upper]``, about 0 outside (clipping the head beyond the target class and the
       redundant tail); the teacher's most likely token, the target class, keeps weight 1.
    3. Teacher and student are clipped alike and renormalised, ``p* = m p / sum(m p)``, ``q* = m q / sum(m q)``,
       and the loss is ``KL(p* || q*)``: a divergence (>= 0, 0 when q is proportional to p on the kept tokens),
       forward KL when the window covers everything.

    ASSUMPTIONS (the paper's Eq. 6-8 could not be read here; reviews describe a learnable MLP predicting the
    bounds, a sigmoid-based mask, the concatenation of the max-probability (target) class, and a KL on the
    result): the bounds are quantiles of the teacher's cumulative distribution over its sorted tokens; the
    mask is the product of two sigmoids with width ``sharpness``; the clipped vectors are renormalised (the
    reviews note the paper's are not, which would not make a divergence); the network reads the top sorted
    probabilities; and ``min_window`` keeps the window from closing, since the loss alone is smallest when
    nothing but the target class is kept.

    How the network learns: by the DAC-KL loss itself, as in the paper, but in :meth:`outer_step`: on the step's
    first micro-batch the student's logits (detached) and the live network give the loss whose gradient is
    added to the network's parameters (:meth:`parameters`, which the trainer's optimizer updates). The loss the
    student is trained with uses the bounds detached, so both training paths (plain, and chunked, which
    differentiates with respect to the logits only) give the student the same gradient and the network is
    trained once per step. ``learn_bounds=False`` keeps the network fixed (it then may sit in a mixture, which
    objectives with an outer step may not).

    Caution, measured: trained this way the window closes to its minimum width at the head. Distilling the KJV
    byte-bigram teacher of ``tests/losses/test_logit_objectives_real_text.py`` for 40 steps, the learned bounds
    went from about [0.01, 0.99] to [0.00, 0.20] and the student reached 0.27 of its initial KL to the teacher,
    against 0.02 with the initial window kept (``learn_bounds=False``). A wider ``min_window`` limits this.
    """

    name = "dac_kl"
    has_outer_step: ClassVar[bool] = True

    def __init__(
        self,
        temperature: float = 1.0,
        n_inputs: int = 64,
        hidden_size: int = 32,
        min_window: float = 0.2,
        sharpness: float = 0.05,
        learn_bounds: bool = True,
        seed: int = 0,
    ) -> None:
        _check("temperature", temperature, temperature > 0, "a number > 0")
        for key, value in (("n_inputs", n_inputs), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        _check("min_window", min_window, 0 < min_window <= 1, "a number in (0, 1]")
        _check("sharpness", sharpness, sharpness > 0, "a number > 0")
        if not isinstance(learn_bounds, bool):
            raise ValueError(f"learn_bounds must be true or false, got {learn_bounds!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.temperature = float(temperature)
        self.n_inputs = n_inputs
        self.hidden_size = hidden_size
        self.min_window = float(min_window)
        self.sharpness = float(sharpness)
        self.learn_bounds = learn_bounds
        self.has_outer_step = learn_bounds  # a fixed network needs no outer step
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(n_inputs, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 2))
        with torch.no_grad():
            for layer in (self.net[0], self.net[2]):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.zero_()
            # start with a wide window: lower near 0, upper near 1 (the clipping is learned from there)
            self.net[2].bias.copy_(torch.tensor([-4.0, 4.0]))
        for p in self.net.parameters():
            p.requires_grad_(learn_bounds)

    # --- the bounds ----------------------------------------------------------------------------------------
    def bounds(self, t_logp: Tensor) -> tuple[Tensor, Tensor]:
        """``(lower, upper)`` ``[N]`` from the teacher's log-probabilities (differentiable in the network)."""
        top = torch.topk(t_logp.detach(), min(self.n_inputs, t_logp.shape[-1]), dim=-1).values.exp()
        if top.shape[-1] < self.n_inputs:
            top = F.pad(top, (0, self.n_inputs - top.shape[-1]))
        first, last = (
            [p.to(device=top.device, dtype=top.dtype) for p in (layer.weight, layer.bias)] for layer in (self.net[0], self.net[2])
        )
        raw = F.linear(torch.tanh(F.linear(top, *first)), *last)
        w = self.min_window
        lower = torch.sigmoid(raw[:, 0]) * (1.0 - w)
        upper = lower + w + torch.sigmoid(raw[:, 1]) * (1.0 - lower - w)
        return lower, upper

    def clipped_kl(self, s_logp: Tensor, t_logp: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
        """``KL(p* || q*)`` per row for given bounds (step 3 of the class docstring)."""
        log_m = clipped_log_weights(t_logp, lower, upper, self.sharpness)
        t_clip = t_logp + log_m
        s_clip = s_logp + log_m
        t_clip = t_clip - torch.logsumexp(t_clip, dim=-1, keepdim=True)
        s_clip = s_clip - torch.logsumexp(s_clip, dim=-1, keepdim=True)
        return kl_from_log_probs(t_clip, s_clip)

    def _per_token(self, student_logits: Tensor, teacher: Teacher, labels: Tensor | None, *, learn: bool) -> Tensor:
        logits, teacher, flat_labels, lead = flatten_inputs(student_logits, teacher, labels)
        dtype = compute_dtype(logits, signal_values(teacher))
        s_logp = student_log_probs(logits, self.temperature, dtype)
        t_logp = teacher_log_probs(teacher, self.temperature, logits.shape[-1], dtype, s_logp.detach())
        with torch.set_grad_enabled(learn and torch.is_grad_enabled()):
            lower, upper = self.bounds(t_logp)
        if not learn:
            lower, upper = lower.detach(), upper.detach()
        loss = self.clipped_kl(s_logp, t_logp, lower, upper)
        loss = torch.where(flat_labels != IGNORE_INDEX, loss, torch.zeros((), dtype=dtype, device=loss.device))
        return loss.reshape(lead)

    def per_token(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *, context: Any = None) -> Tensor:
        if teacher is None:
            raise ValueError("objective 'dac_kl' needs a teacher")
        return self._per_token(student_logits, teacher, labels, learn=False)

    def network_loss(self, student_logits: Tensor, teacher: Teacher, labels: Tensor,
                     normalizer: float | int | Tensor | None = None) -> Tensor:
        """The DAC-KL loss as a function of the network only (the student's logits are detached): what
        :meth:`outer_step` minimises."""
        return reduce_tokens(self._per_token(student_logits.detach(), teacher, labels, learn=True), labels, normalizer)

    def outer_step(self, step: OuterStep, chunk_rows: int = 256) -> None:
        """Gradients of the DAC-KL loss for the network, from the step's first micro-batch (see the class
        docstring), ``chunk_rows`` rows at a time; averaged over data-parallel ranks."""
        if not self.learn_bounds:
            return
        batch = step.batch
        hidden = step.student_hidden(batch["input_ids"], batch.get("attention_mask"))
        weight, bias = step.output_layer
        with torch.no_grad():
            teacher = step.teacher_signal(batch)
        labels = batch["labels"].reshape(-1)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        teacher = flatten_teacher(teacher, labels.shape, (labels.shape[0], weight.shape[0]))  # rows in [B * L] order
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        for start, stop in iter_chunks(labels.shape[0], chunk_rows):
            with torch.no_grad():
                logits = F.linear(hidden[start:stop].to(weight.dtype), weight, bias)
            loss = self.network_loss(logits, teacher_rows(teacher, start, stop), labels[start:stop], n_valid)
            if loss.requires_grad:
                step.backward(loss)
        for p in self.parameters():
            if p.grad is not None:
                p.grad = step.mean_over_ranks(p.grad)

    # --- state ---------------------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters()) if self.learn_bounds else []

    def state_dict(self) -> dict:
        """The network's weights as nested lists of floats: the trainer writes objective state as JSON (exact
        for float32 values)."""
        return {"net": {k: v.detach().cpu().tolist() for k, v in self.net.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"net"} or not isinstance(state["net"], Mapping):
            raise ValueError(f"dac_kl state must have the key 'net' (the bounds network's weights), got {sorted(state)}")
        current = self.net.state_dict()
        if set(state["net"]) != set(current):
            raise ValueError(f"dac_kl state: network weights {sorted(state['net'])} do not match {sorted(current)}")
        weights = {}
        for key, value in state["net"].items():
            tensor = torch.as_tensor(value, dtype=current[key].dtype)
            if tensor.shape != current[key].shape:
                raise ValueError(f"dac_kl state: '{key}' has shape {tuple(tensor.shape)}, this network needs "
                                 f"{tuple(current[key].shape)} (n_inputs / hidden_size differ from the saved run)")
            weights[key] = tensor
        self.net.load_state_dict(weights)

    def config(self) -> dict:
        return {
            "name": self.name,
            "temperature": self.temperature,
            "n_inputs": self.n_inputs,
            "hidden_size": self.hidden_size,
            "min_window": self.min_window,
            "sharpness": self.sharpness,
            "learn_bounds": self.learn_bounds,
            "seed": self.seed,
        }


class SpanCorrelation(Objective):
    """Span-level correlation consistency: within each span, the products of adjacent tokens' distributions
    should agree between teacher and student.

    Liu et al., "Multi-Granularity Semantic Revision for Large Language Model Distillation", arXiv 2407.10068
    (span level). For each pair of adjacent positions ``t, t + 1`` in one span (both valid), with p, q the
    teacher's and student's distributions at ``temperature``,

        loss_t = || p_t * p_{t+1} - q_t * q_{t+1} ||_2^2         (* element-wise over the vocabulary)

    charged to position ``t``; positions that start no pair give 0 (the reduction averages over all valid
    tokens, like every objective here).

    ASSUMPTIONS (the paper's Eq. 10-11 could not be read here; reviews describe "Hadamard products of adjacent
    probability vectors within spans" compared by an L2 distance): the distance is the squared L2 norm (smooth,
    so its gradient exists where the two agree), and only adjacent pairs are compared.

    Spans: the paper takes them from a phrase chunker. Here they are span ids per row (the ``span_ids`` keyword,
    ``[N]``, -1 outside any span; from a batch, the field ``spans`` ``[B, L]`` bound by :meth:`for_batch`), and
    without ids, consecutive windows of ``span_size`` rows (per sequence when the logits are ``[B, L, V]`` or
    the objective is bound to a batch; flat rows are windowed from the first row, which stays inside sequences
    when their length is a multiple of ``span_size``). Rows are coupled in pairs, so the chunked path keeps
    whole windows (or, bound to a batch, whole sequences) in a chunk.
    """

    name = "span_correlation"
    batch_fields: ClassVar[tuple[str, ...]] = (SPANS_FIELD,)
    batch_coupled = True

    def __init__(self, span_size: int = 4, temperature: float = 1.0) -> None:
        if isinstance(span_size, bool) or not isinstance(span_size, int) or span_size < 2:
            raise ValueError(f"span_size must be an integer >= 2 (a span pairs adjacent tokens), got {span_size!r}")
        _check("temperature", temperature, temperature > 0, "a number > 0")
        self.span_size = span_size
        self.temperature = float(temperature)
        self.row_group_size = span_size

    def window_ids(self, lead: torch.Size, device: torch.device) -> Tensor:
        """Span ids of consecutive ``span_size`` windows (per sequence for a ``[B, L]`` leading shape)."""
        if len(lead) == 2:
            b, length = int(lead[0]), int(lead[1])
            per_seq = math.ceil(length / self.span_size)
            local = torch.arange(length, device=device) // self.span_size
            return (local.unsqueeze(0) + per_seq * torch.arange(b, device=device).unsqueeze(1)).reshape(-1)
        return torch.arange(math.prod(lead), device=device) // self.span_size

    def for_batch(self, batch: Mapping[str, Tensor]) -> RowBound:
        """This objective bound to a batch's ``spans`` field (``[B, L]``; absent: ``span_size`` windows)."""
        b, length = sequence_rows(batch, SPANS_FIELD)
        device = batch["input_ids"].device
        spans = batch.get(SPANS_FIELD)
        if spans is None:
            ids = self.window_ids(torch.Size((b, length)), device)
        else:
            if spans.shape != (b, length):
                raise ValueError(f"batch field '{SPANS_FIELD}' must be [B, L] = [{b}, {length}] span ids, got "
                                 f"{tuple(spans.shape)}")
            spans = spans.long()
            offset = (int(spans.max()) + 1 if spans.numel() else 1) * torch.arange(b, device=spans.device).unsqueeze(1)
            ids = torch.where(spans >= 0, spans + offset, -1).reshape(-1)
        return RowBound(self, {"span_ids": ids}, group_rows=length, field_names={"span_ids": SPANS_FIELD})

    def per_token(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *,
                  context: Any = None, span_ids: Tensor | None = None) -> Tensor:
        """Per-token loss; ``span_ids``: ``[N]`` span id per row (-1: in no span)."""
        if teacher is None:
            raise ValueError("objective 'span_correlation' needs a teacher")
        logits, teacher, flat_labels, lead = flatten_inputs(student_logits, teacher, labels)
        n = logits.shape[0]
        if span_ids is None:
            ids = self.window_ids(lead, logits.device)
        else:
            ids = span_ids.reshape(-1).to(logits.device)
            if ids.shape[0] != n:
                raise ValueError(f"span_ids has {ids.shape[0]} entries but the logits have {n} rows")
        dtype = compute_dtype(logits, signal_values(teacher))
        zero = torch.zeros((), dtype=dtype, device=logits.device)
        s_logp = student_log_probs(logits, self.temperature, dtype)
        q = s_logp.exp()
        if n < 2:  # no pair: zero, still a function of the logits (the chunked path differentiates every chunk)
            return (q[:, 0] * 0.0).reshape(lead)
        p = teacher_log_probs(teacher, self.temperature, logits.shape[-1], dtype, s_logp.detach()).exp()
        valid = flat_labels != IGNORE_INDEX
        paired = (ids[:-1] == ids[1:]) & (ids[:-1] >= 0) & valid[:-1] & valid[1:]
        pair_loss = (q[:-1] * q[1:] - p[:-1] * p[1:]).square().sum(-1)
        loss = torch.cat([torch.where(paired, pair_loss, zero), zero.expand(1)])
        return loss.reshape(lead)

    def config(self) -> dict:
        return {"name": self.name, "span_size": self.span_size, "temperature": self.temperature}
