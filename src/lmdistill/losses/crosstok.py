"""Cross-tokenizer objectives (vocabulary rungs 3 and 4): the teacher sees the student's text in its own tokens.

The teacher's signal is an :class:`AlignedTeacher`: its logits over its own rows and vocabulary, and the
:class:`~lmdistill.losses.alignment.AlignedBatch` pairing its tokens with the student's by character offsets.
Every objective here returns per-token losses on the student's rows (the project's convention: 0 where the label
is ignored; the trainer's normaliser is the number of valid student tokens) and couples rows within a
sequence, so the chunked path never splits them (``batch_coupled``); :mod:`lmdistill.losses.projection`'s
objective is the exception (``takes_aligned_windows``).

* :class:`SpanKD` (``span_kd``): the probabilities of the tokens inside each aligned span are merged (chain rule)
  into one distribution per span and side, folded onto the common columns of
  :class:`~lmdistill.models.vocab.SharedVocab`; any same-vocabulary objective then applies. Where tokens
  correspond one to one, this is exact KD on the shared vocabulary.
* :class:`ULD` (``uld``): Universal Logit Distillation (Boizard et al., "Towards Cross-Tokenizer Distillation:
  the Universal Logit Distillation Loss for LLMs", arXiv 2402.12030).
* :class:`MinEDKD` (``mined``): FuseLLM's minimum-edit-distance vocabulary mapping (Wan et al., "Knowledge Fusion
  of Large Language Models", arXiv 2401.10491).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.alignment import AlignedBatch
from lmdistill.losses.core import Objective, compute_dtype, kl_from_log_probs
from lmdistill.losses.divergences import ForwardKL
from lmdistill.losses.pairing import ModelPair
from lmdistill.losses.signals import (
    CROSSTOK,
    DENSE,
    SparseTeacher,
    is_sparse,
    log_softmax_at,
    signal_values,
    teacher_log_probs,
)
from lmdistill.models.vocab import SharedVocab, safe_logsumexp

__all__ = [
    "CROSSTOK",
    "AlignedTeacher",
    "segment_logsumexp",
    "span_log_probs",
    "span_edits",
    "SpanKD",
    "sorted_l1",
    "ULD",
    "MinEDKD",
    "mined_log_probs",
]

@dataclass(frozen=True)
class AlignedTeacher:
    """A teacher with its own tokenizer: logits over its rows (``[B * Lt, V_t]``, or ``[B, Lt, V_t]``; a
    :class:`SparseTeacher` from a cache works too), which rows predict a real token (``[B, Lt]``), its real
    vocabulary size (padded output rows beyond it are dropped) and the alignment with the student's tokens."""

    logits: Tensor | SparseTeacher
    alignment: AlignedBatch
    teacher_valid: Tensor
    vocab_size: int | None = None
    #: the student rows ``(start, stop)`` of the flattened batch a chunk of the chunked path covers (None: all)
    window: tuple[int, int] | None = None

    kind = CROSSTOK

    @property
    def student_rows(self) -> int:
        """Rows of the whole student batch the alignment covers (``B * L``)."""
        return self.alignment.batch_size * self.alignment.student_len

    def cut(self, start: int, stop: int) -> "AlignedTeacher":
        """The same teacher for student rows ``start:stop`` only (offsets add up when it is already cut); only
        objectives with ``takes_aligned_windows`` accept it."""
        offset = 0 if self.window is None else self.window[0]
        return replace(self, window=(offset + start, offset + stop))

    def log_probs(self, temperature: float, dtype: torch.dtype, rows: Tensor | None = None, vocab: int | None = None) -> Tensor:
        """Teacher log-probabilities at ``temperature`` over its first ``vocab`` tokens (default ``vocab_size``, else
        every column), of ``rows`` only when given; never with a gradient."""
        vocab = vocab if vocab is not None else self.vocab_size
        with torch.no_grad():
            if is_sparse(self.logits):
                # a cache's top-k over the teacher's own vocabulary: the tail is spread uniformly (no student
                # distribution lives on the teacher's tokens to shape it)
                sparse = self.logits.flatten()
                if rows is not None:
                    sparse = SparseTeacher(sparse.logprobs[rows], sparse.indices[rows],
                                           None if sparse.residual is None else sparse.residual[rows],
                                           sparse.temperature, "uniform", sparse.sampled)
                if vocab is None:
                    raise ValueError("an AlignedTeacher from a sparse cache needs vocab_size (the teacher's real vocabulary)")
                return teacher_log_probs(sparse, temperature, vocab, dtype)
            logits = self.logits.reshape(-1, self.logits.shape[-1])
            if vocab is not None:
                if logits.shape[-1] < vocab:
                    raise ValueError(f"teacher logits have {logits.shape[-1]} columns but its vocabulary has {vocab} tokens")
                logits = logits[:, :vocab]
            if rows is not None:
                logits = logits[rows]
            return log_softmax_at(logits, temperature, dtype)


