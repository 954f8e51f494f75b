"""Offline teacher cache: run the teacher once over a tokenized dataset, train students from disk.

Running a large teacher at every training step dominates the cost of white-box distillation; MiniPLM
(Gu et al. 2024, "MiniPLM: Knowledge Distillation for Pre-Training Language Models", arXiv:2410.17215)
and DistillKit do teacher inference once, offline. This module stores, for every position of every
training block, the teacher's top-k log-probabilities, their token ids and the probability mass left
outside the top-k, and serves them back as a :class:`~lmdistill.losses.SparseTeacher`, which every
objective accepts in place of dense teacher logits. The residual mass is shared among the V - k tokens
outside the top-k evenly by default (``teacher.tail: uniform``), or in proportion to the student's own
probabilities (``tail: student``: the divergence of the top-k plus one "rest" bucket, which teaches the
student how much mass lies outside the teacher's top-k but not how to shape it); see that class.

Four kinds of content (``mode`` in the plan and manifest; absent = ``topk``):

* ``lowrank`` (the ``lmdistill cache-teacher`` default): the teacher's final hidden state on its k principal
  directions, int8 codes and one scale per position, plus ``projection.safetensors`` (the directions and
  the teacher's output layer projected onto them). Training gets *dense* teacher logits back, so every
  objective accepts it at any temperature; its fidelity (held-out KL) is measured at build time and stored
  in the manifest. See :mod:`lmdistill.teachers.lowrank`.
* ``topk``: the k most likely tokens' log-probabilities and the log of the mass left outside them. Every
  objective accepts it, but it is a biased picture of the teacher (the student never sees the tail's shape).
* ``sampled``: k systematic draws from the teacher per position,
  stored as log(count / k) for the drawn ids (-inf fillers keep the ids distinct) and no residual: random-
  sampling KD (arXiv:2503.16870; see :func:`teacher_sampled`), an unbiased estimate of the teacher for
  objectives linear in its probabilities (forward KL, cross-entropy); training refuses other objectives.
  Draws are seeded per shard, so any number of processes writes the same bytes.
* ``hybrid``: the likely tokens' exact probabilities and systematic draws from the rest (threshold sampling,
  :func:`teacher_hybrid`); unbiased like ``sampled``, with less variance, same objectives.

Indexing
--------
The cache is indexed by (block, position) with the run's block segmentation: block i holds the
teacher's prediction at positions ``stream[i*L : i*L+L]`` (the same ``input_ids`` that
:class:`~lmdistill.data.blocks.BlockDataset` gives item i, run through the teacher as one sequence, as
a live teacher would see them). The trainer's batches carry ``block_index``, so a lookup is a gather.

Layout on disk
--------------
::

    CACHE/
      manifest.json        written last: its presence marks a complete cache
      plan.json            what is being built (teacher identity and weights hash, tokenizer
                           fingerprint, data stream key, block size, k, temperature, dtypes, sharding)
      tokenizer/           the teacher's tokenizer (runs that name no tokenizer use it)
      projection.safetensors  (lowrank only) principal directions and projected output layer
      shard-00000.bin      blocks [0, N): logprobs [n, L, k] | token ids [n, L, k] | log residual [n, L]
                           (lowrank: no logprobs | int8 codes [n, L, k] | scale [n, L])
      shard-00000.json     that shard's size and SHA-256 (written after the .bin)
      ...

Per token: k log-probabilities in float16 (or bfloat16 / float32), k token ids in the smallest unsigned
integer type that holds the vocabulary (uint8 / uint16 / uint32), and the log of the residual mass in
the value dtype (log space keeps small residuals precise in 16 bits; -inf when k = V). The default
k = 32 with float16 and uint16 ids costs 32*2 + 32*2 + 2 = 130 bytes per token at any vocabulary up to
65,536 tokens, against 2*V bytes for dense float16 logits (65,536 bytes at V = 32k). A low-rank cache
stores k int8 codes and a float16 scale: k + 2 bytes per token (130 at its default k = 128), at any vocabulary.

Robustness: each shard is written to a temporary file and renamed into place, then its checksum file
is written the same way; a killed run restarted with the same plan skips every shard whose checksum
file exists and whose bytes still match it. Several processes (``torchrun``) each take the shards
``s`` with ``s % world_size == rank``; the output does not depend on the number of processes because
every shard is computed from the same blocks in the same forward batches. Readers memory-map the
shards and verify their sizes and checksums before use; a cache whose manifest does not match the
run's data stream, tokenizer or block size is refused with what differs and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmdistill.data.blocks import BlockDataset, TokenStream
from lmdistill.data.cache import atomic_write_bytes, publish_directory
from lmdistill.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from lmdistill.errors import ConfigError, DataError, LmdistillError
from lmdistill.losses.signals import DENSE, LOWRANK, SAMPLED, TAIL_SHAPES, TOPK, LowRankCodes, SparseTeacher
from lmdistill.teachers.base import TeacherBase
from lmdistill.teachers.lowrank import (
    PROJECTION_NAME,
    LowRankProjection,
    build_projection,
    final_hidden,
    native_bf16_matmul,
    projection_metadata,
)

log = logging.getLogger(__name__)

LOGITS_DTYPES = ("auto", "float32", "bfloat16")  # a low-rank cache's logits product (TeacherCache.logits_layer)

CACHE_FORMAT = 1  # bump when the layout or the meaning of a stored value changes
CACHE_KIND = "lmdistill-teacher-cache"
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
TOKENIZER_DIR = "tokenizer"
_SECTION_ALIGN = 64  # each array of a shard starts on a 64-byte boundary
_HASH_CHUNK = 1 << 22

ValueDtype = Literal["float16", "bfloat16", "float32"]
VALUE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# numpy has no bfloat16: its bits are stored as uint16 and reinterpreted by torch.
_NUMPY_STORAGE: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "float32": np.dtype(np.float32),
}

# The plan entries a resumed or reused build must match, with a name for error messages.
_PLAN_KEYS = {
    "format": "cache format",
    "teacher.weights_sha256": "teacher weights",
    "teacher.dtype": "teacher dtype",
    "tokenizer_fingerprint": "tokenizer",
    "data.stream_key": "data stream",
    "block_size": "block size",
    "n_blocks": "number of blocks",
    "k": "k (top-k entries per token)",
    "temperature": "temperature",
    "dtype": "value dtype",
    "index_dtype": "token id dtype",
    "blocks_per_shard": "blocks per shard",
    "derived_from.k": "k of the cache it was derived from",
}


# ----------------------------------------------------------------------------------------- format
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
    def nbytes(self) -> int:
        return self.residual_offset + math.prod(self.residual_shape) * self.value_np.itemsize

    @staticmethod
    def bytes_per_token(k: int, value_dtype: str, index_dtype_name: str, value_count: int | None = None) -> int:
        """Stored bytes per token, padding excluded: k values + k ids + 1 log residual (low-rank: k codes + 1 scale)."""
        value = _NUMPY_STORAGE[value_dtype].itemsize
        values = k if value_count is None else value_count
        return values * value + k * np.dtype(index_dtype_name).itemsize + value


def _to_storage(values: torch.Tensor, value_dtype: str) -> np.ndarray:
    """A float tensor cast to the value dtype, as the numpy array whose bytes are stored."""
    cast = values.detach().to("cpu", VALUE_DTYPES[value_dtype]).contiguous()
    if value_dtype == "bfloat16":
        return cast.view(torch.uint16).numpy()
    return cast.numpy()


def _from_storage(array: np.ndarray, value_dtype: str) -> torch.Tensor:
    """Stored values (numpy) as a torch tensor of the value dtype (no copy when ``array`` is writable)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if value_dtype == "bfloat16" else tensor


