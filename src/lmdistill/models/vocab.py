"""Teacher/student vocabularies: the four-rung ladder, chosen automatically (or forced) and described at start.

1. ``identical``: one token-to-id map, output layers of the same size. Logits compare column by column.
2. ``padded``: one token-to-id map, output layers padded to different sizes (e.g. 151936 vs 152064 rows in one
   model family): not a mismatch; both logits are sliced to the tokenizer's real tokens, so padding rows can
   never take probability mass (:class:`VocabAlignment`).
3. ``partial``: different maps that share many token strings (same family, extended or retrained
   vocabulary). Token strings are normalised to the bytes they stand for (byte-level ``Ġ``, SentencePiece
   ``▁`` and ``<0xNN>`` byte-fallback markers; special tokens by role: eos, bos, pad, unk), shared strings are
   paired (teacher id -> student id), and each side's distribution is folded onto the shared tokens, the rest
   into one bucket or into the column of its longest shared prefix (:meth:`SharedVocab.project_to_shared`);
   any same-vocabulary divergence then applies. Positions are paired by the character-offset alignment of
   :mod:`lmdistill.losses.alignment`.
4. ``different``: little is shared; cross-tokenizer objectives (:mod:`lmdistill.losses.crosstok`: span
   alignment, ULD, MinED) work from the text alignment.

:func:`vocab_ladder` picks the rung (``auto``) or checks a forced one, and returns an object whose ``reason``
says which rung applies and why; a pairing a method cannot handle is refused by :func:`require_rung` with the
differing tokens named. Teacher logits are never indexed by student ids: each side is projected with its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lmdistill.data.tiktoken_convert import byte_to_char
from lmdistill.errors import ConfigError

log = logging.getLogger(__name__)

RUNGS = ("identical", "padded", "partial", "different")
RUNG_NUMBER = {name: i + 1 for i, name in enumerate(RUNGS)}
SAME_MAP_RUNGS = frozenset({"identical", "padded"})
DEFAULT_MIN_SHARED_FRACTION = 0.5

CROSS_TOKENIZER_HINT = (
    "Same-vocabulary objectives need one token-to-id map (or a partly shared one, rung 3); across tokenizers use a "
    "cross-tokenizer objective (objective: projected_kd, span_kd, uld or mined, alone or in a mix with cross_entropy), distil on "
    "teacher-generated text (sequence-level KD: `lmdistill generate`, then a run with regime: {kind: sequence_kd}), "
    "or give the student the teacher's tokenizer (tokenizer.path)"
)

# A token's normalised identity: the bytes of text it stands for, or ("special", role-or-content).
TokenKey = Union[bytes, tuple]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class VocabAlignment:
    """Rungs 1 and 2: one token-to-id map; how to compare a student's and a teacher's logits column by column."""

    real_vocab_size: int  # tokens that exist in the (shared) tokenizer
    student_rows: int
    teacher_rows: int
    rung: str = "identical"
    reason: str = ""

    def slice(self, logits: torch.Tensor) -> torch.Tensor:
        """Keep the real tokens only; padded rows beyond them are dropped (their mass would be fake)."""
        return logits[..., : self.real_vocab_size]


def gpt2_byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins (GPT-2's table, :func:`lmdistill.data.tiktoken_convert.byte_to_char`)
    read backwards: character -> the byte it encodes."""
    return {ch: b for b, ch in byte_to_char().items()}


