"""Alignment of two tokenizations of the same text by character offsets, and of two vocabularies by edit distance.

Coordinates. Every token of either side gets a span ``[start, end)`` in one byte coordinate system over the
shared text: a student's tokens from the bytes they stand for (:func:`lmdistill.models.vocab.token_keys`), a
teacher's from its fast tokenizer's ``return_offsets_mapping`` (character offsets, turned into UTF-8 byte
offsets). A special token (eos between packed documents) occupies one unit of its own on both sides when the
other tokenizer has a token of the same role, so documents stay separated the same way for both models.

Groups. A *cut* of one side lies between two consecutive tokens that do not overlap (two tokens sharing one
multi-byte character do); when offsets leave a gap (trimmed whitespace) the cut is the whole gap. Aligned groups
are the maximal runs of tokens between consecutive cuts the two sides have in common: both sides of a group
cover the same text, and no smaller split would. Where a group holds one token on each side, the two tokens
have the same string: there the sides correspond one to one. The same walk as TRL's GOLD trainer
(``ULDLoss._align_by_byte_offsets``: advance the side whose token ends first, close a group where both end at
the same byte), extended to gaps and to tokens sharing a character.

Rows. The project's convention is kept on both sides: a sequence of ``n + 1`` tokens has ``n`` label rows, row
``r`` predicting token ``r + 1`` from tokens ``0..r``. A group containing a side's token 0 has no predictor and is
left out. :class:`AlignedBatch` holds the groups of a batch as flat index tensors for the losses of
:mod:`lmdistill.losses.crosstok` and the span pooling of :mod:`lmdistill.losses.representation`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lmdistill.errors import ConfigError
from lmdistill.models.vocab import TokenKey, token_keys

__all__ = [
    "TokenSpans",
    "encode_spans",
    "align_spans",
    "AlignedBatch",
    "CrossTokenizerInputs",
    "CrossTokenizerBatcher",
    "edit_distances",
    "min_edit_distance_map",
]


@dataclass(frozen=True)
class TokenSpans:
    """One tokenization of a text: token ids and their ``[start, end)`` byte spans (same length, in order)."""

    ids: tuple[int, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)


def _byte_offsets(text: str) -> list[int]:
    """``out[c]`` = UTF-8 byte offset of character ``c`` (``len(text) + 1`` entries)."""
    out = [0]
    for ch in text:
        out.append(out[-1] + len(ch.encode("utf-8")))
    return out


def encode_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, *, origin: int = 0, keys: Sequence[TokenKey | None] | None = None
) -> TokenSpans:
    """Tokenize ``text`` (no special tokens added) with byte spans shifted by ``origin``; needs a fast tokenizer.

    Offsets are per character, so the byte-level pieces of one multi-byte character all get its whole span; with
    the tokenizer's ``keys`` (:func:`~lmdistill.models.vocab.token_keys`) such a run is split by the pieces' own
    byte lengths when they add up to the character's, so two byte-level tokenizers align piece by piece.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"cross-tokenizer alignment needs a fast tokenizer (offset mappings); {type(tokenizer).__name__} is not "
            "one: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    pos = _byte_offsets(text)
    ids = list(enc["input_ids"])
    starts = [origin + pos[s] for s, _ in enc["offset_mapping"]]
    ends = [origin + pos[e] for _, e in enc["offset_mapping"]]
    if keys is not None:
        k = 0
        while k < len(ids):
            j = k
            while j + 1 < len(ids) and starts[j + 1] == starts[k] and ends[j + 1] == ends[k]:
                j += 1
            pieces = [keys[i] if 0 <= i < len(keys) else None for i in ids[k : j + 1]]
            if j > k and all(isinstance(p, bytes) for p in pieces) and sum(map(len, pieces)) == ends[k] - starts[k]:
                at = starts[k]
                for i, piece in zip(range(k, j + 1), pieces):
                    starts[i], ends[i] = at, at + len(piece)
                    at += len(piece)
            k = j + 1
    return TokenSpans(tuple(ids), tuple(starts), tuple(ends))


def _cuts(spans: TokenSpans, origin: int) -> list[tuple[int, int, int]]:
    """(lo, hi, k): a cut after token k (k = -1: before the first token) anywhere in [lo, hi]."""
    n = len(spans)
    if n == 0:
        return []
    out = [(origin, max(origin, spans.starts[0]), -1)]
    for k in range(n):
        end = spans.ends[k]
        if k == n - 1:
            out.append((end, end, k))
        elif spans.starts[k + 1] >= end:
            out.append((end, spans.starts[k + 1], k))
    return out


