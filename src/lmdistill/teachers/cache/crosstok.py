"""Cross-tokenizer teacher caches (vocabulary rungs 3 and 4): the teacher's top-k over its own tokens of the
student's text.

When the teacher's tokenizer differs from the data's (the student's), the teacher never reads student ids: a live
teacher tokenizes each block's text itself (:class:`~lmdistill.teachers.aligned.AlignedLiveTeacher`). A cache for
such a pair stores, for every student block, what that live teacher computes: the teacher's own input ids (its
tokenization of the block's text as :class:`~lmdistill.losses.alignment.CrossTokenizerBatcher` makes it, with the
teacher's prefix and position cap) and, at each of those teacher rows, its top-k log-probabilities and the log of
the mass outside them.

On disk it is a ``topk`` cache whose plan and manifest say ``rows: teacher`` and carry ``teacher_tokenizer``
(``fingerprint``, ``dir``, ``source``, ``vocab_size``, ``prefix_ids``, ``max_positions``, ``pad_id``), the
teacher's layers, width and output rows under ``teacher``, and whose ``vocab_size`` and id type are the
teacher's. ``tokenizer/`` holds the data's (student's) tokenizer, ``teacher_tokenizer/`` the teacher's. A shard's
rows are its blocks' teacher rows padded to the longest of them (``teacher_positions`` in its record): log-probs and
ids ``[n, T, k]``, log residual ``[n, T]``, then the teacher's ids ``[n, T]`` and their lengths ``[n]``; rows past a
block's length hold a one-hot filler.

Training (:class:`AlignedTeacherCache`) rebuilds each batch's alignment from its student tokens with the same
batcher, checks that the teacher ids it makes equal the stored ones (else the cache was built with another teacher
tokenizer or from another text: an error), and serves an :class:`~lmdistill.losses.crosstok.AlignedTeacher` whose
logits are a :class:`~lmdistill.losses.signals.SparseTeacher` (the residual spread evenly over the teacher's other
tokens), which every cross-tokenizer objective reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmdistill.constants import IGNORE_INDEX
from lmdistill.data.blocks import BlockDataset, TokenStream, collate
from lmdistill.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from lmdistill.errors import ConfigError, DataError
from lmdistill.losses import Objective
from lmdistill.losses.alignment import CrossTokenizerBatcher, CrossTokenizerInputs
from lmdistill.losses.crosstok import AlignedTeacher
from lmdistill.losses.pairing import model_shape
from lmdistill.losses.signals import CROSSTOK, SparseTeacher
from lmdistill.models.vocab import SAME_MAP_RUNGS, SharedVocab, VocabAlignment, require_rung, vocab_ladder
from lmdistill.teachers.cache.extract import teacher_top_k
from lmdistill.teachers.cache.format import VALUE_DTYPES, decode_teacher_tokens, from_storage
from lmdistill.teachers.cache.manifest import TEACHER_TOKENIZER_DIR, TOKENIZER_DIR
from lmdistill.teachers.cache.reader import TeacherCache, VerifyMode, cache_tokenizer

__all__ = ["AlignedTeacherCache", "TeacherRowWriter", "block_tokens", "cross_plan", "teacher_prefix_ids"]


def block_tokens(input_ids: torch.Tensor, labels: torch.Tensor, eos: int | None) -> torch.Tensor:
    """The student's tokens of packed blocks ``[B, L + 1]``: the inputs and the final label (an ignored one becomes the
    student's EOS, or 0), as a live aligned teacher turns them back into text."""
    last = labels[:, -1:]
    last = torch.where(last == IGNORE_INDEX, torch.full_like(last, eos if eos is not None else 0), last)
    return torch.cat([input_ids, last], dim=1)


def teacher_prefix_ids(teacher_tokenizer: Any) -> tuple[int, ...]:
    """What a live aligned teacher puts before every sequence: its BOS when its tokenizer adds one, else nothing."""
    bos = teacher_tokenizer.bos_token_id
    return (int(bos),) if bos is not None and getattr(teacher_tokenizer, "add_bos_token", False) else ()