def _component_types(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """Types named anywhere in the backend's decoder and pre-tokenizer ("ByteLevel", "Metaspace", ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for part in (backend.decoder, backend.pre_tokenizer):  # each serialises alone: no need to dump the vocabulary
        if part is not None:
            walk(json.loads(part.__getstate__()))
    return found


def _special_roles(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """Special token id -> its role (eos before bos, pad, unk: a shared eos/bos token counts as eos) or content."""
    roles: dict[int, str] = {}
    for role in ("eos", "bos", "pad", "unk"):
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None and tid not in roles:
            roles[int(tid)] = role
    for tid in getattr(tokenizer, "all_special_ids", []) or []:
        roles.setdefault(int(tid), tokenizer.convert_ids_to_tokens(int(tid)))
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            roles.setdefault(int(tid), str(added.content))
    return roles


def token_keys(tokenizer: PreTrainedTokenizerBase) -> list[TokenKey | None]:
    """Each id's normalised identity (index = id; ``None`` for ids the tokenizer does not use).

    Byte-level tokenizers (GPT-2, Llama 3, Qwen, this project's BPEs) map every character of a token through
    :func:`gpt2_byte_alphabet`; SentencePiece-style ones replace ``▁`` with a space and read ``<0xNN>``
    byte-fallback tokens as that byte; others are taken as UTF-8 text. Special tokens are keyed by role, so
    ``</s>`` and ``<|endoftext|>`` are the same token when both are their tokenizer's eos.
    """
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1 if vocab else 0
    kinds = _component_types(tokenizer)
    byte_level = "ByteLevel" in kinds
    metaspace = "Metaspace" in kinds or "ByteFallback" in kinds or (
        not byte_level and any("\u2581" in t for t in list(vocab)[:2000])
    )
    alphabet = gpt2_byte_alphabet() if byte_level else {}
    roles = _special_roles(tokenizer)
    added = {int(i): str(a.content) for i, a in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    keys: list[TokenKey | None] = [None] * size
    for token, tid in vocab.items():
        if tid in roles:
            keys[tid] = ("special", roles[tid])
        elif tid in added:  # a plain added token is its literal text
            keys[tid] = added[tid].encode("utf-8")
        elif byte_level and all(ch in alphabet for ch in token):
            keys[tid] = bytes(alphabet[ch] for ch in token)
        elif metaspace and _BYTE_FALLBACK.match(token):
            keys[tid] = bytes([int(_BYTE_FALLBACK.match(token).group(1), 16)])
        elif metaspace:
            keys[tid] = token.replace("\u2581", " ").encode("utf-8")
        else:
            keys[tid] = token.encode("utf-8")
    return keys


def key_text(key: TokenKey | None) -> str:
    """A readable form of a token key for messages."""
    if key is None:
        return "<unused>"
    if isinstance(key, tuple):
        return f"<{key[1]}>"
    return repr(key.decode("utf-8", errors="backslashreplace"))


def _map_difference(t_vocab: dict[str, int], s_vocab: dict[str, int], max_listed: int) -> str:
    only_t = sorted(set(t_vocab) - set(s_vocab), key=t_vocab.get)[:max_listed]
    only_s = sorted(set(s_vocab) - set(t_vocab), key=s_vocab.get)[:max_listed]
    moved = sorted((tok for tok in set(t_vocab) & set(s_vocab) if t_vocab[tok] != s_vocab[tok]), key=t_vocab.get)[:max_listed]
    parts = [f"teacher has {len(t_vocab)} tokens, student {len(s_vocab)}"]
    if only_t:
        parts.append("only in teacher: " + ", ".join(f"{tok!r}={t_vocab[tok]}" for tok in only_t))
    if only_s:
        parts.append("only in student: " + ", ".join(f"{tok!r}={s_vocab[tok]}" for tok in only_s))
    if moved:
        parts.append("different ids: " + ", ".join(f"{tok!r} teacher={t_vocab[tok]} student={s_vocab[tok]}" for tok in moved))
    return "; ".join(parts)


def _check_rows(teacher_real: int, student_real: int, teacher_rows: int, student_rows: int) -> None:
    for who, rows, real in (("teacher", teacher_rows, teacher_real), ("student", student_rows, student_real)):
        if rows < real:
            raise ConfigError(
                f"the {who}'s output layer has {rows} rows but its tokenizer has {real} tokens; "
                "the model was not built for this tokenizer"
            )


def check_vocab_compatible(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    *,
    teacher_rows: int,
    student_rows: int,
    max_listed: int = 5,
) -> VocabAlignment:
    """Rungs 1-2 only: check that teacher and student share a token-to-id map; return how to slice their logits.
    A real mismatch is a :class:`ConfigError` naming the differing tokens."""
    t_vocab = teacher_tokenizer.get_vocab()
    s_vocab = student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        raise ConfigError(
            "teacher and student tokenizers differ (" + _map_difference(t_vocab, s_vocab, max_listed) + "). "
            + CROSS_TOKENIZER_HINT
        )
    real = len(t_vocab)
    _check_rows(real, real, teacher_rows, student_rows)
    if teacher_rows == student_rows:
        rung, reason = "identical", f"one tokenizer ({real} tokens), output layers of {teacher_rows} rows"
    else:
        rung, reason = "padded", (
            f"one tokenizer ({real} tokens), output layers padded to {teacher_rows} (teacher) and {student_rows} "
            f"(student) rows: both sliced to the {real} real tokens"
        )
    return VocabAlignment(real_vocab_size=real, student_rows=student_rows, teacher_rows=teacher_rows, rung=rung, reason=reason)


FOLDS = ("prefix", "bucket")


@dataclass(frozen=True)
class FoldPlan:
    """How a vocabulary folds onto ``num_columns`` columns: ids alone in their column are copied, the members of
    shared columns are summed. Ids in neither list have no column (their mass is dropped)."""

    num_columns: int
    single_ids: Tensor
    single_cols: Tensor
    multi_ids: Tensor
    multi_slot: Tensor  # each multi id's position among ``multi_cols``
    multi_cols: Tensor  # the columns with several members
    gather_ids: Tensor  # single_ids then multi_ids: the one gather that reads them all
    position: Tensor  # each id's place in gather_ids, -1 for an id in no column

    @staticmethod
    def from_columns(columns: Sequence[int] | Tensor, num_columns: int) -> "FoldPlan":
        """``columns[id]`` the column of each id, -1 for none."""
        cols = torch.as_tensor(columns, dtype=torch.long).reshape(-1)
        ids = torch.arange(cols.numel())
        keep = cols >= 0
        counts = torch.bincount(cols[keep], minlength=num_columns)
        alone = keep & (counts[cols.clamp(min=0)] == 1)
        shared = keep & ~alone
        multi_cols, slot = torch.unique(cols[shared], return_inverse=True)
        gather = torch.cat([ids[alone], ids[shared]])
        position = torch.full((cols.numel(),), -1, dtype=torch.long)
        position[gather] = torch.arange(gather.numel())
        return FoldPlan(num_columns, ids[alone], cols[alone], ids[shared], slot.reshape(-1), multi_cols, gather, position)

    def on(self, device: torch.device) -> "FoldPlan":
        if self.single_ids.device == device:
            return self
        return FoldPlan(self.num_columns, *(t.to(device) for t in (
            self.single_ids, self.single_cols, self.multi_ids, self.multi_slot, self.multi_cols, self.gather_ids,
            self.position)))

    def apply(self, logp: Tensor, extra: Tensor | None = None, rows: Tensor | None = None,
              edits: Sequence[tuple[Tensor, Tensor, Tensor]] = ()) -> Tensor:
        """``out[..., c] = log sum_{v in c} exp(logp[..., v])``, after ``extra`` (``[...]``) as column 0 when given;
        columns without mass are -inf (zero gradient).

        ``rows`` folds only those rows of a ``[N, V]`` input, and ``edits`` (``(rows, ids, values)``, applied in order,
        row indices into the output) replace single entries before folding: both without a ``[rows, V]`` copy.
        Shared columns are summed after a shift by the row's largest member (detached); a row where that leaves a
        column with a finite member at zero (a spread beyond the float range) is summed again exactly, each
        column shifted by its own largest member."""
        plan = self.on(logp.device)
        lead = logp.shape[:-1] if rows is None else rows.shape
        flat = logp.reshape(-1, logp.shape[-1])
        # one gather for both kinds of column (each gather costs a buffer of the input's size in the backward)
        if rows is None:
            picked = flat.index_select(1, plan.gather_ids)
        else:
            picked = flat.index_select(0, rows.reshape(-1)).index_select(1, plan.gather_ids)  # faster than a 2-D index
        for at, ids, values in edits:
            where = plan.position[ids]
            keep = where >= 0
            picked.index_put_((at[keep], where[keep]), values[keep])
        off = 0 if extra is None else 1
        out = flat.new_empty((picked.shape[0], self.num_columns + off))
        if plan.single_ids.numel() + plan.multi_cols.numel() < self.num_columns:  # columns with no member here
            out.fill_(float("-inf"))
        if extra is not None:
            out[:, 0] = extra.reshape(-1)
        singles = plan.single_ids.numel()
        if singles:
            out.index_copy_(1, plan.single_cols + off, picked[:, :singles])
        if plan.multi_ids.numel():
            out.index_copy_(1, plan.multi_cols + off, self._sum_members(picked[:, singles:], plan))
        return out.reshape(*lead, self.num_columns + off)

    @staticmethod
    def _sum_members(members: Tensor, plan: "FoldPlan") -> Tensor:
        width = plan.multi_cols.numel()
        top = members.detach().amax(dim=1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = members.new_zeros((members.shape[0], width)).index_add(1, plan.multi_slot, torch.exp(members - top))
        dead = total == 0
        summed = torch.log(torch.where(dead, torch.ones_like(total), total)) + top
        if bool(dead.any()):
            # columns that are really empty stay -inf; an underflowed one is summed again with its own shift
            finite = torch.zeros_like(total).index_add(1, plan.multi_slot, torch.isfinite(members).to(total.dtype)) > 0
            redo = (dead & finite).any(dim=1).nonzero(as_tuple=True)[0]
            if redo.numel():
                rows = members[redo]
                index = plan.multi_slot.unsqueeze(0).expand(rows.shape[0], -1)
                own = torch.full((rows.shape[0], width), float("-inf"), dtype=rows.dtype, device=rows.device)
                own = own.scatter_reduce(1, index, rows.detach(), reduce="amax", include_self=True)
                own = torch.where(torch.isfinite(own), own, torch.zeros_like(own))
                again = torch.zeros_like(own).scatter_add(1, index, torch.exp(rows - own.gather(1, index)))
                fixed = torch.log(torch.where(again == 0, torch.ones_like(again), again)) + own
                summed = summed.index_copy(0, redo, fixed)
                dead = dead.index_copy(0, redo, again == 0)
        return summed.masked_fill(dead, float("-inf"))


@dataclass(frozen=True)
class _SideMap:
    """One side of a :class:`SharedVocab`: its real vocabulary size, how it folds, and whether some ids have no
    column (their category the other side cannot express: dropped, the rest renormalised)."""

    size: int
    plan: FoldPlan
    drops: bool


def safe_logsumexp(x: Tensor, dim: int = -1) -> Tensor:
    """``logsumexp`` that gives -inf (and a zero gradient, not NaN) where every entry is -inf."""
    top = x.detach().amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(x - top).sum(dim=dim, keepdim=True)
    dead = total == 0
    out = torch.log(torch.where(dead, torch.ones_like(total), total)) + top
    return out.masked_fill(dead, float("-inf")).squeeze(dim)


def fold_log_probs(logp: Tensor, columns: Sequence[int] | Tensor, num_columns: int) -> Tensor:
    """``out[..., c] = log sum_{v: columns[v] = c} exp(logp[..., v])`` (``columns`` covers the last dimension,
    -1 for an id in no column); see :class:`FoldPlan`."""
    return FoldPlan.from_columns(columns, num_columns).apply(logp)


@dataclass(frozen=True)
class SharedVocab:
    """Rungs 3 and 4: tokens paired by normalised string; each side's distribution folded onto common columns.

    Columns are the shared token strings (``shared_keys``) and, when both sides have tokens outside them, one
    bucket. ``fold="bucket"`` puts every unshared token in the bucket (KD on the shared part plus one bucket for
    the rest). ``fold="prefix"`` (the default) puts an unshared text token in the column of its longest shared
    prefix instead: the event "the next text begins with that shared token", which is what the other side's
    tokenizer would emit first for the same string (a teacher's ``" there"`` joins ``" the"`` when the student
    spells it ``" the" + "re"``); only tokens with no shared prefix (and unshared special tokens) go to the
    bucket. Several ids with one key (a byte-fallback twin) add up in their column. When only one side has
    bucket tokens, the other cannot express that category: it is dropped and that side renormalised, so no
    divergence is infinite for want of a column. Folding is a coarse-graining: any f-divergence on the columns
    is at most the divergence on a common refinement.
    """

    rung: str
    reason: str
    shared_keys: tuple
    teacher: _SideMap
    student: _SideMap
    teacher_rows: int
    student_rows: int
    fold: str = "prefix"
    has_bucket: bool = False
    only_teacher: tuple = field(default=(), repr=False)  # a few keys for messages
    only_student: tuple = field(default=(), repr=False)

    @property
    def num_shared(self) -> int:
        return len(self.shared_keys)

    @property
    def num_columns(self) -> int:
        return self.num_shared + int(self.has_bucket)

    @property
    def shared_fraction(self) -> float:
        """Shared tokens over the smaller real vocabulary."""
        return self.num_shared / max(1, min(self.teacher.size, self.student.size))

    def differences(self, max_listed: int = 5) -> str:
        parts = [f"teacher has {self.teacher.size} tokens, student {self.student.size}, {self.num_shared} shared"]
        if self.only_teacher:
            parts.append("only in teacher: " + ", ".join(key_text(k) for k in self.only_teacher[:max_listed]))
        if self.only_student:
            parts.append("only in student: " + ", ".join(key_text(k) for k in self.only_student[:max_listed]))
        return "; ".join(parts)

    def project(self, logp: Tensor, side: str, extra: Tensor | None = None, *, rows: Tensor | None = None,
                edits: Sequence[tuple[Tensor, Tensor, Tensor]] = ()) -> Tensor:
        """One side's log-probabilities ``[..., V]`` (V at least its real vocabulary; padding rows are dropped)
        folded to ``[..., (1 +) columns]``: ``extra`` (``[...]``, a category both sides provide, e.g. an aligned
        span) first when given, then the shared columns, then the bucket if there is one. Differentiable.
        ``rows``/``edits``: fold only some rows of ``[N, V]``, with some entries replaced (:meth:`FoldPlan.apply`)."""
        if side not in ("teacher", "student"):
            raise ValueError(f"side must be 'teacher' or 'student', got {side!r}")
        m = self.teacher if side == "teacher" else self.student
        if logp.shape[-1] < m.size:
            raise ValueError(f"{side} log-probs have {logp.shape[-1]} columns but its tokenizer has {m.size} tokens")
        out = m.plan.apply(logp[..., : m.size], extra, rows, edits)
        if m.drops:
            out = out - safe_logsumexp(out).unsqueeze(-1)
        return out

    def project_to_shared(self, logp_teacher: Tensor, logp_student: Tensor) -> tuple[Tensor, Tensor]:
        """Both distributions on the common columns: any same-vocabulary divergence takes the pair (as
        log-probabilities, which are their own logits at temperature 1)."""
        return self.project(logp_teacher, "teacher"), self.project(logp_student, "student")


def _longest_shared_prefix(key: bytes, column_of: dict) -> int | None:
    for end in range(len(key) - 1, 0, -1):
        col = column_of.get(key[:end])
        if col is not None:
            return col
    return None


def _side_columns(keys: list[TokenKey | None], column_of: dict, fold: str) -> tuple[list[int], list[int]]:
    """Per id: its column (shared key), else by ``fold``; -2 marks a bucket token, -1 an unused id."""
    out = []
    for key in keys:
        if key is None:
            out.append(-1)
        elif key in column_of:
            out.append(column_of[key])
        elif fold == "prefix" and isinstance(key, bytes):
            col = _longest_shared_prefix(key, column_of)
            out.append(-2 if col is None else col)
        else:
            out.append(-2)
    return out


def _side_map(columns: list[int], bucket: int | None, num_columns: int) -> _SideMap:
    resolved = [bucket if c == -2 and bucket is not None else (-1 if c == -2 else c) for c in columns]
    return _SideMap(len(columns), FoldPlan.from_columns(resolved, num_columns), any(c < 0 for c in resolved))


def shared_vocab(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    *,
    teacher_rows: int,
    student_rows: int,
    rung: str = "partial",
    reason: str = "",
    fold: str = "prefix",
) -> SharedVocab:
    """The string pairing of two tokenizers (rung 3/4 machinery); works for any pair, identical ones included."""
    if fold not in FOLDS:
        raise ConfigError(f"vocab.fold must be one of {', '.join(FOLDS)}, got {fold!r}")
    t_keys, s_keys = token_keys(teacher_tokenizer), token_keys(student_tokenizer)
    _check_rows(len(t_keys), len(s_keys), teacher_rows, student_rows)
    t_first = {}
    for tid, key in enumerate(t_keys):
        if key is not None:
            t_first.setdefault(key, tid)
    s_set = {k for k in s_keys if k is not None}
    shared = [k for k in t_first if k in s_set]
    shared.sort(key=t_first.get)
    column_of = {k: c for c, k in enumerate(shared)}
    t_cols, s_cols = _side_columns(t_keys, column_of, fold), _side_columns(s_keys, column_of, fold)
    has_bucket = -2 in t_cols and -2 in s_cols
    bucket = len(shared) if has_bucket else None
    only_t = tuple(k for k in t_first if k not in s_set)[:20]
    only_s = tuple(dict.fromkeys(k for k in s_keys if k is not None and k not in column_of))[:20]
    return SharedVocab(
        rung=rung, reason=reason, shared_keys=tuple(shared),
        teacher=_side_map(t_cols, bucket, len(shared) + int(has_bucket)),
        student=_side_map(s_cols, bucket, len(shared) + int(has_bucket)),
        teacher_rows=teacher_rows, student_rows=student_rows, fold=fold, has_bucket=has_bucket,
        only_teacher=only_t, only_student=only_s,
    )


def vocab_ladder(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    *,
    teacher_rows: int,
    student_rows: int,
    rung: str = "auto",
    min_shared_fraction: float = DEFAULT_MIN_SHARED_FRACTION,
    fold: str = "prefix",
) -> VocabAlignment | SharedVocab:
    """Choose the vocabulary rung (``rung="auto"``) or check a forced one; logs which applies and why.

    auto: one token-to-id map -> ``identical`` (equal output rows) or ``padded``; otherwise ``partial`` when at
    least ``min_shared_fraction`` of the smaller vocabulary is shared by normalised string, else ``different``.
    Forcing ``identical``/``padded`` on two maps is a :class:`ConfigError` naming the differing tokens;
    ``partial`` needs at least one shared text token; ``different`` is always possible. ``fold``: how unshared
    tokens fold onto the shared columns on rungs 3-4 (:class:`SharedVocab`).
    """
    if rung != "auto" and rung not in RUNGS:
        raise ConfigError(f"vocab.rung must be auto or one of {', '.join(RUNGS)}, got {rung!r}")
    if not 0.0 <= min_shared_fraction <= 1.0:
        raise ConfigError(f"vocab.min_shared_fraction must be in [0, 1], got {min_shared_fraction!r}")
    forced = "" if rung == "auto" else f" (forced by vocab.rung: {rung})"
    same_map = teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
    if rung in ("auto", "identical", "padded") and (same_map or rung != "auto"):
        alignment = check_vocab_compatible(teacher_tokenizer, student_tokenizer, teacher_rows=teacher_rows, student_rows=student_rows)
        if rung == "identical" and alignment.rung == "padded":
            raise ConfigError(
                f"vocab.rung: identical, but the output layers differ ({teacher_rows} teacher rows, {student_rows} "
                "student rows); use vocab.rung: padded (or auto)"
            )
        chosen = alignment.rung if rung == "auto" else rung
        result: VocabAlignment | SharedVocab = VocabAlignment(
            alignment.real_vocab_size, student_rows, teacher_rows, chosen, alignment.reason + forced)
    else:
        pairing = shared_vocab(teacher_tokenizer, student_tokenizer, teacher_rows=teacher_rows, student_rows=student_rows,
                               fold=fold)
        text_shared = sum(1 for k in pairing.shared_keys if isinstance(k, bytes))
        fraction = pairing.shared_fraction
        share = (f"{pairing.num_shared} token strings shared ({fraction:.0%} of the smaller vocabulary; teacher "
                 f"{pairing.teacher.size} tokens, student {pairing.student.size})")
        if rung == "partial" and text_shared == 0:
            raise ConfigError(f"vocab.rung: partial, but the tokenizers share no text token ({pairing.differences()}); "
                              "use vocab.rung: different")
        if rung == "auto":
            chosen = "partial" if fraction >= min_shared_fraction else "different"
            why = (f"different tokenizers; {share}, {'at least' if chosen == 'partial' else 'below'} "
                   f"vocab.min_shared_fraction {min_shared_fraction:.0%}")
        else:
            chosen, why = rung, f"different tokenizers; {share}"
        how = "each unshared token joins its longest shared prefix" if fold == "prefix" else "plus one bucket for the rest"
        tail = (f"; distributions compared on the shared tokens ({how}), positions by character-offset alignment"
                if chosen == "partial" else "; cross-tokenizer objectives align the text by character offsets")
        result = dataclasses.replace(pairing, rung=chosen, reason=why + tail + forced)
    log.info("vocabulary rung %d (%s): %s", RUNG_NUMBER[result.rung], result.rung, result.reason)
    return result


def require_rung(alignment: VocabAlignment | SharedVocab, method: str, supported: frozenset[str] | set[str]) -> None:
    """Refuse a method that cannot handle this rung, naming the differing tokens and what would work."""
    if alignment.rung in supported:
        return
    detail = alignment.differences() if isinstance(alignment, SharedVocab) else alignment.reason
    raise ConfigError(
        f"'{method}' works on vocabulary rungs {', '.join(r for r in RUNGS if r in supported)}, but this teacher and "
        f"student are on rung {RUNG_NUMBER[alignment.rung]} ({alignment.rung}: {detail}). " + CROSS_TOKENIZER_HINT
    )