def encode_shard(logprobs: torch.Tensor, indices: torch.Tensor, log_residual: torch.Tensor, layout: ShardLayout) -> bytes:
    """The bytes of one shard file from ``logprobs`` / ``indices`` ``[n, L, k]`` and ``log_residual`` ``[n, L]``."""
    if tuple(logprobs.shape) != layout.values_shape or tuple(indices.shape) != layout.logprobs_shape:
        raise ValueError(f"shard arrays {tuple(logprobs.shape)}/{tuple(indices.shape)} do not match "
                         f"{layout.values_shape}/{layout.logprobs_shape}")
    if tuple(log_residual.shape) != layout.residual_shape:
        raise ValueError(f"log_residual {tuple(log_residual.shape)} does not match {layout.residual_shape}")
    ids = indices.detach().cpu().numpy()
    limits = np.iinfo(layout.index_np)
    if ids.size and (int(ids.min()) < limits.min or int(ids.max()) > limits.max):
        raise ValueError(f"token ids [{int(ids.min())}, {int(ids.max())}] do not fit {layout.index_dtype}")
    buffer = bytearray(layout.nbytes)
    view = memoryview(buffer)
    for offset, array in (
        (layout.logprobs_offset, _to_storage(logprobs, layout.value_dtype)),
        (layout.indices_offset, ids.astype(layout.index_np)),
        (layout.residual_offset, _to_storage(log_residual, layout.value_dtype)),
    ):
        raw = np.ascontiguousarray(array).tobytes()
        view[offset : offset + len(raw)] = raw
    return bytes(buffer)


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes, bytes) in name order: the teacher's identity
    as far as its outputs are concerned, independent of how its files were written."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _get(mapping: dict[str, Any], dotted: str) -> Any:
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def plan_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Human-readable differences between two cache plans (only the entries that decide the content)."""
    out = []
    for key, label in _PLAN_KEYS.items():
        a, b = _get(expected, key), _get(found, key)
        if a != b:
            out.append(f"{label}: existing {b!r}, requested {a!r}")
    return out


def plan_content_sha256(plan: dict[str, Any]) -> str:
    """Hash of the plan entries that decide the stored bytes (not the teacher's path or the corpus name,
    so a moved teacher directory does not invalidate finished shards)."""
    return hashlib.sha256(_json_bytes({key: _get(plan, key) for key in _PLAN_KEYS})).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the {what}: {exc}", path=path, hint="rerun `lmdistill cache-teacher` to rebuild it") from None


# ------------------------------------------------------------------------------------------ writer
def teacher_top_k(
    model: torch.nn.Module, input_ids: torch.Tensor, *, k: int, temperature: float, vocab_size: int, row_chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k of ``log_softmax(logits / T)`` over the real vocabulary, with the log of the
    mass outside the top-k, for ``input_ids`` ``[B, L]``: ``(logprobs [B, L, k] float32, ids [B, L, k]
    int64, log_residual [B, L] float32)``. The residual is summed over the complement directly (a
    log-sum-exp, not ``1 - sum``, which would cancel); it is -inf when k equals the vocabulary."""
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[..., :vocab_size]
        b, length, _ = logits.shape
        flat = logits.reshape(b * length, vocab_size)
        tops, ids, residuals = [], [], []
        for start in range(0, flat.shape[0], row_chunk):  # bounds the float32 copies at row_chunk x V
            logp = torch.log_softmax(flat[start : start + row_chunk].float() / temperature, dim=-1)
            top, idx = torch.topk(logp, k, dim=-1, sorted=True)
            if k < vocab_size:
                residual = torch.logsumexp(logp.scatter_(-1, idx, float("-inf")), dim=-1)
            else:
                residual = torch.full(top.shape[:-1], float("-inf"), dtype=top.dtype, device=top.device)
            tops.append(top)
            ids.append(idx)
            residuals.append(residual)
        return (
            torch.cat(tops).reshape(b, length, k).cpu(),
            torch.cat(ids).reshape(b, length, k).cpu(),
            torch.cat(residuals).reshape(b, length).cpu(),
        )


def _probability_rows(model: torch.nn.Module, input_ids: torch.Tensor, temperature: float, vocab_size: int,
                      row_chunk: int) -> Iterable[torch.Tensor]:
    """The teacher's float64 ``softmax(logits / T)`` over the real vocabulary for ``input_ids`` ``[B, L]``,
    flattened to rows and yielded ``row_chunk`` rows at a time (bounds the float64 copies)."""
    logits = model(input_ids=input_ids).logits[..., :vocab_size]
    flat = logits.reshape(-1, vocab_size)
    for start in range(0, flat.shape[0], row_chunk):
        yield torch.softmax(flat[start : start + row_chunk].double() / temperature, dim=-1).cpu()