def _aligned(teacher: Any, name: str, *, windowed: bool = False) -> AlignedTeacher:
    if not isinstance(teacher, AlignedTeacher):
        raise ValueError(f"objective '{name}' needs an AlignedTeacher (a teacher with its own tokenizer and the "
                         f"alignment of the two tokenizations), got {type(teacher).__name__}")
    if teacher.window is not None and not windowed:
        raise ValueError(f"objective '{name}' couples each sequence's rows: it needs the whole batch, not the chunk "
                         f"of student rows {teacher.window}")
    return teacher


def _flat_student(student_logits: Tensor, labels: Tensor | None, alignment: AlignedBatch, name: str,
                  window: tuple[int, int] | None = None):
    lead = student_logits.shape[:-1]
    z = student_logits.reshape(-1, student_logits.shape[-1])
    n = alignment.batch_size * alignment.student_len if window is None else window[1] - window[0]
    if z.shape[0] != n:
        covers = (f"{alignment.batch_size} x {alignment.student_len} student rows" if window is None
                  else f"student rows {window[0]}:{window[1]}")
        raise ValueError(f"'{name}': the alignment covers {covers} but the student logits have {z.shape[0]}")
    flat_labels = torch.zeros(n, dtype=torch.long, device=z.device) if labels is None else labels.reshape(-1)
    return z, flat_labels, lead


def segment_logsumexp(values: Tensor, segment: Tensor, num_segments: int) -> Tensor:
    """``out[g] = log sum_{i: segment[i] = g} exp(values[i])``; -inf (zero gradient) for empty or all -inf segments."""
    top = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, segment, values.detach(), reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=top.dtype, device=top.device))
    total = torch.zeros_like(top).index_add(0, segment, torch.exp(values - shift[segment]))
    dead = total == 0
    out = torch.log(torch.where(dead, torch.ones((), dtype=total.dtype, device=total.device), total)) + shift
    return out.masked_fill(dead, float("-inf"))


def span_log_probs(
    logp: Tensor, rows: Tensor, group: Tensor, targets: Tensor, first: Tensor,
    cover_group: Tensor, cover_ids: Tensor, num_groups: int,
) -> tuple[Tensor, Tensor]:
    """One side's merged distribution at each aligned span: ``(own [G, V], span [G])`` log-probabilities.

    ``logp [N, V]`` are the side's next-token log-probabilities by row; the other arguments are that side's
    fields of an :class:`AlignedBatch`. At a span's first token both models condition on the same text, so the
    side's distribution ``q_1`` there is over "what comes next". With the span's text ``S``, its tokens
    ``x_1..x_k`` (this side's spelling) and ``l_j = log q(x_j | everything before it)``:

    * span, "the next text begins with S": the tokens covering ``S`` (spelling it exactly, or tokens the other
      side lacks that begin with it: the other side would spell those text as ``S`` and more), plus, for
      ``k >= 2``, the path ``exp(sum_j l_j)`` (the chain rule over the span);
    * ``x_1`` (``k >= 2``): ``q_1(x_1) - exp(sum_j l_j) = q_1(x_1) (1 - prod_{j>=2} q(x_j))``: the text starts
      with ``x_1`` and then continues otherwise, computed as ``log q_1(x_1) + log sum_{j>=2} (1 - q(x_j))
      prod_{2<=i<j} q(x_i)`` with each ``1 - q(x_j)`` summed over the other tokens (no cancellation);
    * every other token ``v``: ``q_1(v)``; the covering tokens are 0 (their mass moved to the span).

    The entries sum to one. With one token on this side and nothing the other side lacks, the span entry is
    ``q_1(x_1)`` and ``x_1``'s own entry 0: the plain next-token distribution with one entry renamed. This is TRL's
    GOLD merge ("observed": the first position's distribution times the probabilities of the span's later
    tokens) kept as a normalised distribution: GOLD scales every entry of the first position by that product;
    here only the entry it narrows.
    """
    if num_groups == 0:
        return logp.new_zeros((0, logp.shape[-1])), logp.new_zeros((0,))
    edits, span = span_edits(logp, rows, group, targets, first, cover_group, cover_ids, num_groups)
    merged = logp.index_select(0, first)
    for at, ids, values in edits:
        merged.index_put_((at, ids), values)
    return merged, span