def align_spans(a: TokenSpans, b: TokenSpans, *, origin: int | None = None) -> list[tuple[range, range]]:
    """Aligned groups of two tokenizations: ``(tokens of a, tokens of b)`` index ranges, in text order (module
    docstring). Tokens after the last common cut (texts that end differently) belong to no group."""
    if len(a) == 0 or len(b) == 0:
        return []
    if origin is None:
        origin = min(a.starts[0], b.starts[0])
    ca, cb = _cuts(a, origin), _cuts(b, origin)
    groups: list[tuple[range, range]] = []
    i = j = 0
    prev_a = prev_b = None
    while i < len(ca) and j < len(cb):
        a_lo, a_hi, ak = ca[i]
        b_lo, b_hi, bk = cb[j]
        if a_hi < b_lo:
            i += 1
        elif b_hi < a_lo:
            j += 1
        else:
            if prev_a is not None:
                groups.append((range(prev_a + 1, ak + 1), range(prev_b + 1, bk + 1)))
            prev_a, prev_b = ak, bk
            i += 1
            j += 1
    return groups


@dataclass(frozen=True)
class AlignedBatch:
    """Aligned groups of a batch as flat indices (``G`` groups; ``P_s``/``P_t`` group tokens per side).

    Rows are flat label rows of each side (``b * L + r`` predicts token ``r + 1`` of sequence ``b``). For each
    side: ``*_rows``/``*_group``/``*_targets`` list every token of every group (group-contiguous, in order) with
    the row predicting it, its group and its id; ``*_first`` the row predicting each group's first token;
    ``*_cover_group``/``*_cover_ids`` the tokens whose string *covers* each group's text: the one token spelling it
    exactly (and its twins) and every token the other side lacks whose string begins with it (pairs, by group);
    ``*_last_pos`` the flat input position of each group's last token (for hidden states; -1 when that token is
    the last of its sequence and has none). ``one_to_one`` marks groups of one token per side.
    """

    batch_size: int
    student_len: int
    teacher_len: int
    s_rows: Tensor
    s_group: Tensor
    s_targets: Tensor
    s_first: Tensor
    s_cover_group: Tensor
    s_cover_ids: Tensor
    s_last_pos: Tensor
    t_rows: Tensor
    t_group: Tensor
    t_targets: Tensor
    t_first: Tensor
    t_cover_group: Tensor
    t_cover_ids: Tensor
    t_last_pos: Tensor
    one_to_one: Tensor

    @property
    def num_groups(self) -> int:
        return int(self.s_first.numel())

    def to(self, device: torch.device | str) -> "AlignedBatch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return AlignedBatch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in values.items()})


@dataclass(frozen=True)
class CrossTokenizerInputs:
    """What a teacher of another tokenizer needs for one student batch: its own input ids (right-padded), their
    attention mask, which of its label rows predict a real token, and the alignment of the two."""

    teacher_input_ids: Tensor  # [B, Lt]
    teacher_attention_mask: Tensor  # [B, Lt]
    teacher_valid: Tensor  # [B, Lt] bool
    alignment: AlignedBatch


def _utf8_bounds(data: bytes) -> tuple[int, int]:
    """``(head, end)`` such that ``data[head:end]`` drops a partial character at either edge (a block cut
    mid-character)."""
    head = 0
    while head < min(3, len(data)) and 0x80 <= data[head] < 0xC0:
        head += 1
    end = len(data)
    for back in range(1, min(4, end - head) + 1):
        byte = data[end - back]
        if byte < 0x80:
            break
        if byte >= 0xC0:  # a lead byte: is its character complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if back < need:
                end -= back
            break
    return head, max(head, end)


