"""The teacher's next-token distribution carried onto the student's tokens through their spellings (rungs 3-4).

Every teacher token ``u`` is a string; the student's tokenizer spells that string as student tokens
``sigma(u) = (v_1, .., v_n)`` (:func:`student_spellings`). Where the student's next token starts at a teacher token
boundary, both models condition on the same text, and "the student's next token is ``v``" is (up to the tokenizers'
context effects) the event "the teacher's next token is one whose spelling starts with ``v``":

    p(v) = sum_{u: sigma(u)_1 = v} p_T(u).

Inside a single teacher token, after the student has already emitted ``v_1..v_j`` of it, the same event is
conditioned on the prefix: ``p(v) ∝ sum_{u: sigma(u)_{1..j} = v_{1..j}, sigma(u)_{j+1} = v} p_T(u)`` (teacher
tokens whose spelling ends at the prefix are dropped: what follows them would need another teacher step). This is
the one-token-lookahead form of converting a tokenized model's distribution to another segmentation (Phan et al.,
"Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles",
arXiv 2410.09303, which marginalises over all tokenizations exactly; here only the teacher's next token is
marginalised and the student's in-context spelling is assumed to be its spelling of each token alone).

Unlike span folding (:class:`~lmdistill.losses.crosstok.SpanKD`), the target is a distribution over the student's
whole vocabulary on the student's own rows, so a same-vocabulary objective (forward KL) applies to every student
row it covers, including the later rows of a word the student splits and the teacher does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.alignment import AlignedBatch, encode_spans
from lmdistill.losses.core import Objective, Workspace, compute_dtype, fast_exp, finish_chunk
from lmdistill.losses.crosstok import AlignedTeacher, _aligned, _flat_student
from lmdistill.losses.pairing import ModelPair
from lmdistill.losses.signals import CROSSTOK, log_softmax_at, signal_values
from lmdistill.models.vocab import gpt2_byte_alphabet, token_keys

__all__ = ["student_spellings", "ProjectionRows", "projection_rows", "SpelledColumns", "projected_targets",
           "projected_log_probs", "projected_kl", "ProjectedKD"]


def _spell_text(key: bytes, student_tokenizer: Any, s_keys: list, byte_level: bool, inverse: dict[int, str]) -> list[int] | None:
    """The student's ids spelling exactly the bytes ``key``, or None when its tokenizer cannot spell them alone."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text:
        spans = encode_spans(student_tokenizer, text, keys=s_keys)
        ids = list(spans.ids)
        if ids and b"".join(s_keys[i] if isinstance(s_keys[i], bytes) else b"\0" for i in ids) == key:
            return ids
    if byte_level:  # a piece of a multi-byte character (or text the pre-tokenizer splits oddly): the BPE alone
        model = student_tokenizer.backend_tokenizer.model
        ids = [student_tokenizer.convert_tokens_to_ids(t.value) for t in model.tokenize("".join(inverse[b] for b in key))]
        if ids and all(isinstance(i, int) and 0 <= i < len(s_keys) for i in ids):
            if b"".join(s_keys[i] if isinstance(s_keys[i], bytes) else b"\0" for i in ids) == key:
                return ids
    return None