def teacher_sampled(
    model: torch.nn.Module, input_ids: torch.Tensor, *, k: int, temperature: float, vocab_size: int,
    generator: torch.Generator, row_chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random-sampling KD signal (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs", arXiv:2503.16870): ``k`` tokens drawn from the teacher's ``softmax(logits / T)``
    per position, stored as the distinct drawn ids with log(count / k) (ids that were not drawn fill the
    remaining slots with -inf, so the ids of a row stay distinct) and no residual.

    The empirical distribution of the draws is an unbiased estimate of the teacher's, so the forward-KL
    gradient ``(q - p_hat) / T`` equals the full teacher's in expectation, whereas a top-k cache is biased: it
    never shows the student the tokens outside the top-k (the proposal here is the teacher itself, so the
    importance weights are the counts). The k draws are *systematic* rather than independent (one uniform
    offset ``u``, points ``(u + i) / k`` through the teacher's cumulative distribution; Douc, Cappé & Moulines,
    "Comparison of Resampling Schemes for Particle Filtering", arXiv:cs/0507025): still unbiased, but every
    count is within 1 of ``k p_v``, so the likely tokens are nearly exact and only the tail is random.
    Same return layout as :func:`teacher_top_k`; the log residual is -inf.
    """
    with torch.no_grad():
        b, length = input_ids.shape
        tops, ids = [], []
        steps = torch.arange(k, dtype=torch.float64) / k
        for probs in _probability_rows(model, input_ids, temperature, vocab_size, row_chunk):
            cdf = probs.cumsum(-1)
            cdf /= cdf[:, -1:].clone()  # exactly 1 at the end, so every point falls on a token
            offset = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) / k
            draws = torch.searchsorted(cdf, offset + steps, right=True).clamp_(max=vocab_size - 1)
            counts = torch.zeros_like(probs).scatter_add_(-1, draws, torch.ones_like(draws, dtype=probs.dtype))
            top, idx = torch.topk(counts, k, dim=-1, sorted=True)  # distinct ids; drawn ones first
            tops.append(torch.log(top / k).float())  # log 0 = -inf for the filler ids
            ids.append(idx)
        residual = torch.full((b, length), float("-inf"))
        return torch.cat(tops).reshape(b, length, k), torch.cat(ids).reshape(b, length, k), residual


def hybrid_split(top: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``top`` (a row's k largest probabilities, sorted descending; float64) and ``rest`` (the
    mass outside them), the number h of head entries kept exactly and the threshold tau of
    :func:`teacher_hybrid`: the smallest h in [0, k) with ``top[h] <= tau_h = (mass from top[h] on) / (k - h)``.
    h = k - 1 always qualifies (the mass outside the top k - 1 is at least its largest entry), and the entries
    kept exactly all exceed tau. Tail masses are suffix sums, not 1 - head, which would cancel."""
    k = top.shape[-1]
    tail_mass = torch.flip(torch.cumsum(torch.flip(top, [-1]), -1), [-1]) + rest.unsqueeze(-1)
    tau = tail_mass / torch.arange(k, 0, -1, dtype=top.dtype, device=top.device)
    valid = top <= tau
    valid[..., -1] = True
    head = valid.to(torch.int8).argmax(-1)  # the first valid h
    return head, tau.gather(-1, head.unsqueeze(-1)).squeeze(-1)


def teacher_hybrid(
    model: torch.nn.Module, input_ids: torch.Tensor, *, k: int, temperature: float, vocab_size: int,
    generator: torch.Generator, row_chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact head + sampled tail: an unbiased k-entry estimate of the teacher with less variance than k draws.

    Per position, the h most likely tokens keep their exact probabilities and the remaining k - h slots go to
    systematic draws from the tail (the other tokens), each drawn token standing for ``tau = tail mass /
    (k - h)``; h is the smallest count for which every tail token's probability is at most tau (see
    :func:`hybrid_split`), so a tail token is drawn at most once, with probability p_v / tau. This is threshold
    sampling (Duffield, Lund & Thorup, "Learn more, sample less: control of volume and variance in network
    measurement", IEEE Trans. Inf. Theory 51(5), 2005; also "Priority sampling for estimation of arbitrary
    subset sums", arXiv:cs/0509026): every estimate ``p_hat_v`` is unbiased (``E[p_hat_v] = p_v``), sums to 1,
    and among unbiased estimators with k expected entries it minimises the total variance. Compared with k
    systematic draws (:func:`teacher_sampled`), likely tokens are exact instead of rounded to multiples of 1/k,
    and a peaked row fills all k slots instead of repeating its few likely tokens. Forward KL's gradient is the
    live teacher's in expectation, as with random-sampling KD (arXiv:2503.16870).
    Same return layout as :func:`teacher_top_k`; the log residual is -inf.
    """
    with torch.no_grad():
        b, length = input_ids.shape
        tops, ids = [], []
        slots = torch.arange(k, dtype=torch.float64)
        for probs in _probability_rows(model, input_ids, temperature, vocab_size, row_chunk):
            rows = probs.shape[0]
            top, top_ids = torch.topk(probs, k, dim=-1, sorted=True)
            rest = probs.scatter(-1, top_ids, 0.0).sum(-1)
            head, _ = hybrid_split(top, rest)
            in_head = slots.unsqueeze(0) < head.unsqueeze(-1)
            estimate = torch.zeros_like(probs).scatter_(-1, top_ids, torch.where(in_head, top, 0.0))
            tail = probs.scatter(-1, top_ids, torch.where(in_head, 0.0, top))  # head tokens removed
            cdf = tail.cumsum(-1)
            draws_wanted = k - head  # >= 1
            tau = cdf[:, -1] / draws_wanted  # the tail's own sum: the last point stays inside the tail
            offset = torch.rand(rows, 1, generator=generator, dtype=torch.float64)
            points = (offset + slots.unsqueeze(0)) * tau.unsqueeze(-1)
            draws = torch.searchsorted(cdf, points, right=True).clamp_(max=vocab_size - 1)
            used = (slots.unsqueeze(0) < draws_wanted.unsqueeze(-1)) & (tau.unsqueeze(-1) > 0)
            estimate.scatter_add_(-1, draws, torch.where(used, tau.unsqueeze(-1), 0.0).expand(rows, k))
            value, idx = torch.topk(estimate, k, dim=-1, sorted=True)  # distinct ids; unused slots are 0
            tops.append(torch.log(value).float())
            ids.append(idx)
        residual = torch.full((b, length), float("-inf"))
        return torch.cat(tops).reshape(b, length, k), torch.cat(ids).reshape(b, length, k), residual


CACHE_MODES = ("topk", "sampled", "hybrid", "lowrank")
# modes whose stored values are an unbiased estimate of the teacher (no residual; draws seeded per shard)
SAMPLING_MODES = ("sampled", "hybrid")


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


@dataclass
class WriteReport:
    """What one process did: shards computed and skipped (already complete), tokens, time."""

    output: Path
    rank: int
    world_size: int
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    tokens_written: int = 0
    seconds: float = 0.0
    complete: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_written / self.seconds if self.seconds > 0 else 0.0


class _CacheDirectory:
    """Shard bookkeeping shared by the writer and :func:`shrink_teacher_cache`."""

    def __init__(self, output: Path, plan: dict[str, Any]) -> None:
        self.output = Path(output)
        self.plan = plan
        self.plan_sha256 = plan_content_sha256(plan)
        # what else a shard was computed with (a low-rank cache's projection): a shard recorded with other
        # inputs is recomputed on resume
        self.inputs: dict[str, str] = {}

    def layout(self, shard: int) -> ShardLayout:
        first = shard * self.plan["blocks_per_shard"]
        n = min(self.plan["blocks_per_shard"], self.plan["n_blocks"] - first)
        return ShardLayout(n, self.plan["block_size"], self.plan["k"], self.plan["dtype"], self.plan["index_dtype"],
                           self.plan.get("value_count"))

    def check_existing(self) -> bool:
        """Refuse an output holding a different cache; True when this plan is already complete."""
        manifest = self.output / MANIFEST_NAME
        plan_file = self.output / PLAN_NAME
        for path in (manifest, plan_file):
            if path.exists():
                found = _read_json(path, "existing cache plan")
                diffs = plan_differences(self.plan, found)
                if diffs:
                    raise ConfigError(
                        f"{self.output} already holds a teacher cache of a different configuration ("
                        + "; ".join(diffs)
                        + "). Choose another output directory, or delete this one to rebuild it."
                    )
                if path == manifest:
                    return True
        if self.output.exists() and not plan_file.exists() and any(self.output.iterdir()):
            raise ConfigError(
                f"{self.output} exists and is not a teacher cache (no {PLAN_NAME}); choose an empty or new output directory"
            )
        return False

    def start(self, tokenizer: Any | None, write_shared: bool) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        if write_shared:
            if tokenizer is not None and not (self.output / TOKENIZER_DIR / "tokenizer_config.json").exists():
                tmp = Path(tempfile.mkdtemp(dir=self.output, prefix=f".{TOKENIZER_DIR}-tmp-"))
                tokenizer.save_pretrained(tmp)
                publish_directory(tmp, self.output / TOKENIZER_DIR)
            if not (self.output / PLAN_NAME).exists():
                atomic_write_bytes(self.output / PLAN_NAME, _json_bytes(self.plan))

    def shard_record(self, shard: int, verify: bool) -> dict[str, Any] | None:
        """The checksum record of a finished shard; None when the shard must be (re)computed."""
        meta_path = self.output / f"{_shard_name(shard)}.json"
        bin_path = self.output / f"{_shard_name(shard)}.bin"
        if not meta_path.exists() or not bin_path.exists():
            return None
        try:
            record = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        stale = any(record.get(key) != value for key, value in self.inputs.items())
        if record.get("plan_sha256") != self.plan_sha256 or stale or bin_path.stat().st_size != record.get("bytes"):
            log.warning("teacher cache: %s does not match its checksum record; recomputing it", bin_path.name)
            return None
        if verify and file_sha256(bin_path) != record.get("sha256"):
            log.warning("teacher cache: %s fails its checksum; recomputing it", bin_path.name)
            return None
        return record

    def write_shard(self, shard: int, logprobs: torch.Tensor, indices: torch.Tensor, log_residual: torch.Tensor) -> dict[str, Any]:
        layout = self.layout(shard)
        data = encode_shard(logprobs, indices, log_residual, layout)
        name = _shard_name(shard)
        # The .bin lands atomically first, then its checksum record: a record always describes a whole file.
        atomic_write_bytes(self.output / f"{name}.bin", data)
        record = {
            "file": f"{name}.bin",
            "shard": shard,
            "first_block": shard * self.plan["blocks_per_shard"],
            "n_blocks": layout.n_blocks,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "plan_sha256": self.plan_sha256,
            **self.inputs,
        }
        atomic_write_bytes(self.output / f"{name}.json", _json_bytes(record))
        return record

    def finalize(self) -> Path:
        records = []
        missing = []
        for shard in range(self.plan["n_shards"]):
            record = self.shard_record(shard, verify=False)  # fresh or verified on this run's resume check
            if record is None:
                missing.append(_shard_name(shard))
            else:
                records.append({k: record[k] for k in ("file", "first_block", "n_blocks", "bytes", "sha256")})
        if missing:
            raise LmdistillError(
                f"teacher cache {self.output}: shards {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                "are not finished; rerun the same command to complete them"
            )
        bpt = ShardLayout.bytes_per_token(self.plan["k"], self.plan["dtype"], self.plan["index_dtype"],
                                          self.plan.get("value_count"))
        extra = {}
        if self.plan.get("mode") == "lowrank":  # its hash was taken when the shards' writers loaded it
            metadata = projection_metadata(self.output / PROJECTION_NAME)
            extra["projection"] = {"file": PROJECTION_NAME, "sha256": self.inputs["projection_sha256"], **metadata}
        manifest = {
            **self.plan,
            **extra,
            "shards": records,
            "bytes_per_token": bpt,
            "total_bytes": sum(r["bytes"] for r in records),
        }
        atomic_write_bytes(self.output / MANIFEST_NAME, _json_bytes(manifest))
        remove_partial_files(self.output)  # leftovers of killed runs; every writer has finished here
        return self.output / MANIFEST_NAME


def build_plan(
    *,
    model: torch.nn.Module,
    model_name: str,
    model_dtype: str,
    tokenizer: Any,
    stream: TokenStream,
    block_size: int,
    k: int,
    temperature: float,
    dtype: str,
    blocks_per_shard: int,
    split: str,
    corpus: str | None,
    vocab_size: int,
    mode: str = "topk",
    seed: int = 0,
) -> dict[str, Any]:
    """Everything that decides a cache's content, recorded in its plan and manifest."""
    if dtype not in VALUE_DTYPES:
        raise ConfigError(f"cache dtype must be one of {', '.join(VALUE_DTYPES)}, got {dtype!r}")
    if not 1 <= k <= vocab_size:
        raise ConfigError(f"cache k must be between 1 and the vocabulary size {vocab_size}, got {k}")
    if mode == "lowrank":
        hidden = model.get_output_embeddings().weight.shape[1]
        if k > hidden:
            raise ConfigError(f"cache k (principal components of a lowrank cache) must be at most the teacher's hidden "
                              f"size {hidden}, got {k}; k = {hidden} keeps the whole hidden state (int8-rounded)")
    if not temperature > 0:
        raise ConfigError(f"cache temperature must be > 0, got {temperature}")
    if mode not in CACHE_MODES:
        raise ConfigError(f"cache mode must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
    if blocks_per_shard < 1:
        raise ConfigError(f"blocks_per_shard must be at least 1, got {blocks_per_shard}")
    n_blocks = len(BlockDataset(stream, block_size))
    config = getattr(model, "config", None)
    sampling = {"mode": mode, "seed": int(seed)} if mode in SAMPLING_MODES else {}  # top-k plans stay as before
    if mode == "lowrank":  # k int8 codes and a scale per token, no log-probabilities
        sampling = {"mode": mode, "value_count": 0}
    return {
        **sampling,
        "format": CACHE_FORMAT,
        "kind": CACHE_KIND,
        "teacher": {
            "name": model_name,
            "model_type": getattr(config, "model_type", type(model).__name__),
            "weights_sha256": model_weights_sha256(model),
            "dtype": model_dtype,
            "n_parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        },
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": int(vocab_size),
        "data": {"stream_key": stream.key, "n_tokens": int(stream.n_tokens), "split": split, "corpus": corpus},
        "block_size": int(block_size),
        "n_blocks": int(n_blocks),
        "k": int(k),
        "temperature": float(temperature),
        "dtype": dtype,
        "index_dtype": "int8" if mode == "lowrank" else index_dtype(vocab_size).name,
        "blocks_per_shard": int(blocks_per_shard),
        "n_shards": math.ceil(n_blocks / blocks_per_shard),
    }


def write_teacher_cache(
    output: str | Path,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    stream: TokenStream,
    block_size: int,
    k: int = 32,
    temperature: float = 1.0,
    dtype: str = "float16",
    mode: str = "topk",
    seed: int = 0,
    blocks_per_shard: int = 256,
    batch_size: int = 16,
    model_name: str = "",
    model_dtype: str = "float32",
    split: str = "train",
    corpus: str | None = None,
    vocab_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    device: torch.device | str | None = None,
    verify_existing: bool = True,
    show_progress: bool = False,
    on_shard_written: Callable[[int], None] | None = None,
) -> WriteReport:
    """Run ``model`` over every block of ``stream`` and store its top-k signal in ``output``.

    Process ``rank`` of ``world_size`` computes the shards ``s % world_size == rank``; ``barrier``
    (e.g. ``accelerate.PartialState().wait_for_everyone``) must be given when ``world_size > 1``. After
    the barrier rank 0 writes the manifest. Shards already finished under the same plan are skipped
    (their bytes re-verified when ``verify_existing``); an output holding a different plan is refused.
    ``on_shard_written(shard)`` is called after each shard is durable (tests use it to interrupt a run).
    """
    if world_size > 1 and barrier is None:
        raise ValueError("write_teacher_cache: several processes need a barrier")
    vocab = int(vocab_size or len(tokenizer))
    plan = build_plan(
        model=model, model_name=model_name, model_dtype=model_dtype, tokenizer=tokenizer, stream=stream,
        block_size=block_size, k=k, temperature=temperature, dtype=dtype, blocks_per_shard=blocks_per_shard,
        split=split, corpus=corpus, vocab_size=vocab, mode=mode, seed=seed,
    )
    directory = _CacheDirectory(Path(output), plan)
    report = WriteReport(output=Path(output), rank=rank, world_size=world_size)
    complete = directory.check_existing()
    if barrier is not None:
        barrier()  # every process has inspected the output before any of them writes to it
    if complete:
        report.shards_skipped = list(range(rank, plan["n_shards"], world_size))
        report.complete = True
        return report
    directory.start(tokenizer, write_shared=(rank == 0))
    model = model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ids = stream.ids
    projection = None
    if mode == "lowrank":
        projection_file = Path(output) / PROJECTION_NAME
        if rank == 0 and not projection_file.exists():  # a resumed run keeps the projection its shards used
            fitted, metadata = build_projection(
                model, ids, plan["n_blocks"], block_size, k, vocab, temperature, VALUE_DTYPES[dtype], batch_size, device
            )
            atomic_write_bytes(projection_file, fitted.to_bytes(metadata))
    if barrier is not None:
        barrier()
    if mode == "lowrank":
        data = projection_file.read_bytes()  # every rank encodes with the same bytes
        projection = LowRankProjection.from_bytes(data)
        directory.inputs["projection_sha256"] = hashlib.sha256(data).hexdigest()
    mine = list(range(rank, plan["n_shards"], world_size))
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with tqdm(total=len(mine), desc=f"teacher cache (rank {rank})", unit="shard", disable=not show_progress) as bar:
        for shard in mine:
            if directory.shard_record(shard, verify=verify_existing) is not None:
                report.shards_skipped.append(shard)
                bar.update(1)
                continue
            layout = directory.layout(shard)
            first = shard * blocks_per_shard
            logprobs = torch.empty(layout.values_shape, dtype=torch.float32)
            indices = torch.empty(layout.logprobs_shape, dtype=torch.int64)
            log_residual = torch.empty(layout.residual_shape, dtype=torch.float32)
            # one generator per shard, seeded by the shard: any process count draws the same tokens
            generator = torch.Generator().manual_seed(seed * 1_000_003 + shard) if mode in SAMPLING_MODES else None
            # Forward batches always start at the shard's first block, whatever the process count:
            # the same blocks in the same batches give bit-identical shards.
            for offset in range(0, layout.n_blocks, batch_size):
                n = min(batch_size, layout.n_blocks - offset)
                begin = (first + offset) * block_size
                window = np.asarray(ids[begin : begin + n * block_size], dtype=np.int64).reshape(n, block_size)
                inputs = torch.from_numpy(window).to(device)
                if projection is not None:
                    top = logprobs[:0]  # no values; the codes and scales take the other two sections
                    idx, res = projection.encode(final_hidden(model, inputs).float().cpu())
                elif generator is None:
                    top, idx, res = teacher_top_k(model, inputs, k=k, temperature=temperature, vocab_size=vocab)
                else:
                    sample = teacher_sampled if mode == "sampled" else teacher_hybrid
                    top, idx, res = sample(
                        model, inputs, k=k, temperature=temperature, vocab_size=vocab, generator=generator
                    )
                if top.numel():
                    logprobs[offset : offset + n] = top
                indices[offset : offset + n] = idx
                log_residual[offset : offset + n] = res
            directory.write_shard(shard, logprobs, indices, log_residual)
            report.shards_written.append(shard)
            report.tokens_written += layout.n_blocks * block_size
            bar.update(1)
            if on_shard_written is not None:
                on_shard_written(shard)
    report.seconds = time.perf_counter() - start
    if barrier is not None:
        barrier()
    if rank == 0:
        directory.finalize()
    if barrier is not None:
        barrier()
    report.complete = True
    log.info(
        "teacher cache %s: rank %d wrote %d shard(s), skipped %d, %.0f tokens/s",
        output, rank, len(report.shards_written), len(report.shards_skipped), report.tokens_per_second,
    )
    return report


# ------------------------------------------------------------------------------------------ reader
VerifyMode = Literal["open", "first_use"]


class TeacherCache(TeacherBase):
    """A finished teacher cache, memory-mapped. Acts as the trainer's teacher: ``signal(batch)`` and
    ``chunked_signal(batch)`` give the :class:`~lmdistill.losses.SparseTeacher` of the batch's blocks.

    ``verify``: ``"open"`` checks every shard's SHA-256 when the cache is opened; ``"first_use"``
    checks each shard the first time a block of it is read (for caches too large to hash up front).
    Sizes are always checked at open, so a truncated shard fails immediately either way.
    """

    def __init__(self, path: str | Path, *, verify: VerifyMode = "open", tail: str = "uniform",
                 logits_dtype: str = "auto") -> None:
        if verify not in ("open", "first_use"):
            raise ConfigError(f"verify must be 'open' or 'first_use', got {verify!r}")
        if tail not in TAIL_SHAPES:
            raise ConfigError(f"tail must be one of {', '.join(TAIL_SHAPES)}, got {tail!r}")
        if logits_dtype not in LOGITS_DTYPES:
            raise ConfigError(f"logits_dtype must be one of {', '.join(LOGITS_DTYPES)}, got {logits_dtype!r}")
        self.tail = tail  # how the losses share the residual mass (see SparseTeacher)
        self.logits_dtype = logits_dtype  # a low-rank cache's logits product (see logits_layer)
        self._layers: dict[torch.device, tuple[torch.dtype, torch.Tensor, torch.Tensor]] = {}
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.exists():
            hint = (
                "an unfinished `lmdistill cache-teacher` run: rerun the same command to complete it"
                if (self.path / PLAN_NAME).exists()
                else "build one with `lmdistill cache-teacher CONFIG`"
            )
            raise DataError(f"not a complete teacher cache: {MANIFEST_NAME} is missing", path=self.path, hint=hint)
        self.manifest = _read_json(manifest_path, "teacher cache manifest")
        if self.manifest.get("kind") != CACHE_KIND or self.manifest.get("format") != CACHE_FORMAT:
            raise DataError(
                f"unsupported teacher cache (kind {self.manifest.get('kind')!r}, format {self.manifest.get('format')!r}; "
                f"this lmdistill reads {CACHE_KIND!r} format {CACHE_FORMAT})",
                path=manifest_path,
                hint="rebuild it with this version's `lmdistill cache-teacher`",
            )
        m = self.manifest
        self.k: int = m["k"]
        self.block_size: int = m["block_size"]
        self.n_blocks: int = m["n_blocks"]
        self.blocks_per_shard: int = m["blocks_per_shard"]
        self.vocab_size: int = m["vocab_size"]
        self.temperature: float = m["temperature"]
        self.mode: str = m.get("mode", "topk")  # caches from before sampling existed are top-k
        self.value_dtype: str = m["dtype"]
        self._verified: set[int] = set()
        self._shards: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
        records = m["shards"]
        if len(records) != m["n_shards"]:
            raise DataError(f"the manifest lists {len(records)} shards, expected {m['n_shards']}", path=manifest_path,
                            hint="rebuild the cache")
        for shard, record in enumerate(records):
            file = self.path / record["file"]
            if not file.exists():
                raise DataError(f"teacher cache shard {record['file']} is missing", path=file,
                                hint="rerun `lmdistill cache-teacher` with the same config to rebuild it")
            size = file.stat().st_size
            if size != record["bytes"]:
                raise DataError(
                    f"teacher cache shard {record['file']} is truncated or damaged: {size} bytes, the manifest says {record['bytes']}",
                    path=file,
                    hint=f"delete {file.name} and {file.with_suffix('.json').name}, then rerun `lmdistill cache-teacher` with the same config to rebuild it",
                )
            self._shards.append(None)
        if verify == "open":
            for shard in range(len(records)):
                self._verify(shard)
        self.projection: LowRankProjection | None = None
        if self.mode == "lowrank":
            self.projection = self._load_projection()
        self.description = f"the {self.mode} cache {self.path} (teacher.cache; cache.mode: {self.mode})"
        self.signal_kinds = frozenset({DENSE, LOWRANK} if self.mode == "lowrank" else
                                      {SAMPLED} if self.mode in SAMPLING_MODES else {TOPK})

    def refusal_advice(self, kind: str) -> str:
        if kind == SAMPLED:
            # random-sampling KD / threshold sampling estimate the teacher without bias only for objectives linear
            # in its probabilities (reverse KL would even be infinite: every undrawn token has probability 0)
            return (f"need a top-k cache (cache.mode: topk) or a live teacher (teacher.path): a {self.mode} cache is an "
                    "unbiased estimate only for forward_kl, cross_entropy (and mixes of them)")
        return super().refusal_advice(kind)

    def _load_projection(self) -> LowRankProjection:
        """A low-rank cache's projection (always checked against the manifest's checksum: it is small)."""
        record = self.manifest.get("projection") or {}
        file = self.path / record.get("file", PROJECTION_NAME)
        hint = "rerun `lmdistill cache-teacher` with the same config into a new directory to rebuild the cache"
        if not file.exists():
            raise DataError(f"the low-rank cache's projection {file.name} is missing", path=file, hint=hint)
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise DataError(f"the low-rank cache's projection {file.name} is corrupt (SHA-256 differs from the manifest)",
                            path=file, hint=hint)
        return LowRankProjection.from_bytes(data)

    # -- shards -------------------------------------------------------------------------------------
    def _verify(self, shard: int) -> None:
        if shard in self._verified:
            return
        record = self.manifest["shards"][shard]
        file = self.path / record["file"]
        if file_sha256(file) != record["sha256"]:
            raise DataError(
                f"teacher cache shard {record['file']} is corrupt (SHA-256 differs from the manifest)",
                path=file,
                hint=f"delete {file.name} and {file.with_suffix('.json').name}, then rerun `lmdistill cache-teacher` with the same config to rebuild it",
            )
        self._verified.add(shard)

    def _layout(self, shard: int) -> ShardLayout:
        n = self.manifest["shards"][shard]["n_blocks"]
        return ShardLayout(n, self.block_size, self.k, self.value_dtype, self.manifest["index_dtype"],
                           self.manifest.get("value_count"))

    def shard_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Memory-mapped (logprobs, indices, log_residual) of one shard, in storage dtypes."""
        arrays = self._shards[shard]
        if arrays is None:
            self._verify(shard)
            layout = self._layout(shard)
            raw = np.memmap(self.path / self.manifest["shards"][shard]["file"], dtype=np.uint8, mode="r", shape=(layout.nbytes,))
            arrays = decode_shard(raw, layout)
            self._shards[shard] = arrays
        return arrays

    def block(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored arrays of block ``index``: logprobs ``[L, k]``, ids ``[L, k]``, log residual ``[L]``."""
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} is outside the cache's {self.n_blocks} blocks")
        shard, local = divmod(int(index), self.blocks_per_shard)
        logprobs, indices, residual = self.shard_arrays(shard)
        return logprobs[local], indices[local], residual[local]

    # -- teacher interface ----------------------------------------------------------------------------
    def _blocks(self, block_indices: Iterable[int] | torch.Tensor) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if isinstance(block_indices, torch.Tensor):
            block_indices = block_indices.reshape(-1).tolist()
        parts = [self.block(int(i)) for i in block_indices]
        if not parts:
            raise ValueError("lookup needs at least one block index")
        return parts

    def coordinates(self, block_indices: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """A low-rank cache's dequantised coordinates of the given blocks, ``[len(blocks) * L, k]`` float32: the
        "hidden states" that :attr:`projection` ``.weight`` / ``.bias`` turn into teacher logits."""
        if self.projection is None:
            raise LmdistillError(f"{self.path} is a {self.mode} cache; coordinates() needs a lowrank cache")
        parts = self._blocks(block_indices)
        codes = torch.from_numpy(np.stack([p[1] for p in parts])).reshape(-1, self.k)  # int8, dequantised below
        scale = _from_storage(np.stack([p[2] for p in parts]), self.value_dtype).reshape(-1)
        return self.projection.coordinates(codes, scale)

    def logits_layer(self, device: torch.device | str = "cpu") -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
        """A low-rank cache's ``(dtype, weight [V, k], bias [V])`` on ``device``: the projected output layer in the
        dtype of the product that rebuilds the teacher's logits (:attr:`logits_dtype`; ``"auto"`` = bfloat16
        where ``device`` multiplies it natively, else float32).

        Why bfloat16: the product has the size of the student's output layer, and with the compiled losses it
        is most of a cached step's extra time (float32 [256, 128] @ [128, 8192] with the bias: 4.2 ms per chunk,
        bfloat16 1.8 ms, on this project's AVX512-BF16 CPU). The price is rounding: bfloat16 keeps 8
        significant bits, and rounding the result dominates (the product accumulates in float32). On the bench
        cache (bench/cache.py, k = 128) it adds a mean KL of about 4e-5 nats per token against the float32
        product, of the order of the projection's own error recorded in the manifest (``projection.fidelity``,
        6e-5 there); ``bench/cache.py`` prints both and the students' perplexities. ``float32`` rules it out."""
        if self.projection is None:
            raise LmdistillError(f"{self.path} is a {self.mode} cache; logits_layer() needs a lowrank cache")
        device = torch.device(device)
        layer = self._layers.get(device)
        if layer is None:  # resolved and converted once per device, not per step
            bf16 = self.logits_dtype == "bfloat16" or (self.logits_dtype == "auto" and native_bf16_matmul(device))
            dtype = torch.bfloat16 if bf16 else torch.float32
            layer = self._layers[device] = (dtype, self.projection.weight.to(device, dtype),
                                            self.projection.bias.to(device, dtype))
        return layer

    def block_logits(self, block_indices: Iterable[int] | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense teacher logits ``[len(blocks) * L, V]`` of a low-rank cache on ``device``, in the dtype of
        :meth:`logits_layer`. (Not named ``logits``: a teacher with ``logits(input_ids)`` is taken for a live
        model, e.g. for teacher agreement in evaluation.)"""
        dtype, weight, bias = self.logits_layer(device)
        z = self.coordinates(block_indices).to(device, dtype)
        return torch.nn.functional.linear(z, weight, bias)

    def lookup(self, block_indices: Iterable[int] | torch.Tensor) -> SparseTeacher:
        """The sparse teacher of the given blocks, flattened to ``[len(blocks) * L, k]`` rows."""
        if self.projection is not None:
            raise LmdistillError(f"{self.path} is a lowrank cache: it stores no log-probabilities; use block_logits()")
        parts = self._blocks(block_indices)
        logprobs = _from_storage(np.stack([p[0] for p in parts]), self.value_dtype).reshape(-1, self.k)
        indices = torch.from_numpy(np.stack([p[1] for p in parts]).astype(np.int64)).reshape(-1, self.k)
        log_residual = _from_storage(np.stack([p[2] for p in parts]), self.value_dtype).reshape(-1)
        residual = log_residual.float().exp()  # exp(-inf) = 0 when k = V
        return SparseTeacher(logprobs, indices, residual, self.temperature, self.tail, sampled=self.mode in SAMPLING_MODES)

    def signal(self, batch: dict[str, torch.Tensor]) -> SparseTeacher | torch.Tensor:
        """Teacher signal for a training batch (rows in the student's flattened [B*L] order): a sparse teacher,
        or dense logits ``[B*L, V]`` from a low-rank cache."""
        self._check_batch(batch)
        if self.projection is not None:
            return self.block_logits(batch["block_index"], batch["input_ids"].device)
        return self.lookup(batch["block_index"]).to(batch["input_ids"].device)

    def chunked_signal(self, batch: dict[str, torch.Tensor]) -> SparseTeacher | LowRankCodes:
        """For the chunked loss path: the sparse teacher as is, or a low-rank cache's ``(coordinates [B*L, k],
        weight [V, k], bias [V])``, from which the loss builds teacher logits chunk by chunk (as from a live
        teacher's hidden states)."""
        if self.projection is None:
            return self.signal(batch)
        self._check_batch(batch)
        device = batch["input_ids"].device
        dtype, weight, bias = self.logits_layer(device)
        return LowRankCodes(self.coordinates(batch["block_index"]).to(device, dtype), weight, bias)

    def _check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        if "block_index" not in batch:
            raise LmdistillError(
                "a teacher cache is looked up by block, but this batch has no 'block_index': the cache works "
                "with the packed-block data source only (use a live teacher, teacher.path, for other sources)"
            )
        input_ids = batch["input_ids"]
        if input_ids.shape[-1] != self.block_size:
            raise LmdistillError(
                f"batch blocks have {input_ids.shape[-1]} positions, the teacher cache {self.block_size}; "
                f"set data.block_size: {self.block_size}"
            )

    # -- compatibility --------------------------------------------------------------------------------
    def mismatches(self, *, stream: TokenStream | None = None, tokenizer: Any | None = None,
                   block_size: int | None = None) -> list[str]:
        """What differs between this cache and a run (empty when it fits)."""
        m = self.manifest
        out = []
        if tokenizer is not None:
            fp = tokenizer_fingerprint(tokenizer)
            if fp != m["tokenizer_fingerprint"]:
                out.append(
                    f"tokenizer: the cache was built with tokenizer {m['tokenizer_fingerprint'][:12]} (saved in "
                    f"{self.path / TOKENIZER_DIR}), this run uses {fp[:12]}; remove tokenizer.path from the run config "
                    "so the cache's tokenizer is used, or rebuild the cache with this tokenizer"
                )
        if stream is not None and stream.key != m["data"]["stream_key"]:
            d = m["data"]
            out.append(
                f"training data: the cache covers stream {d['stream_key']} (corpus {d.get('corpus')!r}, split "
                f"{d.get('split')!r}, {d['n_tokens']} tokens), this run trains on stream {stream.key} ({stream.n_tokens} "
                "tokens); use the cache's data.corpus and data.split_fractions, or rebuild the cache for this data"
            )
        if block_size is not None and block_size != self.block_size:
            out.append(
                f"block size: the cache was built with block_size {self.block_size}, this run uses {block_size}; "
                f"set data.block_size: {self.block_size}, or rebuild the cache with block_size {block_size}"
            )
        return out

    @property
    def bytes_per_token(self) -> int:
        return ShardLayout.bytes_per_token(self.k, self.value_dtype, self.manifest["index_dtype"],
                                           self.manifest.get("value_count"))

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.path)!r}, k={self.k}, mode={self.mode}, blocks={self.n_blocks}x{self.block_size}, "
                f"dtype={self.value_dtype}, {self.bytes_per_token} bytes/token)")


def open_teacher_cache(
    path: str | Path, *, stream: TokenStream, tokenizer: Any, block_size: int, verify: VerifyMode = "open",
    tail: str = "uniform", logits_dtype: str = "auto",
) -> TeacherCache:
    """Open a teacher cache for a training run, refusing one built for other data, another tokenizer or
    another block size (the message names each difference and how to fix it)."""
    cache = TeacherCache(path, verify=verify, tail=tail, logits_dtype=logits_dtype)
    problems = cache.mismatches(stream=stream, tokenizer=tokenizer, block_size=block_size)
    if problems:
        raise ConfigError(f"teacher cache {cache.path} does not match this run:\n  - " + "\n  - ".join(problems))
    return cache


def cache_tokenizer(path: str | Path):
    """The tokenizer a teacher cache was built with (stored inside it)."""
    path = Path(path)
    tok_dir = path / TOKENIZER_DIR
    if not (path / MANIFEST_NAME).exists() and not (path / PLAN_NAME).exists():
        raise DataError("not a teacher cache (no manifest.json)", path=path, hint="build one with `lmdistill cache-teacher CONFIG`")
    if not tok_dir.is_dir():
        raise DataError("the teacher cache has no stored tokenizer", path=tok_dir,
                        hint="set tokenizer.path in the run config to the teacher's tokenizer")
    return load_tokenizer(tok_dir)


# --------------------------------------------------------------------------------------- derived
def shrink_teacher_cache(source: str | Path, output: str | Path, k: int, *, show_progress: bool = False) -> Path:
    """A cache with fewer entries per token derived from a larger one, without running the teacher.

    The stored top-k is sorted, so the top-k' (k' < k) are its first k' entries; the new residual
    adds the dropped entries' mass to the old one (in log space, from the stored values). Resumable
    and atomic like the writer. Returns the new cache's path.
    """
    src = TeacherCache(source, verify="open")
    if src.mode != "topk":
        raise ConfigError(
            f"shrink: {src.path} is a {src.mode} cache, not a ranking of tokens, so fewer entries cannot be "
            "derived from it: build a new cache with the smaller k"
        )
    if not 1 <= k <= src.k:
        raise ConfigError(f"shrink: k must be between 1 and the source cache's k={src.k}, got {k}")
    plan = {key: value for key, value in src.manifest.items() if key not in ("shards", "bytes_per_token", "total_bytes")}
    plan["k"] = int(k)
    plan["derived_from"] = {"k": src.k, "manifest_sha256": file_sha256(src.path / MANIFEST_NAME)}
    directory = _CacheDirectory(Path(output), plan)
    if directory.check_existing():
        return Path(output)
    directory.output.mkdir(parents=True, exist_ok=True)
    if (src.path / TOKENIZER_DIR).is_dir() and not (directory.output / TOKENIZER_DIR).exists():
        tmp = Path(tempfile.mkdtemp(dir=directory.output, prefix=f".{TOKENIZER_DIR}-tmp-"))
        shutil.copytree(src.path / TOKENIZER_DIR, tmp, dirs_exist_ok=True)
        publish_directory(tmp, directory.output / TOKENIZER_DIR)
    directory.start(None, write_shared=True)
    from tqdm.auto import tqdm

    for shard in tqdm(range(plan["n_shards"]), desc="shrinking cache", disable=not show_progress):
        if directory.shard_record(shard, verify=True) is not None:
            continue
        logprobs_raw, indices_raw, residual_raw = src.shard_arrays(shard)
        logprobs = _from_storage(np.array(logprobs_raw), src.value_dtype).float()
        log_residual = _from_storage(np.array(residual_raw), src.value_dtype).float()
        if k < src.k:
            dropped = torch.logsumexp(logprobs[..., k:], dim=-1)
            log_residual = torch.logaddexp(log_residual, dropped)
        directory.write_shard(
            shard, logprobs[..., :k].contiguous(), torch.from_numpy(indices_raw[..., :k].astype(np.int64)), log_residual
        )
    directory.finalize()
    return Path(output)


def remove_partial_files(output: str | Path) -> int:
    """Delete what killed writers left behind (temporary shard files and tokenizer directories);
    returns how many. Call it only when no writer is running on ``output``."""
    count = 0
    for path in Path(output).glob(".*"):
        if path.name.endswith(".tmp") and path.is_file():
            path.unlink(missing_ok=True)
            count += 1
        elif path.name.startswith(f".{TOKENIZER_DIR}-tmp-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            count += 1
    return count


__all__ = [
    "CACHE_FORMAT",
    "ShardLayout",
    "TeacherCache",
    "WriteReport",
    "build_plan",
    "cache_tokenizer",
    "decode_shard",
    "encode_shard",
    "index_dtype",
    "model_weights_sha256",
    "open_teacher_cache",
    "plan_differences",
    "shrink_teacher_cache",
    "teacher_top_k",
    "write_teacher_cache",
]