def _filler(n: int, width: int, k: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Rows that are no teacher row (padding): one-hot on id 0, distinct ids, no residual."""
    logprobs = torch.full((n, width, k), float("-inf"), dtype=dtype)
    logprobs[..., 0] = 0.0
    indices = torch.arange(k).expand(n, width, k).clone()
    return logprobs, indices, torch.full((n, width), float("-inf"), dtype=dtype)


def cross_plan(plan: dict[str, Any], *, model: torch.nn.Module, teacher_tokenizer: Any, source: str,
               max_positions: int | None) -> dict[str, Any]:
    """A top-k plan (:func:`~lmdistill.teachers.cache.writer.build_plan`, with the teacher's vocabulary) made a
    cross-tokenizer one: rows are the teacher's, and what decides its tokenization of a block is recorded."""
    if plan.get("mode", "topk") != "topk":
        raise ConfigError(f"a cross-tokenizer cache stores the teacher's top-k (cache.mode: topk), not {plan['mode']}")
    layers, width = model_shape(model)
    pad = teacher_tokenizer.pad_token_id
    return {
        **plan,
        "rows": "teacher",
        "teacher": {**plan["teacher"], "rows": int(model.get_output_embeddings().weight.shape[0]), "layers": layers,
                    "width": width},
        "teacher_tokenizer": {
            "fingerprint": tokenizer_fingerprint(teacher_tokenizer),
            "dir": TEACHER_TOKENIZER_DIR,
            "source": source,
            "vocab_size": len(teacher_tokenizer),
            "prefix_ids": list(teacher_prefix_ids(teacher_tokenizer)),
            "max_positions": max_positions,
            "pad_id": int(pad if pad is not None else (teacher_tokenizer.eos_token_id or 0)),
        },
    }


class TeacherRowWriter:
    """What a cross-tokenizer cache stores of the blocks of one shard: the teacher run on its own tokens of each
    block's text, exactly as a live aligned teacher would run it (same batcher, prefix, cap and attention mask)."""

    def __init__(self, model: torch.nn.Module, teacher_tokenizer: Any, student_tokenizer: Any, stream: TokenStream,
                 block_size: int, *, k: int, temperature: float, vocab_size: int, max_positions: int | None,
                 batch_size: int, device: torch.device) -> None:
        self.model, self.k, self.temperature, self.vocab_size = model, k, temperature, vocab_size
        self.max_positions, self.batch_size, self.device = max_positions, batch_size, device
        self.batcher = CrossTokenizerBatcher(student_tokenizer, teacher_tokenizer,
                                             teacher_prefix_ids=teacher_prefix_ids(teacher_tokenizer))
        self.blocks = BlockDataset(stream, block_size)
        self.eos = student_tokenizer.eos_token_id

    def shard(self, first: int, n: int) -> tuple[torch.Tensor, ...]:
        """Blocks ``first .. first + n - 1``: ``(logprobs [n, T, k], ids [n, T, k], log residual [n, T], teacher ids
        [n, T], lengths [n])``, T the longest teacher tokenization among them."""
        batch = collate([self.blocks[i] for i in range(first, first + n)])
        inputs = self.batcher(block_tokens(batch["input_ids"], batch["labels"], self.eos),
                              max_teacher_len=self.max_positions)
        ids, mask = inputs.teacher_input_ids, inputs.teacher_attention_mask
        lengths = mask.sum(1)
        logprobs, indices, log_residual = _filler(n, ids.shape[1], self.k)
        for start in range(0, n, self.batch_size):  # forward batches start at the shard's first block
            part = slice(start, start + self.batch_size)
            width = max(1, int(lengths[part].max()))
            top, top_ids, residual = teacher_top_k(
                self.model, ids[part, :width].to(self.device), attention_mask=mask[part, :width].to(self.device),
                k=self.k, temperature=self.temperature, vocab_size=self.vocab_size,
            )
            real = mask[part, :width].bool()
            logprobs[part, :width][real] = top[real]
            indices[part, :width][real] = top_ids[real]
            log_residual[part, :width][real] = residual[real]
        return logprobs, indices, log_residual, ids, lengths.to(torch.int32)


class AlignedTeacherCache(TeacherCache):
    """A cross-tokenizer top-k cache as the trainer's teacher: each batch's alignment rebuilt from its student
    tokens, checked against the stored teacher ids, with the stored top-k as the teacher's logits (see the module
    docstring). Open it with :class:`~lmdistill.teachers.cache.reader.TeacherCache` ``(path, ...)``."""

    modes = ("topk",)
    rows = "teacher"
    signal_kinds = frozenset({CROSSTOK})

    def __init__(self, path: str | Path, *, verify: VerifyMode = "open", tail: str = "uniform",
                 logits_dtype: str = "auto") -> None:
        if tail != "uniform":
            raise ConfigError(
                f"teacher.tail: {tail} shapes the missing mass by the student's probabilities of the same tokens; the "
                f"rows of {path} are the teacher's own tokens (a cross-tokenizer cache): use teacher.tail: uniform"
            )
        super().__init__(path, verify=verify, tail=tail, logits_dtype=logits_dtype)
        entry = self.manifest["teacher_tokenizer"]
        self.teacher_tokenizer = load_tokenizer(self.path / entry["dir"])
        if tokenizer_fingerprint(self.teacher_tokenizer) != entry["fingerprint"]:
            raise DataError(
                f"the teacher tokenizer saved in {entry['dir']}/ is not the one the cache was built with (fingerprint "
                f"{tokenizer_fingerprint(self.teacher_tokenizer)[:12]}, the manifest says {entry['fingerprint'][:12]})",
                path=self.path, hint="rebuild the cache with `lmdistill cache-teacher` into a new directory",
            )
        self.teacher_vocab_size = int(entry["vocab_size"])
        self.prefix_ids = tuple(int(i) for i in entry["prefix_ids"])
        self.max_positions = entry["max_positions"]
        teacher = self.manifest["teacher"]
        self.teacher_rows = int(teacher.get("rows", self.teacher_vocab_size))
        self.teacher_shape = (int(teacher.get("layers", 0)), int(teacher.get("width", 0)))
        self.pairing: VocabAlignment | SharedVocab | None = None
        self._batcher: CrossTokenizerBatcher | None = None
        self._student_eos: int | None = None
        self._tokens: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.description = (f"the cross-tokenizer cache {self.path} (teacher.cache: the teacher's top-k over its own "
                            "tokens of the student's text)")

    def refusal_advice(self, kind: str) -> str:
        return ("cannot compare distributions across tokenizers; use a cross-tokenizer objective (projected_kd, span_kd, "
                "uld, mined, or a mix of one with cross_entropy), or build the cache for one tokenizer")

    def pair_with(self, student_tokenizer: Any, *, student_rows: int, vocab: Any = None,
                  objective: Objective | None = None) -> VocabAlignment | SharedVocab:
        """Place the teacher's tokenizer and the run's student on the vocabulary ladder (logged; a forced rung
        is checked), refuse a same-vocabulary objective off rung 3 as a live teacher does, and read the student's
        blocks with ``student_tokenizer`` from now on. ``vocab`` is the run's
        :class:`~lmdistill.config.VocabConfig`."""
        ladder = {} if vocab is None else {"rung": vocab.rung, "min_shared_fraction": vocab.min_shared_fraction,
                                           "fold": vocab.fold}
        pairing = vocab_ladder(self.teacher_tokenizer, student_tokenizer, teacher_rows=self.teacher_rows,
                               student_rows=student_rows, **ladder)
        cross = objective is not None and objective.requires_teacher and not objective.refusals(CROSSTOK)
        if objective is not None and not cross and pairing.rung != "partial":
            require_rung(pairing, "token-level distillation with a same-vocabulary objective", SAME_MAP_RUNGS)
        self.pairing = pairing
        self._use_student_tokenizer(student_tokenizer)
        return pairing

    def _use_student_tokenizer(self, student_tokenizer: Any) -> CrossTokenizerBatcher:
        self._batcher = CrossTokenizerBatcher(student_tokenizer, self.teacher_tokenizer, teacher_prefix_ids=self.prefix_ids)
        self._student_eos = student_tokenizer.eos_token_id
        return self._batcher

    def teacher_tokens(self, index: int) -> np.ndarray:
        """The teacher's input ids stored for block ``index`` (its real ones only)."""
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} is outside the cache's {self.n_blocks} blocks")
        shard, local = divmod(int(index), self.blocks_per_shard)
        if shard not in self._tokens:
            self._tokens[shard] = decode_teacher_tokens(self._memmap(shard), self._layout(shard))
        ids, lengths = self._tokens[shard]
        return ids[local, : int(lengths[local])]

    def _check_tokens(self, index: int, stored: np.ndarray, made: torch.Tensor) -> None:
        made_ids = made.numpy()
        if stored.shape == made_ids.shape and np.array_equal(stored, made_ids):
            return
        common = min(len(stored), len(made_ids))
        differs = np.nonzero(stored[:common] != made_ids[:common])[0]
        at = int(differs[0]) if len(differs) else common
        raise DataError(
            f"block {index}: the teacher's tokens of this block's text ({len(made_ids)} tokens) are not the ones the "
            f"cache stores ({len(stored)} tokens; first difference at teacher position {at}): the cache was built with "
            "another teacher tokenizer or from another text",
            path=self.path, hint="rebuild it with `lmdistill cache-teacher` for this data, the student's tokenizer "
            f"({TOKENIZER_DIR}/) and this teacher",
        )

    def _rows(self, blocks: list[int], inputs: CrossTokenizerInputs) -> tuple[torch.Tensor, ...]:
        """The stored teacher rows of ``blocks`` in the batcher's layout ``[B * T, k]`` (filler beyond each block)."""
        ids, mask = inputs.teacher_input_ids, inputs.teacher_attention_mask
        logprobs, indices, log_residual = _filler(len(blocks), ids.shape[1], self.k, VALUE_DTYPES[self.value_dtype])
        for b, index in enumerate(blocks):
            n = int(mask[b].sum())
            self._check_tokens(index, self.teacher_tokens(index), ids[b, :n])
            values, top_ids, residual = self.block(index)
            logprobs[b, :n] = from_storage(np.array(values[:n]), self.value_dtype)
            indices[b, :n] = torch.from_numpy(top_ids[:n].astype(np.int64))
            log_residual[b, :n] = from_storage(np.array(residual[:n]), self.value_dtype)
        return logprobs.reshape(-1, self.k), indices.reshape(-1, self.k), log_residual.reshape(-1)

    def signal(self, batch: dict[str, torch.Tensor]) -> AlignedTeacher:
        """The aligned teacher of a training batch (packed blocks with ``block_index``)."""
        self._check_batch(batch)
        if "attention_mask" in batch:
            raise ConfigError(f"{self.description} works on packed blocks of text (lmdistill train / distill); padded "
                              "task batches (generation regimes) need one tokenizer for teacher and student")
        batcher = self._batcher
        if batcher is None:  # opened outside a run: the data's tokenizer is stored with the cache
            batcher = self._use_student_tokenizer(cache_tokenizer(self.path))
        tokens = block_tokens(batch["input_ids"], batch["labels"], self._student_eos).cpu()
        inputs = batcher(tokens, max_teacher_len=self.max_positions)
        logprobs, indices, log_residual = self._rows(batch["block_index"].reshape(-1).tolist(), inputs)
        device = batch["input_ids"].device
        sparse = SparseTeacher(logprobs, indices, log_residual.float().exp(), self.temperature, "uniform")
        return AlignedTeacher(sparse.to(device), inputs.alignment.to(device), inputs.teacher_valid.to(device),
                              self.teacher_vocab_size)

    def chunked_signal(self, batch: dict[str, torch.Tensor]) -> AlignedTeacher:
        return self.signal(batch)  # the chunked path cuts the student's rows (objectives with takes_aligned_windows)
