"""The byte layout of a teacher cache's shard files and their codec.

A shard holds three arrays one after the other, each starting on a 64-byte boundary: values ``[n, L, v]`` in the
value dtype (log-probabilities; none in a low-rank cache), integers ``[n, L, k]`` (token ids in the smallest
unsigned type that holds the vocabulary; a low-rank cache's int8 codes) and one value per token ``[n, L]`` (the log
of the residual mass; a low-rank cache's scale). Numpy has no bfloat16: its bits are stored as uint16.

A cross-tokenizer cache (``token_rows``) stores the teacher's rows instead of the student's: ``L`` is then the
shard's teacher width, and two more sections follow: the teacher's own input ids of each block ``[n, L]`` (in the
id type) and how many of them are real ``[n]`` (int32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

_SECTION_ALIGN = 64  # each array of a shard starts on a 64-byte boundary

ValueDtype = Literal["float16", "bfloat16", "float32"]
VALUE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NUMPY_STORAGE: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "float32": np.dtype(np.float32),
}


def index_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type holding every token id 0..vocab_size-1."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _aligned(n: int) -> int:
    return (n + _SECTION_ALIGN - 1) // _SECTION_ALIGN * _SECTION_ALIGN


@dataclass(frozen=True)
class ShardLayout:
    """Byte layout of one shard file: three arrays one after the other, each 64-byte aligned: values
    ``[n, L, value_count]`` (value dtype), integers ``[n, L, k]`` (token ids; a low-rank cache's int8 codes)
    and one value per token ``[n, L]`` (log residual; a low-rank cache's scale)."""

    n_blocks: int
    block_size: int
    k: int
    value_dtype: str
    index_dtype: str
    value_count: int | None = None  # values per token; None: k (a low-rank cache stores none)
    token_rows: bool = False  # a cross-tokenizer cache: the teacher's ids [n, L] and real lengths [n] follow

    @property
    def values_per_token(self) -> int:
        return self.k if self.value_count is None else self.value_count

    @property
    def values_shape(self) -> tuple[int, int, int]:
        return (self.n_blocks, self.block_size, self.values_per_token)

    @property
    def value_np(self) -> np.dtype:
        return _NUMPY_STORAGE[self.value_dtype]

    @property
    def index_np(self) -> np.dtype:
        return np.dtype(self.index_dtype)

    @property
    def logprobs_shape(self) -> tuple[int, int, int]:
        return (self.n_blocks, self.block_size, self.k)

    @property
    def residual_shape(self) -> tuple[int, int]:
        return (self.n_blocks, self.block_size)

    @property
    def logprobs_offset(self) -> int:
        return 0

    @property
    def indices_offset(self) -> int:
        return _aligned(math.prod(self.values_shape) * self.value_np.itemsize)

    @property
    def residual_offset(self) -> int:
        return self.indices_offset + _aligned(math.prod(self.logprobs_shape) * self.index_np.itemsize)

    @property
    def tokens_offset(self) -> int:
        """Where a cross-tokenizer shard's teacher ids ``[n, L]`` start (then their lengths ``[n]``, int32)."""
        return _aligned(self.residual_offset + math.prod(self.residual_shape) * self.value_np.itemsize)

    @property
    def lengths_offset(self) -> int:
        return _aligned(self.tokens_offset + self.n_blocks * self.block_size * self.index_np.itemsize)

    @property
    def nbytes(self) -> int:
        if self.token_rows:
            return self.lengths_offset + self.n_blocks * np.dtype(np.int32).itemsize
        return self.residual_offset + math.prod(self.residual_shape) * self.value_np.itemsize

    @staticmethod
    def bytes_per_token(k: int, value_dtype: str, index_dtype_name: str, value_count: int | None = None) -> int:
        """Stored bytes per token, padding excluded: k values + k ids + 1 log residual (low-rank: k codes + 1 scale)."""
        value = _NUMPY_STORAGE[value_dtype].itemsize
        values = k if value_count is None else value_count
        return values * value + k * np.dtype(index_dtype_name).itemsize + value


def to_storage(values: torch.Tensor, value_dtype: str) -> np.ndarray:
    """A float tensor cast to the value dtype, as the numpy array whose bytes are stored."""
    cast = values.detach().to("cpu", VALUE_DTYPES[value_dtype]).contiguous()
    if value_dtype == "bfloat16":
        return cast.view(torch.uint16).numpy()
    return cast.numpy()


def from_storage(array: np.ndarray, value_dtype: str) -> torch.Tensor:
    """Stored values (numpy) as a torch tensor of the value dtype (no copy when ``array`` is writable)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if value_dtype == "bfloat16" else tensor


def encode_shard(logprobs: torch.Tensor, indices: torch.Tensor, log_residual: torch.Tensor, layout: ShardLayout,
                 teacher_tokens: torch.Tensor | None = None, teacher_lengths: torch.Tensor | None = None) -> bytes:
    """The bytes of one shard file from ``logprobs`` / ``indices`` ``[n, L, k]`` and ``log_residual`` ``[n, L]``
    (and, for a cross-tokenizer layout, the teacher's ids ``[n, L]`` and real lengths ``[n]``)."""
    if tuple(logprobs.shape) != layout.values_shape or tuple(indices.shape) != layout.logprobs_shape:
        raise ValueError(f"shard arrays {tuple(logprobs.shape)}/{tuple(indices.shape)} do not match "
                         f"{layout.values_shape}/{layout.logprobs_shape}")
    if tuple(log_residual.shape) != layout.residual_shape:
        raise ValueError(f"log_residual {tuple(log_residual.shape)} does not match {layout.residual_shape}")
    if layout.token_rows != (teacher_tokens is not None) or (teacher_tokens is None) != (teacher_lengths is None):
        raise ValueError("a cross-tokenizer shard stores the teacher's ids and lengths; no other shard does")
    ids = _checked_ids(indices, layout)
    sections = [
        (layout.logprobs_offset, to_storage(logprobs, layout.value_dtype)),
        (layout.indices_offset, ids),
        (layout.residual_offset, to_storage(log_residual, layout.value_dtype)),
    ]
    if teacher_tokens is not None and teacher_lengths is not None:
        if tuple(teacher_tokens.shape) != (layout.n_blocks, layout.block_size) or tuple(teacher_lengths.shape) != (layout.n_blocks,):
            raise ValueError(f"teacher ids {tuple(teacher_tokens.shape)} / lengths {tuple(teacher_lengths.shape)} do not "
                             f"match {(layout.n_blocks, layout.block_size)}")
        sections += [(layout.tokens_offset, _checked_ids(teacher_tokens, layout)),
                     (layout.lengths_offset, teacher_lengths.detach().cpu().numpy().astype(np.int32))]
    buffer = bytearray(layout.nbytes)
    view = memoryview(buffer)
    for offset, array in sections:
        raw = np.ascontiguousarray(array).tobytes()
        view[offset : offset + len(raw)] = raw
    return bytes(buffer)


def _checked_ids(ids: torch.Tensor, layout: ShardLayout) -> np.ndarray:
    array = ids.detach().cpu().numpy()
    limits = np.iinfo(layout.index_np)
    if array.size and (int(array.min()) < limits.min or int(array.max()) > limits.max):
        raise ValueError(f"token ids [{int(array.min())}, {int(array.max())}] do not fit {layout.index_dtype}")
    return array.astype(layout.index_np)


def decode_shard(data: np.ndarray | bytes, layout: ShardLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views (no copy) of a shard's stored arrays: (logprobs, indices, log_residual) in storage dtypes."""
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
    if raw.size != layout.nbytes:
        raise ValueError(f"shard has {raw.size} bytes, its layout needs {layout.nbytes}")

    def section(offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return raw[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)

    return (
        section(layout.logprobs_offset, layout.value_np, layout.values_shape),
        section(layout.indices_offset, layout.index_np, layout.logprobs_shape),
        section(layout.residual_offset, layout.value_np, layout.residual_shape),
    )


def decode_teacher_tokens(data: np.ndarray | bytes, layout: ShardLayout) -> tuple[np.ndarray, np.ndarray]:
    """Views of a cross-tokenizer shard's teacher ids ``[n, L]`` (id type) and real lengths ``[n]`` (int32)."""
    if not layout.token_rows:
        raise ValueError("only a cross-tokenizer shard stores the teacher's own ids")
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
    if raw.size != layout.nbytes:
        raise ValueError(f"shard has {raw.size} bytes, its layout needs {layout.nbytes}")
    n, width = layout.n_blocks, layout.block_size
    ids = raw[layout.tokens_offset : layout.tokens_offset + n * width * layout.index_np.itemsize]
    lengths = raw[layout.lengths_offset : layout.lengths_offset + n * 4]
    return ids.view(layout.index_np).reshape(n, width), lengths.view(np.int32)
