"""Low-rank teacher caches (``lowrank``, the ``cache-teacher`` default): int8 codes of the teacher's final hidden
state on its principal directions, served back as dense teacher logits (plain loss path) or as low-rank codes with
the projected output layer (chunked path), so every objective accepts them. The projection and its fidelity
measurement: :mod:`lmdistill.teachers.cache.projection`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from lmdistill.errors import DataError, LmdistillError
from lmdistill.losses.signals import DENSE, LOWRANK, LowRankCodes, SparseTeacher
from lmdistill.teachers.cache.format import from_storage
from lmdistill.teachers.cache.projection import PROJECTION_NAME, LowRankProjection, native_bf16_matmul
from lmdistill.teachers.cache.reader import TeacherCache, VerifyMode


class LowRankTeacherCache(TeacherCache):
    """A ``lowrank`` cache and its projection. Open it with :class:`~lmdistill.teachers.cache.reader.TeacherCache`
    ``(path, ...)`` (same arguments); ``logits_dtype`` chooses the dtype of the product that rebuilds the logits."""

    modes = ("lowrank",)
    signal_kinds = frozenset({DENSE, LOWRANK})

    def __init__(self, path: str | Path, *, verify: VerifyMode = "open", tail: str = "uniform",
                 logits_dtype: str = "auto") -> None:
        super().__init__(path, verify=verify, tail=tail, logits_dtype=logits_dtype)
        self._layers: dict[torch.device, tuple[torch.dtype, torch.Tensor, torch.Tensor]] = {}
        self.projection: LowRankProjection = self._load_projection()

    def _load_projection(self) -> LowRankProjection:
        """The projection (always checked against the manifest's checksum: it is small)."""
        record = self.manifest.get("projection") or {}
        file = self.path / record.get("file", PROJECTION_NAME)  # a plain name inside the cache: checked by read_manifest
        # the writer refits a missing or damaged projection (and recomputes the shards that depend on it)
        hint = "rerun `lmdistill cache-teacher` with the same config to rebuild it"
        if not file.exists():
            raise DataError(f"the low-rank cache's projection {file.name} is missing", path=file, hint=hint)
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise DataError(f"the low-rank cache's projection {file.name} is corrupt (SHA-256 differs from the manifest)",
                            path=file, hint=hint)
        return LowRankProjection.from_bytes(data)

    def coordinates(self, block_indices: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """Dequantised coordinates of the given blocks, ``[len(blocks) * L, k]`` float32: the "hidden states" that
        :attr:`projection` ``.weight`` / ``.bias`` turn into teacher logits."""
        parts = self._blocks(block_indices)
        codes = torch.from_numpy(np.stack([p[1] for p in parts])).reshape(-1, self.k)  # int8, dequantised below
        scale = from_storage(np.stack([p[2] for p in parts]), self.value_dtype).reshape(-1)
        return self.projection.coordinates(codes, scale)

    def logits_layer(self, device: torch.device | str = "cpu") -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
        """``(dtype, weight [V, k], bias [V])`` on ``device``: the projected output layer in the dtype of the product
        that rebuilds the teacher's logits (:attr:`logits_dtype`; ``"auto"`` = bfloat16 where ``device`` multiplies
        it natively, else float32).

        Why bfloat16: the product has the size of the student's output layer, and with the compiled losses it
        is most of a cached step's extra time (float32 [256, 128] @ [128, 8192] with the bias: 4.2 ms per chunk,
        bfloat16 1.8 ms, on this project's AVX512-BF16 CPU). The price is rounding: bfloat16 keeps 8
        significant bits, and rounding the result dominates (the product accumulates in float32). On the bench
        cache (bench/cache.py, k = 128) it adds a mean KL of about 4e-5 nats per token against the float32
        product, of the order of the projection's own error recorded in the manifest (``projection.fidelity``,
        6e-5 there); ``bench/cache.py`` prints both and the students' perplexities. ``float32`` rules it out."""
        device = torch.device(device)
        layer = self._layers.get(device)
        if layer is None:  # resolved and converted once per device, not per step
            bf16 = self.logits_dtype == "bfloat16" or (self.logits_dtype == "auto" and native_bf16_matmul(device))
            dtype = torch.bfloat16 if bf16 else torch.float32
            layer = self._layers[device] = (dtype, self.projection.weight.to(device, dtype),
                                            self.projection.bias.to(device, dtype))
        return layer

    def block_logits(self, block_indices: Iterable[int] | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense teacher logits ``[len(blocks) * L, V]`` on ``device``, in the dtype of :meth:`logits_layer`. (Not
        named ``logits``: that is the contract's text scoring, which a cache cannot do.)"""
        dtype, weight, bias = self.logits_layer(device)
        z = self.coordinates(block_indices).to(device, dtype)
        return torch.nn.functional.linear(z, weight, bias)

    def lookup(self, block_indices: Iterable[int] | torch.Tensor) -> SparseTeacher:
        """Refused: a low-rank cache holds codes, not a sparse teacher."""
        raise LmdistillError(f"{self.path} is a lowrank cache: it stores no log-probabilities; use block_logits()")

    def signal(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dense teacher logits ``[B*L, V]`` of a training batch (rows in the student's flattened order)."""
        self._check_batch(batch)
        return self.block_logits(batch["block_index"], batch["input_ids"].device)

    def chunked_signal(self, batch: dict[str, torch.Tensor]) -> LowRankCodes:
        """``(coordinates [B*L, k], weight [V, k], bias [V])``, from which the chunked loss builds teacher logits
        chunk by chunk (as from a live teacher's hidden states)."""
        self._check_batch(batch)
        device = batch["input_ids"].device
        dtype, weight, bias = self.logits_layer(device)
        return LowRankCodes(self.coordinates(batch["block_index"]).to(device, dtype), weight, bias)