def student_spellings(teacher_tokenizer: Any, student_tokenizer: Any, max_depth: int = 8) -> Tensor:
    """``[V_t, max_depth]`` student ids spelling each teacher token (``-1`` padded; a row of ``-1`` when the
    student cannot spell it, or it needs more than ``max_depth`` tokens). Special tokens map by role (the
    teacher's eos to the student's eos)."""
    t_keys = token_keys(teacher_tokenizer)
    s_keys = token_keys(student_tokenizer)
    s_special = {k: i for i, k in enumerate(s_keys) if isinstance(k, tuple)}
    byte_level = hasattr(student_tokenizer, "backend_tokenizer") and "ByteLevel" in str(
        student_tokenizer.backend_tokenizer.pre_tokenizer.__getstate__() if student_tokenizer.backend_tokenizer.pre_tokenizer else "")
    inverse = {b: ch for ch, b in gpt2_byte_alphabet().items()}
    out = torch.full((len(t_keys), max_depth), -1, dtype=torch.long)
    for tid, key in enumerate(t_keys):
        if key is None:
            continue
        if isinstance(key, tuple):
            sid = s_special.get(key)
            if sid is not None:
                out[tid, 0] = sid
            continue
        ids = _spell_text(key, student_tokenizer, s_keys, byte_level, inverse)
        if ids is not None and len(ids) <= max_depth:
            out[tid, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


@dataclass(frozen=True)
class ProjectionRows:
    """The student rows a projected target exists for: ``student_rows [R]`` (flat label rows), the teacher row
    whose distribution feeds each ``teacher_rows [R]``, how many student tokens of the teacher's token are already
    emitted ``depth [R]`` and those tokens ``prefix [R, D]`` (``-1`` padded)."""

    student_rows: Tensor
    teacher_rows: Tensor
    depth: Tensor
    prefix: Tensor


def projection_rows(a: AlignedBatch, max_depth: int) -> ProjectionRows:
    """Rows of an :class:`AlignedBatch` with a projected target: every group's first student row, and the later
    student rows of groups holding a single teacher token (the student splits a token the teacher does not), up to
    ``max_depth`` tokens into it."""
    device = a.s_rows.device
    g = a.num_groups
    s_sizes = torch.bincount(a.s_group, minlength=g)
    t_sizes = torch.bincount(a.t_group, minlength=g)
    starts = torch.cumsum(s_sizes, 0) - s_sizes
    depth = torch.arange(a.s_rows.numel(), device=device) - starts[a.s_group]
    keep = (depth == 0) | ((t_sizes[a.s_group] == 1) & (depth < max_depth))
    idx = keep.nonzero(as_tuple=True)[0]
    depth = depth[idx]
    # prefix[r, j] = the j-th student token of the row's group, for j < depth
    cols = torch.arange(max_depth, device=device)
    src = starts[a.s_group[idx]].unsqueeze(1) + cols.unsqueeze(0)
    prefix = a.s_targets[src.clamp(max=a.s_targets.numel() - 1)]
    prefix = torch.where(cols.unsqueeze(0) < depth.unsqueeze(1), prefix, torch.full_like(prefix, -1))
    return ProjectionRows(a.s_rows[idx], a.t_first[a.s_group[idx]], depth, prefix)


@dataclass(frozen=True)
class SpelledColumns:
    """The student ids some teacher token's spelling uses, ``used [C]``, and each student id's column among them,
    ``lookup [V_s + 1]`` (``C`` for the other ids and for the entry ``V_s``, which stands for "no token"). Targets
    live on these ``C`` columns: a teacher of ``V_t`` tokens reaches at most ``V_t * depth`` student ids, often far
    fewer than the student's vocabulary (151k for Qwen's), so no ``[rows, V_s]`` target is ever built."""

    used: Tensor
    lookup: Tensor

    @classmethod
    def of(cls, spellings: Tensor, student_vocab: int) -> "SpelledColumns":
        used = torch.unique(spellings[spellings >= 0])
        lookup = torch.full((student_vocab + 1,), used.numel(), dtype=torch.long, device=spellings.device)
        lookup[used] = torch.arange(used.numel(), device=spellings.device)
        return cls(used, lookup)

    def to(self, device: torch.device) -> "SpelledColumns":
        return self if self.used.device == device else SpelledColumns(self.used.to(device), self.lookup.to(device))


def projected_targets(t_logp: Tensor, spellings: Tensor, depth: Tensor, prefix: Tensor, columns: SpelledColumns
                      ) -> tuple[Tensor, Tensor]:
    """The target of each row (module docstring) on the spelled columns, ``[R, C]`` probabilities, and which rows
    keep any teacher mass ``[R]`` (the others: all 0). ``t_logp [R, V_t]`` is the teacher's next-token distribution
    for each row; a row at ``depth`` j conditions on teacher tokens whose spelling starts with its ``prefix`` and
    continues."""
    r, width = t_logp.shape
    if spellings.shape[0] != width:
        raise ValueError(f"the teacher distribution has {width} tokens but the spellings cover {spellings.shape[0]}")
    device = t_logp.device
    spellings, columns = spellings.to(device), columns.to(device)
    none, c = columns.lookup.numel() - 1, columns.used.numel()
    p = t_logp.exp()
    merged = torch.zeros(r, c + 1, dtype=t_logp.dtype, device=device)  # the last column collects what is dropped
    top = depth == 0
    if bool(top.any()):  # a teacher token boundary: one column per teacher token, the same for every row
        first = columns.lookup[torch.where(spellings[:, 0] >= 0, spellings[:, 0], none)]
        if bool(top.all()):
            merged.index_add_(1, first, p)
        else:
            merged[top] = merged[top].index_add_(1, first, p[top])
    deep = (~top).nonzero(as_tuple=True)[0]
    if deep.numel():  # inside a teacher token: the tokens whose spelling starts with the row's prefix
        d, pre = depth[deep], prefix[deep]
        max_depth = spellings.shape[1]
        match = torch.ones(deep.numel(), width, dtype=torch.bool, device=device)
        for j in range(int(d.max())):
            match &= ~(d > j).unsqueeze(1) | (spellings[:, j].unsqueeze(0) == pre[:, j].unsqueeze(1))
        nxt = spellings[:, d.clamp(max=max_depth - 1)].T  # [rows, V_t]: the spelling's next student token
        match &= (d.unsqueeze(1) < max_depth) & (nxt >= 0)
        cols = columns.lookup[torch.where(match, nxt, none)]
        merged[deep] = merged[deep].scatter_add_(1, cols, p[deep])
    target = merged[:, :c]
    mass = target.sum(-1, keepdim=True)
    has = mass.squeeze(1) > 0
    return target / torch.where(mass > 0, mass, torch.ones_like(mass)), has


def projected_log_probs(
    t_logp: Tensor, spellings: Tensor, depth: Tensor, prefix: Tensor, student_vocab: int
) -> tuple[Tensor, Tensor]:
    """The targets of :func:`projected_targets` as log-probabilities over the whole student vocabulary ``[R, V_s]``
    and which rows have one ``[R]`` (rows whose conditioning keeps no mass: all ``-inf``)."""
    columns = SpelledColumns.of(spellings.to(t_logp.device), student_vocab)
    target, has = projected_targets(t_logp, spellings, depth, prefix, columns)
    dense = torch.zeros(t_logp.shape[0], student_vocab, dtype=t_logp.dtype, device=t_logp.device)
    dense[:, columns.used] = target
    return dense.log(), has


def projected_kl(target: Tensor, s_logp: Tensor, used: Tensor) -> Tensor:
    """``KL(target || q)`` per row ``[R]``: ``target [R, C]`` on the student ids ``used [C]``, the student's
    log-probabilities ``s_logp [R, V_s]`` (read at those ids only); ``0 log 0 = 0``."""
    log_q = s_logp.index_select(1, used)
    zero = torch.zeros((), dtype=log_q.dtype, device=log_q.device)
    return torch.where(target > 0, target * (torch.log(torch.where(target > 0, target, 1.0)) - log_q), zero).sum(-1)


class ProjectedKD(Objective):
    """Forward KL on the student's own vocabulary, ``KL(p_proj || q)``, with the teacher's distribution projected
    through the student's spelling of each teacher token (module docstring; the idea after Phan et al.,
    arXiv 2410.09303, in its one-step form), both models at ``temperature``.

    Covered rows: every aligned group's first student row, and the later student rows of a teacher token the
    student splits. Rows without a target (inside a group the teacher splits too, or whose conditioning keeps no
    teacher mass) get 0: pair it with ``cross_entropy`` in a ``mix``. ``last_coverage`` is the share of the last
    call's valid student rows that had a target (one chunk's on the chunked path, which runs it chunk by chunk:
    the student's full-vocabulary softmax is the cost at large student vocabularies).
    """

    name = "projected_kd"
    accepted_signals = frozenset({CROSSTOK})
    # each student row's target depends on teacher rows only, so the chunked path may cut the student's rows
    takes_aligned_windows = True
    bound_params: ClassVar[tuple[str, ...]] = ("spellings", "student_vocab")  # from the run's tokenizers
    rows_per_chunk: ClassVar[int] = 256

    def __init__(self, spellings: Tensor | None = None, student_vocab: int | None = None, temperature: float = 1.0,
                 max_depth: int = 8) -> None:
        if not temperature > 0:
            raise ValueError(f"projected_kd: temperature must be > 0, got {temperature!r}")
        if int(max_depth) < 1:
            raise ValueError(f"projected_kd: max_depth must be >= 1, got {max_depth!r}")
        self.temperature = float(temperature)
        self.max_depth = int(max_depth)
        self.spellings = spellings
        self.student_vocab = student_vocab
        self.last_coverage: float | None = None  # share of valid student rows with a target, last batch
        self._spelled: tuple[Tensor, SpelledColumns] | None = None  # (spellings, their columns)
        self._rows: tuple[AlignedBatch, ProjectionRows] | None = None  # (alignment, its projection rows)

    def bind_models(self, pair: ModelPair) -> None:
        if self.spellings is None:
            self.spellings = student_spellings(pair.teacher_tokenizer, pair.student_tokenizer, self.max_depth)
            self.student_vocab = pair.student_vocab

    def _columns(self, device: torch.device) -> SpelledColumns:
        """The spelled columns of the bound spellings (computed once per spellings tensor), on ``device``."""
        if self.spellings is None or self.student_vocab is None:
            raise ValueError("projected_kd has no spellings: bind the run's models first (bind_models)")
        if self._spelled is None or self._spelled[0] is not self.spellings:
            self._spelled = (self.spellings, SpelledColumns.of(self.spellings, self.student_vocab))
        return self._spelled[1].to(device)

    def _row_targets(self, teacher: AlignedTeacher, flat_labels: Tensor, dtype: torch.dtype, device: torch.device
                     ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(student rows, their targets [rows, C])`` for the valid student rows with a target, a few hundred rows at
        a time (the teacher-side ``[rows, V_t]`` buffers stay bounded); rows count from the window's start."""
        columns = self._columns(device)
        # the chunked path asks once per chunk with the same alignment: its rows are computed once
        if self._rows is None or self._rows[0] is not teacher.alignment:
            self._rows = (teacher.alignment, projection_rows(teacher.alignment.to(device), self.spellings.shape[1]))
        rows = self._rows[1]
        if teacher.window is not None:  # a chunk of the chunked path: its student rows only, numbered from 0
            start, stop = teacher.window
            inside = (rows.student_rows >= start) & (rows.student_rows < stop)
            rows = ProjectionRows(rows.student_rows[inside] - start, rows.teacher_rows[inside], rows.depth[inside],
                                  rows.prefix[inside])
        for at in range(0, rows.student_rows.numel(), self.rows_per_chunk):
            part = slice(at, at + self.rows_per_chunk)
            t_logp = teacher.log_probs(self.temperature, dtype, rows=rows.teacher_rows[part], vocab=self.spellings.shape[0])
            target, has = projected_targets(t_logp, self.spellings, rows.depth[part], rows.prefix[part], columns)
            keep = has & (flat_labels[rows.student_rows[part]] != IGNORE_INDEX)
            yield rows.student_rows[part][keep], target[keep]

    def _note_coverage(self, covered: int, flat_labels: Tensor) -> None:
        valid = int((flat_labels != IGNORE_INDEX).sum())
        self.last_coverage = covered / valid if valid else None

    def per_token(self, student_logits: Tensor, teacher: Any, labels: Tensor | None, *, context: Any = None) -> Tensor:
        teacher = _aligned(teacher, self.name, windowed=True)
        z, flat_labels, lead = _flat_student(student_logits, labels, teacher.alignment, self.name, teacher.window)
        dtype = compute_dtype(z, signal_values(teacher.logits))
        out = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
        covered = 0
        used = self._columns(z.device).used
        for s_rows, target in self._row_targets(teacher, flat_labels, dtype, z.device):
            s_logp = log_softmax_at(z[s_rows, : self.student_vocab], self.temperature, dtype)
            out = out.index_put((s_rows,), projected_kl(target, s_logp, used))
            covered += s_rows.numel()
        self._note_coverage(covered, flat_labels)
        return out.reshape(lead)

    def chunk_value_and_grad(self, z: Tensor, teacher: Any, labels: Tensor, ws: Workspace, context: Any = None
                             ) -> tuple[Tensor, Tensor]:
        """The chunked path's kernel: ``d KL(t || softmax(z / T)) / dz = (softmax(z / T) - t) / T``, the target ``t``
        subtracted on its spelled columns only (one dense softmax per chunk, like the label loss)."""
        teacher = _aligned(teacher, self.name, windowed=True)
        if z.shape[1] != self.student_vocab:
            raise ValueError(f"projected_kd: the chunk has {z.shape[1]} logits per row but the student's vocabulary "
                             f"has {self.student_vocab} tokens")
        n = z.shape[0]
        used = self._columns(z.device).used
        s_logp = ws.student_logp(z, self.temperature)
        grad = fast_exp(s_logp, ws.buf("tmp"))
        target = torch.zeros(n, used.numel(), dtype=ws.dtype, device=z.device)  # rows without a target stay 0
        covered = torch.zeros(n, dtype=torch.bool, device=z.device)
        for s_rows, rows_target in self._row_targets(teacher, labels, ws.dtype, z.device):
            target[s_rows], covered[s_rows] = rows_target, True
        loss = projected_kl(target, s_logp, used)
        grad[~covered] = 0.0  # rows without a target: no loss, no gradient
        grad.index_add_(1, used, target, alpha=-1.0)
        if self.temperature != 1.0:
            grad.div_(self.temperature)
        self._note_coverage(int(covered.sum()), labels)
        return finish_chunk(loss, grad, labels, 1.0)

    def config(self) -> dict:
        return {"name": self.name, "temperature": self.temperature, "max_depth": self.max_depth}
