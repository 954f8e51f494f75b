"""Sparse teacher caches (``topk``, ``sampled``, ``hybrid``): k entries per token served as a
:class:`~lmdistill.losses.SparseTeacher`.

A ``topk`` cache gives top-k signals, which every objective accepts (the residual mass is shared as
``teacher.tail`` says). ``sampled`` (random-sampling KD, arXiv:2503.16870) and ``hybrid`` (threshold sampling)
caches give sampled signals: unbiased estimates of the teacher only for objectives linear in its probabilities
(forward KL, cross-entropy), so the objective check refuses the others before training.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from lmdistill.losses.signals import SAMPLED, TOPK, SparseTeacher
from lmdistill.teachers.cache.format import from_storage
from lmdistill.teachers.cache.manifest import SAMPLING_MODES
from lmdistill.teachers.cache.reader import TeacherCache

_KINDS_OF_MODE = {"topk": frozenset({TOPK}), "sampled": frozenset({SAMPLED}), "hybrid": frozenset({SAMPLED})}


class SparseTeacherCache(TeacherCache):
    """A ``topk``, ``sampled`` or ``hybrid`` cache: its blocks' stored entries as a sparse teacher. Open it with
    :class:`~lmdistill.teachers.cache.reader.TeacherCache` ``(path, ...)`` (same arguments)."""

    modes = ("topk", "sampled", "hybrid")

    @property
    def signal_kinds(self) -> frozenset[str]:  # type: ignore[override]  # per mode: top-k or sampled entries
        return _KINDS_OF_MODE[self.mode]

    def refusal_advice(self, kind: str) -> str:
        if kind == SAMPLED:
            # random-sampling KD / threshold sampling estimate the teacher without bias only for objectives linear
            # in its probabilities (reverse KL would even be infinite: every undrawn token has probability 0)
            return (f"need a top-k cache (cache.mode: topk) or a live teacher (teacher.path): a {self.mode} cache is an "
                    "unbiased estimate only for forward_kl, cross_entropy (and mixes of them)")
        return super().refusal_advice(kind)

    def lookup(self, block_indices: Iterable[int] | torch.Tensor) -> SparseTeacher:
        """The sparse teacher of the given blocks, flattened to ``[len(blocks) * L, k]`` rows."""
        parts = self._blocks(block_indices)
        logprobs = from_storage(np.stack([p[0] for p in parts]), self.value_dtype).reshape(-1, self.k)
        indices = torch.from_numpy(np.stack([p[1] for p in parts]).astype(np.int64)).reshape(-1, self.k)
        log_residual = from_storage(np.stack([p[2] for p in parts]), self.value_dtype).reshape(-1)
        residual = log_residual.float().exp()  # exp(-inf) = 0 when k = V
        return SparseTeacher(logprobs, indices, residual, self.temperature, self.tail, sampled=self.mode in SAMPLING_MODES)

    def signal(self, batch: dict[str, torch.Tensor]) -> SparseTeacher:
        """The sparse teacher of a training batch (rows in the student's flattened [B*L] order)."""
        self._check_batch(batch)
        return self.lookup(batch["block_index"]).to(batch["input_ids"].device)

    def chunked_signal(self, batch: dict[str, torch.Tensor]) -> SparseTeacher:
        """The same sparse teacher: the chunked loss path slices it by rows."""
        return self.signal(batch)