class CrossTokenizerBatcher:
    """Builds a teacher's inputs and the alignment from a student's token blocks (the trainer's path) or texts.

    ``teacher_prefix_ids`` (e.g. the teacher's BOS) are prepended to every teacher sequence with an empty span.
    """

    def __init__(
        self,
        student_tokenizer: PreTrainedTokenizerBase,
        teacher_tokenizer: PreTrainedTokenizerBase,
        *,
        teacher_prefix_ids: Sequence[int] = (),
    ) -> None:
        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.s_keys = token_keys(student_tokenizer)
        self.t_keys = token_keys(teacher_tokenizer)
        self.s_lookup = self._lookup(self.s_keys)
        self.t_lookup = self._lookup(self.t_keys)
        shared = set(self.s_lookup) & set(self.t_lookup)
        self.s_cover = self._cover_index(self.s_keys, shared)
        self.t_cover = self._cover_index(self.t_keys, shared)
        self.teacher_prefix_ids = tuple(int(i) for i in teacher_prefix_ids)
        pad = teacher_tokenizer.pad_token_id
        self.teacher_pad_id = int(pad if pad is not None else (teacher_tokenizer.eos_token_id or 0))

    @staticmethod
    def _lookup(keys: list[TokenKey | None]) -> dict:
        out: dict = {}
        for tid, key in enumerate(keys):
            if key is not None:
                out.setdefault(key, tid)
        return out

    @staticmethod
    def _cover_index(keys: list[TokenKey | None], shared: set) -> dict:
        """text -> ids covering it: the ids spelling it exactly, and the unshared ids that begin with it."""
        out: dict = {}
        for tid, key in enumerate(keys):
            if key is None:
                continue
            out.setdefault(key, []).append(tid)
            if isinstance(key, bytes) and key not in shared:
                for end in range(1, len(key)):
                    out.setdefault(key[:end], []).append(tid)
        return out

    def _key(self, sid: int) -> TokenKey:
        key = self.s_keys[sid] if 0 <= sid < len(self.s_keys) else None
        if key is None:
            raise ValueError(f"student token id {sid} is not in the student tokenizer ({len(self.s_keys)} ids)")
        return key

    def spans_from_ids(self, student_ids: Sequence[int]) -> tuple[TokenSpans, TokenSpans]:
        """The student's tokens (spans from their bytes) and the teacher's tokenization of the same text."""
        s_ids: list[int] = []
        s_st: list[int] = []
        s_en: list[int] = []
        t_ids = list(self.teacher_prefix_ids)
        t_st = [0] * len(t_ids)
        t_en = [0] * len(t_ids)
        cursor = 0
        run: list[tuple[int, bytes]] = []

        def flush() -> None:
            nonlocal cursor
            if not run:
                return
            data = b"".join(piece for _, piece in run)
            pos = cursor
            for sid, piece in run:
                s_ids.append(sid)
                s_st.append(pos)
                s_en.append(pos + len(piece))
                pos += len(piece)
            head, end = _utf8_bounds(data)
            try:
                text = data[head:end].decode("utf-8")
            except UnicodeDecodeError:  # not text: the teacher gets nothing here, these tokens stay unaligned
                text = ""
            if text:
                enc = encode_spans(self.teacher_tokenizer, text, origin=cursor + head, keys=self.t_keys)
                t_ids.extend(enc.ids)
                t_st.extend(enc.starts)
                t_en.extend(enc.ends)
            cursor += len(data)
            run.clear()

        for sid in student_ids:
            key = self._key(int(sid))
            if isinstance(key, bytes):
                run.append((int(sid), key))
                continue
            flush()
            s_ids.append(int(sid))
            s_st.append(cursor)
            s_en.append(cursor + 1)
            tid = self.t_lookup.get(key)
            if tid is not None:  # the teacher's token of the same role takes the same unit
                t_ids.append(tid)
                t_st.append(cursor)
                t_en.append(cursor + 1)
            cursor += 1
        flush()
        return TokenSpans(tuple(s_ids), tuple(s_st), tuple(s_en)), TokenSpans(tuple(t_ids), tuple(t_st), tuple(t_en))

    def spans_from_text(self, text: str) -> tuple[TokenSpans, TokenSpans]:
        """Both tokenizers' own tokenizations of ``text`` (offset mappings on both sides)."""
        student = encode_spans(self.student_tokenizer, text, keys=self.s_keys)
        teacher = encode_spans(self.teacher_tokenizer, text, keys=self.t_keys)
        if self.teacher_prefix_ids:
            n = len(self.teacher_prefix_ids)
            teacher = TokenSpans(self.teacher_prefix_ids + teacher.ids, (0,) * n + teacher.starts, (0,) * n + teacher.ends)
        return student, teacher

    def __call__(self, student_tokens: Tensor, *, max_teacher_len: int | None = None) -> CrossTokenizerInputs:
        """For a block of student tokens ``[B, L + 1]`` (``input_ids`` plus the final label): teacher inputs and the
        alignment (student label rows ``b * L + r``); see :meth:`build` for ``max_teacher_len``."""
        if student_tokens.dim() != 2 or student_tokens.shape[1] < 2:
            raise ValueError(f"student tokens must be [B, L + 1] with L >= 1, got {tuple(student_tokens.shape)}")
        pairs = [self.spans_from_ids(row) for row in student_tokens.tolist()]
        return self.build(pairs, student_len=student_tokens.shape[1] - 1, max_teacher_len=max_teacher_len)

    def build(self, pairs: Sequence[tuple[TokenSpans, TokenSpans]], *, student_len: int | None = None,
              max_teacher_len: int | None = None) -> CrossTokenizerInputs:
        """Teacher inputs and the alignment from ``(student, teacher)`` spans of each sequence; student sequences
        must all have ``student_len + 1`` tokens (default: the longest, shorter ones then need their own padding).
        ``max_teacher_len`` caps the teacher's input length (its position table): a teacher sequence is cut there
        and the groups beyond the cut stay unaligned (no loss), never an out-of-range position."""
        if not pairs:
            raise ValueError("no sequences to align")
        if max_teacher_len is not None and max_teacher_len < 1:
            raise ValueError(f"max_teacher_len must be >= 1, got {max_teacher_len}")
        L = student_len if student_len is not None else max(len(s) for s, _ in pairs) - 1
        cap = max_teacher_len if max_teacher_len is not None else float("inf")
        teacher_rows = [int(min(cap, max(0, len(t) - 1))) for _, t in pairs]
        Lt = max(1, max(teacher_rows))
        cols: dict[str, list[int]] = {name: [] for name in (
            "s_rows", "s_group", "s_targets", "s_first", "s_cover_group", "s_cover_ids", "s_last_pos",
            "t_rows", "t_group", "t_targets", "t_first", "t_cover_group", "t_cover_ids", "t_last_pos", "one_to_one")}
        g = 0
        for b, (s, t) in enumerate(pairs):
            for ra, rb in align_spans(s, t):
                if not ra or not rb or ra.start == 0 or rb.start == 0 or ra[-1] > L or rb[-1] > teacher_rows[b]:
                    continue
                for side, rng, spans, width in (("s", ra, s, L), ("t", rb, t, Lt)):
                    for k in rng:
                        cols[f"{side}_rows"].append(b * width + k - 1)
                        cols[f"{side}_group"].append(g)
                        cols[f"{side}_targets"].append(spans.ids[k])
                    cols[f"{side}_first"].append(b * width + rng[0] - 1)
                last_s = ra[-1] < L
                last_t = rb[-1] < teacher_rows[b]
                cols["s_last_pos"].append(b * L + ra[-1] if last_s else -1)
                cols["t_last_pos"].append(b * Lt + rb[-1] if last_t else -1)
                span_key = self._span_key([s.ids[k] for k in ra])
                for side, rng, spans, index in (("s", ra, s, self.s_cover), ("t", rb, t, self.t_cover)):
                    cover = dict.fromkeys(index.get(span_key, ()) if span_key is not None else ())
                    if len(rng) == 1:  # a one-token spelling covers its span whatever its normalised string
                        cover[spans.ids[rng[0]]] = None
                    cols[f"{side}_cover_group"].extend([g] * len(cover))
                    cols[f"{side}_cover_ids"].extend(cover)
                cols["one_to_one"].append(int(len(ra) == 1 and len(rb) == 1))
                g += 1
        long = torch.long
        tensors = {k: torch.tensor(v, dtype=long) for k, v in cols.items()}
        tensors["one_to_one"] = tensors["one_to_one"].bool()
        alignment = AlignedBatch(batch_size=len(pairs), student_len=L, teacher_len=Lt, **tensors)
        ids = torch.full((len(pairs), Lt), self.teacher_pad_id, dtype=long)
        mask = torch.zeros((len(pairs), Lt), dtype=long)
        for b, (_, t) in enumerate(pairs):
            n = teacher_rows[b]
            if n:
                ids[b, :n] = torch.tensor(t.ids[:n], dtype=long)
                mask[b, :n] = 1
        return CrossTokenizerInputs(ids, mask, mask.bool(), alignment)

    def _span_key(self, student_ids: list[int]) -> TokenKey | None:
        keys = [self._key(i) for i in student_ids]
        if len(keys) == 1:
            return keys[0]
        if all(isinstance(k, bytes) for k in keys):
            return b"".join(keys)
        return None


