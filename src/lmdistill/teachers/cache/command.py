"""``lmdistill cache-teacher CONFIG``: the config and the one function behind the command
(:func:`lmdistill.cli.cache.cache_teacher` parses the arguments and calls :func:`build_teacher_cache`).

A cache-teacher config (YAML; unknown keys are errors)::

    output: .cache/teachers/kjv-k32            # the cache directory (resumable: rerun to continue)
    data: {corpus: kjv, block_size: 128}       # the same data section as the training run's
    teacher: {path: runs/teacher/final, dtype: float32}
    tokenizer: null                            # default: the teacher's own tokenizer
    cache: {k: 32, temperature: 1.0, dtype: float16, blocks_per_shard: 256, batch_size: 16, split: train}

Train from it with ``teacher: {cache: .cache/teachers/kjv-k32}`` and the same ``data`` section.

A student with another tokenizer than the teacher's (vocabulary rungs 3-4): set ``tokenizer`` to the student's (its
model directory) and ``cache.mode: topk`` (the default then). The data is the student's text, and the cache stores the
teacher's own tokens of each block and its top-k over them (:mod:`lmdistill.teachers.cache.crosstok`); train from it
with a cross-tokenizer objective (``projected_kd``, ``span_kd``, ``uld``, ``mined``), rung 3 also with same-vocabulary
ones on aligned spans.

Several processes share the work: ``torchrun --nproc_per_node=N -m lmdistill.cli cache-teacher CONFIG``
(each process computes its own shards; the result is the same as with one process).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmdistill.config import DataConfig, require_existing
from lmdistill.errors import ConfigError

log = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CacheTeacherModel(_Section):
    path: str = Field(..., description="local directory (save_pretrained) or hub id of the teacher")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    _path_exists = field_validator("path")(lambda v: require_existing(v, "teacher path"))


class CacheSettings(_Section):
    k: int | None = Field(
        None, ge=1,
        description="entries per token: draws (sampled), exact head + draws (hybrid), top-k (topk): default 32, "
        "130 bytes/token with float16; principal components (lowrank): default min(128, teacher hidden size), k + 2 bytes/token",
    )
    temperature: float = Field(
        1.0, gt=0,
        description="log-probs are stored at this temperature and objectives must use it (lowrank: stores logits, "
        "any objective temperature works; this one is only the temperature of the fidelity check)",
    )
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the stored log-probs (lowrank: of the per-token scale)"
    )
    mode: Literal["topk", "sampled", "hybrid", "lowrank"] = Field(
        "lowrank",
        description="lowrank: the teacher's final hidden state on its top-k principal directions in int8, giving back "
        "dense logits for every objective (fidelity measured and recorded at build time); sampled: k systematic draws "
        "from the teacher per token (random-sampling KD, arXiv:2503.16870); hybrid: the likely tokens' exact "
        "probabilities plus systematic draws from the rest (threshold sampling); sampled and hybrid are unbiased "
        "estimates for forward KL / cross-entropy objectives only; topk: the k most likely tokens and the residual "
        "mass, for every objective (biased: its students are worse, see bench/cache.py)",
    )
    seed: int = Field(0, description="seed of the draws (modes sampled and hybrid)")
    blocks_per_shard: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1, description="blocks per teacher forward pass")
    split: Literal["train", "validation", "test"] = "train"
    verify_existing: bool = Field(
        True, description="re-hash finished shards (also of a finished cache) before keeping them on a rerun; "
        "false checks their sizes only")


class CacheTeacherConfig(_Section):
    output: str = Field(..., description="directory of the cache")
    data: DataConfig = DataConfig()
    teacher: CacheTeacherModel
    tokenizer: str | None = Field(None, description="tokenizer directory of the data; default: the teacher's. Another "
                                  "tokenizer than the teacher's (the student's) makes a cross-tokenizer top-k cache")
    cache: CacheSettings = CacheSettings()

    _tok_exists = field_validator("tokenizer")(lambda v: require_existing(v, "tokenizer path"))


def build_teacher_cache(config: CacheTeacherConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Tokenize the data (cached), load the teacher, write (or resume) the cache. Runs unchanged under
    ``torchrun``/``accelerate launch``: Accelerate's process state gives the rank, world size and barrier.
    Returns a summary (meaningful on every rank; the manifest is written by rank 0)."""
    from accelerate import PartialState

    from lmdistill.data.cache import default_cache_dir
    from lmdistill.data.prepare import prepare_data
    from lmdistill.data.tokenizer import load_tokenizer
    from lmdistill.teachers.aligned import teacher_max_positions
    from lmdistill.teachers.cache.reader import TeacherCache
    from lmdistill.teachers.cache.writer import write_teacher_cache
    from lmdistill.teachers.live import load_live_teacher

    state = PartialState(cpu=not torch.cuda.is_available())
    tokenizer = load_tokenizer(config.tokenizer or config.teacher.path)
    teacher_tokenizer = _teacher_tokenizer(config, tokenizer)
    c = config.cache
    if teacher_tokenizer is not None and c.mode != "topk":
        if "mode" in c.model_fields_set:
            raise ConfigError(
                f"cache.mode: {c.mode}: the tokenizer ({config.tokenizer}) is not the teacher's, so the cache stores the "
                "teacher's own tokens of the text and its top-k there: set cache.mode: topk (or drop tokenizer for a "
                "cache in the teacher's tokens)"
            )
        log.info("cross-tokenizer cache (the data's tokenizer is not the teacher's): cache.mode topk")
        c = c.model_copy(update={"mode": "topk"})
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
    with state.main_process_first():  # one process tokenizes, the others then read its cache
        data = prepare_data(
            config.data.corpus,
            block_size=config.data.block_size,
            tokenizer=tokenizer,
            fractions=config.data.split_fractions,
            cache_dir=cache_dir,
        )
    live = load_live_teacher(config.teacher.path, tokenizer=teacher_tokenizer or tokenizer, dtype=config.teacher.dtype,
                             device=state.device)
    model, vocab = live.model, live.alignment.real_vocab_size
    if teacher_tokenizer is not None:
        vocab = len(teacher_tokenizer)  # what a live aligned teacher slices its logits to
    hidden = model.get_output_embeddings().weight.shape[1]
    k = c.k if c.k is not None else (min(128, hidden) if c.mode == "lowrank" else 32)
    if k > vocab:
        raise ConfigError(f"cache.k = {k} exceeds the vocabulary size {vocab}")
    report = write_teacher_cache(
        config.output,
        model=model,
        tokenizer=tokenizer,
        stream=data.streams[c.split],
        block_size=config.data.block_size,
        k=k,
        temperature=c.temperature,
        dtype=c.dtype,
        mode=c.mode,
        seed=c.seed,
        blocks_per_shard=c.blocks_per_shard,
        batch_size=c.batch_size,
        model_name=str(config.teacher.path),
        model_dtype=config.teacher.dtype,
        split=c.split,
        corpus=config.data.corpus,
        vocab_size=vocab,
        rank=state.process_index,
        world_size=state.num_processes,
        barrier=state.wait_for_everyone if state.num_processes > 1 else None,
        device=state.device,
        verify_existing=c.verify_existing,
        show_progress=show_progress and state.is_main_process,
        teacher_tokenizer=teacher_tokenizer,
        teacher_max_positions=None if teacher_tokenizer is None else teacher_max_positions(str(config.teacher.path)),
    )
    cache = TeacherCache(config.output, verify="first_use")  # sizes checked; hashes were checked while writing
    return {
        "output": str(config.output),
        "rank": state.process_index,
        "world_size": state.num_processes,
        "blocks": cache.n_blocks,
        "block_size": cache.block_size,
        "k": cache.k,
        "dtype": cache.value_dtype,
        "mode": cache.mode,
        "rows": cache.rows,
        "bytes_per_token": cache.bytes_per_token,
        **({"fidelity": cache.manifest["projection"]["fidelity"]} if "projection" in cache.manifest else {}),
        "dense_fp16_bytes_per_token": 2 * cache.vocab_size,
        "total_bytes": cache.manifest["total_bytes"],
        "shards_written_here": len(report.shards_written),
        "shards_skipped_here": len(report.shards_skipped),
        "tokens_per_second_here": round(report.tokens_per_second, 1),
    }


def _teacher_tokenizer(config: CacheTeacherConfig, tokenizer: Any) -> Any | None:
    """The teacher's own tokenizer when the data's (``config.tokenizer``) has another token map: the cache is then a
    cross-tokenizer one; None when they are one map (or the teacher directory has no tokenizer to compare)."""
    from lmdistill.data.tokenizer import load_tokenizer
    from lmdistill.errors import LmdistillError

    if config.tokenizer is None:
        return None
    try:
        own = load_tokenizer(config.teacher.path)
    except LmdistillError:
        log.warning("the teacher %s has no tokenizer of its own: the cache assumes it reads %s",
                    config.teacher.path, config.tokenizer)
        return None
    return None if own.get_vocab() == tokenizer.get_vocab() else own