def span_edits(
    logp: Tensor, rows: Tensor, group: Tensor, targets: Tensor, first: Tensor,
    cover_group: Tensor, cover_ids: Tensor, num_groups: int,
) -> tuple[list[tuple[Tensor, Tensor, Tensor]], Tensor]:
    """What :func:`span_log_probs` changes in the first rows ``logp[first]``, as ``(edits, span)``: ``edits`` are
    ``(group, token id, new log-prob)`` triples to apply in order (:meth:`FoldPlan.apply` folds with them without
    copying the rows), ``span [G]`` the span's log-probability."""
    width = logp.shape[-1]
    sizes = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes  # tokens are group-contiguous, groups in order
    # every scalar this needs from logp in one gather (each gather path costs a [N, V] buffer in the backward)
    flat = logp.reshape(-1)
    picked = flat.take(torch.cat([rows * width + targets, first[cover_group] * width + cover_ids]))
    own, cover_logp = picked[: rows.numel()], picked[rows.numel():]
    later = torch.ones_like(own, dtype=torch.bool)
    later[starts] = False
    zero = torch.zeros((), dtype=own.dtype, device=own.device)
    neg_inf = torch.full((), float("-inf"), dtype=own.dtype, device=own.device)
    own_later = torch.where(later, own, zero)
    rest = torch.zeros(num_groups, dtype=own.dtype, device=own.device).index_add(0, group, own_later)
    # prefix products of the later tokens within each group, exclusive, summed in float64 (long batches)
    csum = torch.cumsum(own_later.double(), 0)
    before = (csum - own_later.double() - csum[starts][group]).to(own.dtype)
    # 1 - q(x_j) for the later tokens only, summed over the other tokens of their rows
    later_at = later.nonzero(as_tuple=True)[0]
    complement = safe_logsumexp(logp[rows[later_at]].scatter(1, targets[later_at].unsqueeze(1), float("-inf")))
    log_diverge = segment_logsumexp(complement + before[later_at], group[later_at], num_groups)  # -inf: one token
    own_first = own[starts]
    path = torch.where(sizes > 1, own_first + rest, neg_inf)
    covered = segment_logsumexp(cover_logp, cover_group, num_groups)
    span = safe_logsumexp(torch.stack([path, covered], dim=-1))
    groups = torch.arange(num_groups, device=group.device)
    edits = [(groups, targets[starts], own_first + log_diverge), (cover_group, cover_ids, neg_inf.expand(cover_ids.shape))]
    return edits, span