def edit_distances(queries: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
    """Levenshtein distances ``[Q, C]`` (unit insert/delete/substitute), vectorised over all pairs.

    Each query row of the dynamic programme is computed at once for every candidate: substitutions and
    deletions come from the previous row, and insertions (a left-to-right chain within the row) are a running
    minimum of ``row[k] - k`` plus ``j``.
    """
    if not queries or not candidates:
        return np.zeros((len(queries), len(candidates)), dtype=np.int64)
    n = max(1, max(len(c) for c in candidates))
    m = max(len(q) for q in queries)
    cand = np.full((len(candidates), n), -1, dtype=np.int64)
    for k, c in enumerate(candidates):
        cand[k, : len(c)] = [ord(ch) for ch in c]
    qry = np.full((len(queries), m), -2, dtype=np.int64)
    for k, q in enumerate(queries):
        qry[k, : len(q)] = [ord(ch) for ch in q]
    qlen = np.array([len(q) for q in queries])
    clen = np.array([len(c) for c in candidates])
    ar = np.arange(n + 1, dtype=np.int64)
    row = np.broadcast_to(ar, (len(queries), len(candidates), n + 1)).copy()
    result = np.where(qlen[:, None] == 0, clen[None, :], 0).astype(np.int64)
    for i in range(1, m + 1):
        cost = (cand[None, :, :] != qry[:, i - 1][:, None, None]).astype(np.int64)
        nxt = np.empty_like(row)
        nxt[..., 0] = i
        nxt[..., 1:] = np.minimum(row[..., 1:] + 1, row[..., :-1] + cost)
        row = np.minimum.accumulate(nxt - ar, axis=-1) + ar
        done = qlen == i
        if done.any():
            result[done] = np.take_along_axis(row[done], clen[None, :, None], axis=-1)[..., 0]
    return result


def min_edit_distance_map(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    *,
    chunk: int = 64,
) -> Tensor:
    """FuseLLM's MinED vocabulary mapping (Wan et al., "Knowledge Fusion of Large Language Models", arXiv
    2401.10491): each teacher token goes to the student token with the same normalised string, else to the one
    at the smallest edit distance (ties: the lowest id). Returns ``[V_teacher]`` student ids, -1 for a teacher
    special token whose role the student lacks.

    Strings are compared as decoded text (byte-level ``Ġ`` and SentencePiece ``▁`` markers normalised away, as
    FuseLLM strips them). Candidates are searched in widening length windows: a candidate whose length differs
    by more than the best distance found cannot be closer, so most queries finish in the first window.
    """
    t_keys, s_keys = token_keys(teacher_tokenizer), token_keys(student_tokenizer)
    s_lookup: dict = {}
    for sid, key in enumerate(s_keys):
        if key is not None:
            s_lookup.setdefault(key, sid)
    out = torch.full((len(t_keys),), -1, dtype=torch.long)
    pending: list[tuple[int, str]] = []
    for tid, key in enumerate(t_keys):
        if key is None:
            continue
        if key in s_lookup:
            out[tid] = s_lookup[key]
        elif isinstance(key, bytes):
            pending.append((tid, key.decode("utf-8", errors="replace")))
    cand_ids = [sid for sid, key in enumerate(s_keys) if isinstance(key, bytes)]
    cand_text = [s_keys[sid].decode("utf-8", errors="replace") for sid in cand_ids]
    cand_len = np.array([len(c) for c in cand_text])
    by_len: dict[int, list[tuple[int, str]]] = {}
    for tid, text in pending:
        by_len.setdefault(len(text), []).append((tid, text))
    longest = int(cand_len.max()) if len(cand_len) else 0
    budget = 1 << 22  # pairs x characters per block: bounds the DP's memory to tens of megabytes
    for m, items in by_len.items():
        for start in range(0, len(items), chunk):
            batch = items[start : start + chunk]
            best = np.full(len(batch), np.iinfo(np.int64).max)
            best_id = np.full(len(batch), -1)
            open_rows = np.ones(len(batch), dtype=bool)
            window = 1
            while open_rows.any():
                near = np.nonzero(np.abs(cand_len - m) <= window)[0]
                rows = np.nonzero(open_rows)[0]
                width = int(cand_len[near].max()) + 1 if len(near) else 1
                step = max(1, budget // (len(rows) * width))
                for lo in range(0, len(near), step):
                    block = near[lo : lo + step]
                    d = edit_distances([batch[r][1] for r in rows], [cand_text[c] for c in block])
                    arg = d.argmin(axis=1)  # the first minimum: the lowest student id (candidates are in id order)
                    for k, r in enumerate(rows):
                        dist, sid = d[k, arg[k]], cand_ids[block[arg[k]]]
                        if dist < best[r] or (dist == best[r] and sid < best_id[r]):
                            best[r], best_id[r] = dist, sid
                # a candidate outside the window is at least window + 1 away: these rows are final
                open_rows &= ~(best <= window)
                if window > max(m, longest):
                    break
                window *= 2
            for (tid, _), sid in zip(batch, best_id):
                out[tid] = int(sid)
    return out
