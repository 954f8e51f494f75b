"""Writing a teacher cache: the plan (everything that decides its bytes), the teacher run over every block, shard by
shard and process by process, and caches with fewer entries derived from a larger one without the teacher.

A rerun on an output that holds the same plan is a resume: every shard whose checksum record matches its bytes
(re-hashed when ``verify_existing``) is kept, any other is recomputed, and the manifest is written again, so a
rerun on a finished cache repairs a damaged or deleted shard instead of trusting the manifest.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from lmdistill.data.blocks import BlockDataset, TokenStream
from lmdistill.data.cache import atomic_write_bytes, publish_directory
from lmdistill.data.tokenizer import tokenizer_fingerprint
from lmdistill.errors import ConfigError
from lmdistill.teachers.cache.crosstok import TeacherRowWriter, cross_plan
from lmdistill.teachers.cache.extract import teacher_hybrid, teacher_sampled, teacher_top_k
from lmdistill.teachers.cache.format import VALUE_DTYPES, from_storage, index_dtype
from lmdistill.teachers.cache.manifest import (
    CACHE_FORMAT,
    CACHE_KIND,
    CACHE_MODES,
    MANIFEST_NAME,
    SAMPLING_MODES,
    TOKENIZER_DIR,
    file_sha256,
    model_weights_sha256,
    read_json,
)
from lmdistill.teachers.cache.projection import PROJECTION_NAME, LowRankProjection, build_projection, final_hidden
from lmdistill.teachers.cache.reader import TeacherCache
from lmdistill.teachers.cache.shards import CacheDirectory

log = logging.getLogger(__name__)

# what one forward batch stores, by mode: (input_ids [n, L], generator) -> (values or None, integers, per-token value)
ShardSignal = Callable[[torch.Tensor, torch.Generator | None], tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]


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


def _projection_is_sound(file: Path, output: Path) -> bool:
    """Whether a low-rank cache's saved projection can be reused: it matches the checksum of the finished cache's
    manifest when there is one, and parses as a projection."""
    data = file.read_bytes()
    manifest = output / MANIFEST_NAME
    if manifest.exists():
        recorded = (read_json(manifest, "teacher cache manifest").get("projection") or {}).get("sha256")
        return hashlib.sha256(data).hexdigest() == recorded
    try:
        LowRankProjection.from_bytes(data)
    except (SafetensorError, KeyError):  # a damaged header, or a file without the projection's tensors
        return False
    return True


def _shard_signal(mode: str, model: torch.nn.Module, *, k: int, temperature: float, vocab: int,
                  projection: LowRankProjection | None) -> ShardSignal:
    """What one forward batch stores in ``mode``."""
    if projection is not None:  # lowrank: no values; int8 codes and a scale per token
        return lambda inputs, generator: (None, *projection.encode(final_hidden(model, inputs).float().cpu()))
    if mode == "topk":
        return lambda inputs, generator: teacher_top_k(model, inputs, k=k, temperature=temperature, vocab_size=vocab)
    sample = teacher_sampled if mode == "sampled" else teacher_hybrid
    return lambda inputs, generator: sample(model, inputs, k=k, temperature=temperature, vocab_size=vocab,
                                            generator=generator)


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
    teacher_tokenizer: Any | None = None,
    teacher_max_positions: int | None = None,
) -> WriteReport:
    """Run ``model`` over every block of ``stream`` and store its signal (``mode``) in ``output``.

    Process ``rank`` of ``world_size`` computes the shards ``s % world_size == rank``; ``barrier``
    (e.g. ``accelerate.PartialState().wait_for_everyone``) must be given when ``world_size > 1``. After
    the barrier rank 0 writes the manifest. Shards already finished under the same plan are skipped
    (their bytes re-verified when ``verify_existing``), also when the cache was finished before: a damaged or
    deleted shard is recomputed; an output holding a different plan is refused.
    ``on_shard_written(shard)`` is called after each shard is durable (tests use it to interrupt a run).

    With ``teacher_tokenizer`` (the teacher's own, another than ``tokenizer``, the data's) the cache is a
    cross-tokenizer one (:mod:`~lmdistill.teachers.cache.crosstok`; ``mode`` topk): per block, the teacher's own
    tokens of its text (cut at ``teacher_max_positions``, the teacher's learned position table) and its top-k there.
    """
    if world_size > 1 and barrier is None:
        raise ValueError("write_teacher_cache: several processes need a barrier")
    vocab = int(vocab_size or len(tokenizer if teacher_tokenizer is None else teacher_tokenizer))
    plan = build_plan(
        model=model, model_name=model_name, model_dtype=model_dtype, tokenizer=tokenizer, stream=stream,
        block_size=block_size, k=k, temperature=temperature, dtype=dtype, blocks_per_shard=blocks_per_shard,
        split=split, corpus=corpus, vocab_size=vocab, mode=mode, seed=seed,
    )
    if teacher_tokenizer is not None:
        plan = cross_plan(plan, model=model, teacher_tokenizer=teacher_tokenizer, source=model_name,
                          max_positions=teacher_max_positions)
    directory = CacheDirectory(Path(output), plan)
    report = WriteReport(output=Path(output), rank=rank, world_size=world_size)
    if directory.check_existing():
        log.info("teacher cache %s is finished; verifying its shards (recomputing any that do not match)", output)
    if barrier is not None:
        barrier()  # every process has inspected the output before any of them writes to it
    directory.start(tokenizer, write_shared=(rank == 0), teacher_tokenizer=teacher_tokenizer)
    model = model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ids = stream.ids
    projection_file = Path(output) / PROJECTION_NAME
    if mode == "lowrank" and rank == 0:
        # a resumed run keeps the projection its shards used, unless it is damaged
        if projection_file.exists() and not _projection_is_sound(projection_file, Path(output)):
            log.warning("teacher cache: %s is damaged; fitting it again", projection_file)
            projection_file.unlink()
        if not projection_file.exists():
            fitted, metadata = build_projection(
                model, ids, plan["n_blocks"], block_size, k, vocab, temperature, VALUE_DTYPES[dtype], batch_size, device
            )
            atomic_write_bytes(projection_file, fitted.to_bytes(metadata))
    if barrier is not None:
        barrier()
    projection = None
    if mode == "lowrank":
        data = projection_file.read_bytes()  # every rank encodes with the same bytes
        projection = LowRankProjection.from_bytes(data)
        directory.inputs["projection_sha256"] = hashlib.sha256(data).hexdigest()
    signal = _shard_signal(mode, model, k=k, temperature=temperature, vocab=vocab, projection=projection)
    rows = None if teacher_tokenizer is None else TeacherRowWriter(
        model, teacher_tokenizer, tokenizer, stream, block_size, k=k, temperature=temperature, vocab_size=vocab,
        max_positions=teacher_max_positions, batch_size=batch_size, device=device)
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
            if rows is not None:  # a cross-tokenizer cache: the teacher's rows of its own tokens of each block
                directory.write_shard(shard, *rows.shard(first, layout.n_blocks))
            else:
                _write_student_rows(directory, shard, layout, signal, ids, first, block_size, batch_size, device,
                                    torch.Generator().manual_seed(seed * 1_000_003 + shard) if mode in SAMPLING_MODES
                                    else None)  # one generator per shard, seeded by the shard: any process count agrees
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


def _write_student_rows(directory: CacheDirectory, shard: int, layout: Any, signal: ShardSignal, ids: Any, first: int,
                        block_size: int, batch_size: int, device: torch.device, generator: torch.Generator | None) -> None:
    """Compute and write one shard of a cache whose rows are the student's (the data's) positions."""
    logprobs = torch.empty(layout.values_shape, dtype=torch.float32)
    indices = torch.empty(layout.logprobs_shape, dtype=torch.int64)
    log_residual = torch.empty(layout.residual_shape, dtype=torch.float32)
    # Forward batches always start at the shard's first block, whatever the process count:
    # the same blocks in the same batches give bit-identical shards.
    for offset in range(0, layout.n_blocks, batch_size):
        n = min(batch_size, layout.n_blocks - offset)
        begin = (first + offset) * block_size
        window = np.asarray(ids[begin : begin + n * block_size], dtype=np.int64).reshape(n, block_size)
        values, integers, per_token = signal(torch.from_numpy(window).to(device), generator)
        if values is not None:
            logprobs[offset : offset + n] = values
        indices[offset : offset + n] = integers
        log_residual[offset : offset + n] = per_token
    directory.write_shard(shard, logprobs, indices, log_residual)


def shrink_teacher_cache(source: str | Path, output: str | Path, k: int, *, show_progress: bool = False) -> Path:
    """A cache with fewer entries per token derived from a larger one, without running the teacher.

    The stored top-k is sorted, so the top-k' (k' < k) are its first k' entries; the new residual
    adds the dropped entries' mass to the old one (in log space, from the stored values). Resumable,
    atomic and self-repairing like the writer (a rerun recomputes damaged shards). Returns the new cache's path.
    """
    src = TeacherCache(source, verify="open")
    if src.rows != "student":
        raise ConfigError(f"shrink: {src.path} is a cross-tokenizer cache (rows of the teacher's own tokens); build a "
                          "new cache with the smaller k")
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
    directory = CacheDirectory(Path(output), plan)
    directory.check_existing()
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
        logprobs = from_storage(np.array(logprobs_raw), src.value_dtype).float()
        log_residual = from_storage(np.array(residual_raw), src.value_dtype).float()
        if k < src.k:
            dropped = torch.logsumexp(logprobs[..., k:], dim=-1)
            log_residual = torch.logaddexp(log_residual, dropped)
        directory.write_shard(
            shard, logprobs[..., :k].contiguous(), torch.from_numpy(indices_raw[..., :k].astype(np.int64)), log_residual
        )
    directory.finalize()
    return Path(output)