class SpanKD(Objective):
    """Span-aligned KD: merge each side's probabilities within the aligned spans (:func:`span_log_probs`), fold
    them onto the common columns (span first, then the shared tokens) and apply ``inner``, any same-vocabulary
    objective (default forward KL), with the span's column as the label (so ``cross_entropy`` inside is the
    student's negative log-likelihood of the span's text).

    Alignment by character offsets and the chain-rule merge follow TRL's GOLD trainer (``ULDLoss`` with
    ``use_extended_uld``, "observed" merge; read in trl 1.16's ``experimental/gold/gold_trainer.py``), which then
    sorts the merged vectors as ULD does; here they are compared token by token on the shared vocabulary
    instead, so one-to-one spans get exact KD. The temperature divides both models' logits before merging.
    Each span's loss sits on the student row predicting its first token. Folding leaves the split of the student's
    mass among its tokens inside one column untaught, so use it beside ``cross_entropy`` in a mix (alone, a
    student in ``bench/distil_pairs.py`` ended far worse than label-only).
    """

    name = "span_kd"
    accepted_signals = frozenset({CROSSTOK})
    batch_coupled = True
    nested_objectives: ClassVar[tuple[str, ...]] = ("inner",)  # the registry builds it from its spec
    bound_params: ClassVar[tuple[str, ...]] = ("vocab",)  # from the run's tokenizers, not from a config

    def __init__(self, vocab: SharedVocab | None = None, inner: Objective | None = None, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"span_kd: temperature must be > 0, got {temperature!r}")
        inner = inner if inner is not None else ForwardKL()
        if getattr(inner, "temperature", 1.0) != 1.0:
            raise ValueError("span_kd: set the temperature on span_kd itself; its inner objective must use 1.0 "
                             f"(it sees merged log-probabilities), got {inner.temperature}")
        if inner.requires_teacher and DENSE not in inner.accepted_signals:
            raise ValueError(f"span_kd: the inner objective '{inner.name}' does not accept dense distributions")
        self.vocab = vocab
        self.inner = inner
        self.temperature = float(temperature)

    def bind_models(self, pair: ModelPair) -> None:
        if self.vocab is None:
            self.vocab = pair.shared()

    def _shared(self) -> SharedVocab:
        if self.vocab is None:
            raise ValueError("span_kd has no vocabulary pairing: bind the run's models first (bind_models)")
        return self.vocab

    def categories(self, student_logits: Tensor, teacher: AlignedTeacher) -> tuple[Tensor, Tensor]:
        """Student and teacher log-probabilities on the common columns, one row per aligned span ``[G, C]``."""
        a = teacher.alignment
        vocab = self._shared()
        z = student_logits.reshape(-1, student_logits.shape[-1])
        dtype = compute_dtype(z, signal_values(teacher.logits))
        s_logp = log_softmax_at(z[:, : vocab.student.size], self.temperature, dtype)
        t_logp = teacher.log_probs(self.temperature, dtype, vocab=vocab.teacher.size)
        g = a.num_groups
        if g == 0:
            empty = s_logp.new_zeros((0, vocab.num_columns + 1))
            return empty, empty
        s_edits, s_span = span_edits(s_logp, a.s_rows, a.s_group, a.s_targets, a.s_first, a.s_cover_group, a.s_cover_ids, g)
        with torch.no_grad():
            t_edits, t_span = span_edits(t_logp, a.t_rows, a.t_group, a.t_targets, a.t_first, a.t_cover_group, a.t_cover_ids, g)
            teacher_cats = vocab.project(t_logp, "teacher", extra=t_span, rows=a.t_first, edits=t_edits)
        return vocab.project(s_logp, "student", extra=s_span, rows=a.s_first, edits=s_edits), teacher_cats

    def group_losses(self, student_logits: Tensor, teacher: Any, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per aligned span: the loss ``[G]`` and whether it counts ``[G]`` (every student token of it has a label)."""
        teacher = _aligned(teacher, self.name)
        a = teacher.alignment.to(student_logits.device)
        teacher = AlignedTeacher(teacher.logits, a, teacher.teacher_valid, teacher.vocab_size)
        z, flat_labels, _ = _flat_student(student_logits, labels, a, self.name)
        if labels is not None:
            got = flat_labels[a.s_rows]
            wrong = (got != IGNORE_INDEX) & (got != a.s_targets)
            if bool(wrong.any()):
                raise ValueError("span_kd: the alignment was built from other student tokens than these labels "
                                 f"(first at row {int(a.s_rows[wrong][0])}); build it from this batch's tokens")
        missing = (flat_labels[a.s_rows] == IGNORE_INDEX).to(torch.long)
        valid = torch.zeros(a.num_groups, dtype=torch.long, device=z.device).index_add(0, a.s_group, missing) == 0
        s_cat, t_cat = self.categories(z, teacher)
        cat_labels = torch.where(valid, torch.zeros_like(a.s_first), torch.full_like(a.s_first, IGNORE_INDEX))
        loss = self.inner.per_token(s_cat, t_cat, cat_labels)
        return loss, valid

    def per_token(self, student_logits: Tensor, teacher: Any, labels: Tensor | None, *, context: Any = None) -> Tensor:
        loss, valid = self.group_losses(student_logits, teacher, labels)
        a = teacher.alignment
        z = student_logits.reshape(-1, student_logits.shape[-1])
        out = torch.zeros(z.shape[0], dtype=loss.dtype, device=z.device)
        out = out.index_put((a.s_first.to(z.device),), torch.where(valid, loss, torch.zeros_like(loss)))
        return out.reshape(student_logits.shape[:-1])

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state.get("inner", {}))

    def on_step_end(self, loss: float, step: int, total_steps: int) -> None:
        self.inner.on_step_end(loss, step, total_steps)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.inner.parameters()

    def config(self) -> dict:
        return {"name": self.name, "temperature": self.temperature, "inner": self.inner.config()}


def sorted_l1(p_student: Tensor, p_teacher: Tensor) -> Tensor:
    """ULD's distance: ``sum_i |p_s[sigma_s(i)] - p_t[sigma_t(i)]|`` between both probability vectors sorted in
    decreasing order, the shorter one padded with zeros (row-wise)."""
    s = torch.sort(p_student, dim=-1, descending=True).values
    t = torch.sort(p_teacher, dim=-1, descending=True).values
    k = min(s.shape[-1], t.shape[-1])
    return (s[..., :k] - t[..., :k]).abs().sum(-1) + s[..., k:].sum(-1) + t[..., k:].sum(-1)


class ULD(Objective):
    """Universal Logit Distillation (Boizard et al., arXiv 2402.12030), the distillation term.

    The paper's loss is ``L_CE + lambda * sum_t W1(p_S(.|x<t), p_T(.|x<t))`` with, for uniform support and cost,
    the closed form ``W1 = sum_i |p_S(sigma_S(i)) - p_T(sigma_T(i))|`` (:func:`sorted_l1`), each model at its own
    temperature. Positions are aligned by rank as the paper defines it: the k-th student prediction with the
    k-th teacher prediction of the same sequence, up to the shorter of the two (its reference code,
    Nicolas-BZRD/llm-recipes ``DistillationLoss``). Combine with ``cross_entropy`` in a ``mix`` for the CE term.
    The reference averages over positions then sequences; here the per-token values go through the project's
    one reduction (sum over valid student tokens / their count).
    """

    name = "uld"
    accepted_signals = frozenset({CROSSTOK})
    batch_coupled = True

    def __init__(self, student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> None:
        for label, value in (("student_temperature", student_temperature), ("teacher_temperature", teacher_temperature)):
            if not value > 0:
                raise ValueError(f"uld: {label} must be > 0, got {value!r}")
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)

    def per_token(self, student_logits: Tensor, teacher: Any, labels: Tensor | None, *, context: Any = None) -> Tensor:
        teacher = _aligned(teacher, self.name)
        a = teacher.alignment
        z, flat_labels, lead = _flat_student(student_logits, labels, a, self.name)
        B, L, Lt = a.batch_size, a.student_len, a.teacher_len
        s_valid = (flat_labels != IGNORE_INDEX).reshape(B, L)
        t_valid = teacher.teacher_valid.to(z.device).reshape(B, Lt).bool()
        s_rank = torch.cumsum(s_valid.long(), 1) - 1
        t_rank = torch.cumsum(t_valid.long(), 1) - 1
        # table[b, k] = flat teacher row of sequence b's k-th valid prediction
        table = torch.full((B, Lt), -1, dtype=torch.long, device=z.device)
        flat_rows = torch.arange(B * Lt, device=z.device).reshape(B, Lt)
        table[t_valid.nonzero(as_tuple=True)[0], t_rank[t_valid]] = flat_rows[t_valid]
        paired = s_valid & (s_rank < t_valid.sum(1, keepdim=True))
        t_row = table.gather(1, s_rank.clamp(min=0, max=Lt - 1)).reshape(-1)
        rows = paired.reshape(-1).nonzero(as_tuple=True)[0]
        dtype = compute_dtype(z, signal_values(teacher.logits))
        p_s = torch.softmax(z[rows].to(dtype) / self.student_temperature, dim=-1)
        p_t = teacher.log_probs(self.teacher_temperature, dtype, rows=t_row[rows]).exp()
        out = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
        return out.index_put((rows,), sorted_l1(p_s, p_t)).reshape(lead)

    def config(self) -> dict:
        return {"name": self.name, "student_temperature": self.student_temperature,
                "teacher_temperature": self.teacher_temperature}


def mined_log_probs(t_logp: Tensor, teacher_to_student: Tensor, student_vocab: int) -> Tensor:
    """A teacher distribution ``[M, V_t]`` carried to the student's vocabulary through a MinED map ``[V_t]``:
    ``p_s(v) = sum_{u -> v} p_t(u)``, teacher ids mapped to -1 dropped and the rest renormalised."""
    if t_logp.shape[-1] != teacher_to_student.numel():
        raise ValueError(f"the teacher distribution has {t_logp.shape[-1]} tokens but the MinED map covers "
                         f"{teacher_to_student.numel()}: slice the teacher's logits to its real vocabulary")
    kept = (teacher_to_student >= 0).nonzero(as_tuple=True)[0].to(t_logp.device)
    target = teacher_to_student.to(t_logp.device)[kept]
    p = torch.zeros(t_logp.shape[0], student_vocab, dtype=t_logp.dtype, device=t_logp.device)
    p.index_add_(1, target, t_logp[:, kept].exp())
    return torch.log(p / p.sum(-1, keepdim=True))


class MinEDKD(Objective):
    """FuseLLM's cross-tokenizer target (Wan et al., "Knowledge Fusion of Large Language Models", arXiv 2401.10491).

    Tokens are aligned one to one (FuseLLM aligns the two token sequences by dynamic programming on edit distance;
    here by character offsets, which is exact for one text); at a one-to-one position the teacher's distribution
    is carried to the student's vocabulary by the minimum-edit-distance map
    (:func:`lmdistill.losses.alignment.min_edit_distance_map`), and the loss is ``KL(p_mapped || q)``. Where no
    one-to-one alignment exists the target is one-hot on the gold token (FuseLLM's rule; the loss is then the
    cross-entropy), or nothing with ``unaligned="skip"``. FuseLLM keeps the first of several teacher tokens mapped
    to one student token among the teacher's top 10; here all of them add up over the full distribution (or a
    cache's top-k completed uniformly), so the target stays a distribution.
    """

    name = "mined"
    accepted_signals = frozenset({CROSSTOK})
    batch_coupled = True
    bound_params: ClassVar[tuple[str, ...]] = ("teacher_to_student", "student_vocab")  # from the run's tokenizers

    def __init__(self, teacher_to_student: Tensor | None = None, student_vocab: int | None = None,
                 temperature: float = 1.0, unaligned: str = "label") -> None:
        if unaligned not in ("label", "skip"):
            raise ValueError(f"mined: unaligned must be 'label' or 'skip', got {unaligned!r}")
        if not temperature > 0:
            raise ValueError(f"mined: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.unaligned = unaligned
        self.teacher_to_student: Tensor | None = None
        self.student_vocab: int | None = None
        if teacher_to_student is not None:
            self._set_map(teacher_to_student, student_vocab)

    def _set_map(self, teacher_to_student: Tensor, student_vocab: int | None) -> None:
        if student_vocab is None or teacher_to_student.dim() != 1 or int(teacher_to_student.max()) >= student_vocab:
            raise ValueError(f"mined: the map must be [V_teacher] student ids below student_vocab ({student_vocab})")
        self.teacher_to_student = teacher_to_student.long()
        self.student_vocab = int(student_vocab)

    def bind_models(self, pair: ModelPair) -> None:
        if self.teacher_to_student is None:
            self._set_map(pair.mined_map(), pair.student_vocab)

    def per_token(self, student_logits: Tensor, teacher: Any, labels: Tensor | None, *, context: Any = None) -> Tensor:
        teacher = _aligned(teacher, self.name)
        if self.teacher_to_student is None or self.student_vocab is None:
            raise ValueError("mined has no vocabulary map: bind the run's models first (bind_models)")
        a = teacher.alignment.to(student_logits.device)
        z, flat_labels, lead = _flat_student(student_logits, labels, a, self.name)
        dtype = compute_dtype(z, signal_values(teacher.logits))
        s_logp = log_softmax_at(z[:, : self.student_vocab], self.temperature, dtype)
        out = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
        if self.unaligned == "label":
            gold = flat_labels.clamp(min=0)
            out = -s_logp.gather(1, gold.unsqueeze(1)).squeeze(1)
        rows = a.s_first[a.one_to_one]
        if rows.numel():
            t_logp = teacher.log_probs(self.temperature, dtype, rows=a.t_first[a.one_to_one],
                                       vocab=self.teacher_to_student.numel())
            target = mined_log_probs(t_logp, self.teacher_to_student, self.student_vocab)
            out = out.index_put((rows,), kl_from_log_probs(target, s_logp[rows]))
        out = torch.where(flat_labels != IGNORE_INDEX, out, torch.zeros((), dtype=dtype, device=z.device))
        return out.reshape(lead)

    def config(self) -> dict:
        return {"name": self.name, "temperature": self.temperature, "unaligned": self.unaligned}
