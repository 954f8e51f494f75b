"""Reading a finished teacher cache: the shard reader its modes share (manifest, sizes and checksums, memory-mapped
shards, lookup by block, the checks against a training run), and opening a cache for a run.

``TeacherCache(path, ...)`` returns the class of the manifest's mode and rows (it dispatches in ``__new__``):
:class:`~lmdistill.teachers.cache.sparse.SparseTeacherCache` for ``topk``, ``sampled`` and ``hybrid`` caches,
:class:`~lmdistill.teachers.cache.lowrank.LowRankTeacherCache` for ``lowrank`` ones,
:class:`~lmdistill.teachers.cache.crosstok.AlignedTeacherCache` for a ``topk`` cache of the teacher's own rows
(``rows: teacher``, a cross-tokenizer cache). Each class declares the signal kinds it serves; opened directly, it
refuses a cache of another mode or rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from lmdistill.data.blocks import TokenStream
from lmdistill.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from lmdistill.errors import ConfigError, DataError, LmdistillError
from lmdistill.losses.signals import TAIL_SHAPES
from lmdistill.teachers.base import TeacherBase
from lmdistill.teachers.cache.format import ShardLayout, decode_shard
from lmdistill.teachers.cache.manifest import MANIFEST_NAME, PLAN_NAME, TOKENIZER_DIR, file_sha256, read_manifest

VerifyMode = Literal["open", "first_use"]
LOGITS_DTYPES = ("auto", "float32", "bfloat16")  # a low-rank cache's logits product (LowRankTeacherCache.logits_layer)

ShardArrays = tuple[np.ndarray, np.ndarray, np.ndarray]


class TeacherCache(TeacherBase):
    """A finished teacher cache, memory-mapped: the trainer's teacher (``signal(batch)``, ``chunked_signal(batch)``,
    defined by the mode classes), looked up by the batch's ``block_index``.

    ``verify``: ``"open"`` checks every shard's SHA-256 when the cache is opened; ``"first_use"``
    checks each shard the first time a block of it is read (for caches too large to hash up front).
    Sizes are always checked at open, so a truncated shard fails immediately either way.
    ``tail`` (how a sparse cache's residual mass is shared, see :class:`~lmdistill.losses.SparseTeacher`) and
    ``logits_dtype`` (a low-rank cache's logits product) are run options, checked for every mode.
    """

    #: the manifest modes this class reads
    modes: ClassVar[tuple[str, ...]] = ()
    #: whose tokens a block's rows are: the student's (the data's; every cache before cross-tokenizer ones) or the
    #: teacher's own tokenization of the block's text (``rows: teacher`` in the manifest)
    rows: ClassVar[str] = "student"
    _class_of_mode: ClassVar[dict[tuple[str, str], type[TeacherCache]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for mode in cls.modes:
            TeacherCache._class_of_mode[mode, cls.rows] = cls

    def __new__(cls, path: str | Path | None = None, *args: Any, **kwargs: Any) -> TeacherCache:
        if cls is TeacherCache and path is not None:  # open as the class of the manifest's mode and rows
            # read_manifest checks both; the package's __init__ imports (registers) every class
            m = read_manifest(Path(path))
            cls = TeacherCache._class_of_mode[m.get("mode", "topk"), m.get("rows", "student")]
        return super().__new__(cls)

    def __init__(self, path: str | Path, *, verify: VerifyMode = "open", tail: str = "uniform",
                 logits_dtype: str = "auto") -> None:
        if verify not in ("open", "first_use"):
            raise ConfigError(f"verify must be 'open' or 'first_use', got {verify!r}")
        if tail not in TAIL_SHAPES:
            raise ConfigError(f"tail must be one of {', '.join(TAIL_SHAPES)}, got {tail!r}")
        if logits_dtype not in LOGITS_DTYPES:
            raise ConfigError(f"logits_dtype must be one of {', '.join(LOGITS_DTYPES)}, got {logits_dtype!r}")
        self.tail = tail
        self.logits_dtype = logits_dtype
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        self.mode: str = m.get("mode", "topk")  # caches from before sampling existed are top-k
        rows = m.get("rows", "student")
        if self.mode not in self.modes or rows != self.rows:
            what = self.mode if rows == "student" else f"{self.mode} cross-tokenizer (teacher rows)"
            raise DataError(
                f"a {what} cache cannot be read as a {type(self).__name__} (modes {', '.join(self.modes) or 'none'}"
                f"{'' if self.rows == 'student' else ', teacher rows'})",
                path=self.path / MANIFEST_NAME, hint="open it with TeacherCache(path), which picks the class of its mode",
            )
        self.k: int = m["k"]
        self.block_size: int = m["block_size"]
        self.n_blocks: int = m["n_blocks"]
        self.blocks_per_shard: int = m["blocks_per_shard"]
        self.vocab_size: int = m["vocab_size"]
        self.temperature: float = m["temperature"]
        self.value_dtype: str = m["dtype"]
        self.description = f"the {self.mode} cache {self.path} (teacher.cache; cache.mode: {self.mode})"
        self._verified: set[int] = set()
        self._shards: list[ShardArrays | None] = []
        for record in m["shards"]:
            file = self.path / record["file"]  # a plain name inside the cache: checked by read_manifest
            if not file.exists():
                raise DataError(f"teacher cache shard {record['file']} is missing", path=file,
                                hint=self._rebuild_advice())
            size = file.stat().st_size
            if size != record["bytes"]:
                raise DataError(
                    f"teacher cache shard {record['file']} is truncated or damaged: {size} bytes, the manifest says {record['bytes']}",
                    path=file, hint=self._rebuild_advice(file),
                )
            self._shards.append(None)
        if verify == "open":
            for shard in range(len(self._shards)):
                self._verify(shard)

    def _rebuild_advice(self, shard_file: Path | None = None) -> str:
        """How to rebuild a damaged or missing shard: the writer recomputes every shard without a matching
        checksum record, also in a finished cache (a derived cache is rebuilt the way it was derived)."""
        if "derived_from" in self.manifest:
            rerun = (f"rerun shrink_teacher_cache(SOURCE, {str(self.path)!r}, {self.k}) with the cache it was derived "
                     f"from (k={self.manifest['derived_from'].get('k')})")
        else:
            rerun = "rerun `lmdistill cache-teacher` with the same config"
        if shard_file is None:
            return f"{rerun} to rebuild it"
        return f"delete {shard_file.name} and {shard_file.with_suffix('.json').name}, then {rerun} to rebuild it"

    # -- shards -------------------------------------------------------------------------------------
    def _verify(self, shard: int) -> None:
        if shard in self._verified:
            return
        record = self.manifest["shards"][shard]
        file = self.path / record["file"]
        if file_sha256(file) != record["sha256"]:
            raise DataError(f"teacher cache shard {record['file']} is corrupt (SHA-256 differs from the manifest)",
                            path=file, hint=self._rebuild_advice(file))
        self._verified.add(shard)

    def _layout(self, shard: int) -> ShardLayout:
        record = self.manifest["shards"][shard]
        width = record.get("teacher_positions")  # a cross-tokenizer shard: rows are the teacher's, this many a block
        return ShardLayout(record["n_blocks"], self.block_size if width is None else width, self.k, self.value_dtype,
                           self.manifest["index_dtype"], self.manifest.get("value_count"), token_rows=width is not None)

    def _memmap(self, shard: int) -> np.ndarray:
        """The bytes of one shard, verified (once) and memory-mapped."""
        self._verify(shard)
        return np.memmap(self.path / self.manifest["shards"][shard]["file"], dtype=np.uint8, mode="r",
                         shape=(self._layout(shard).nbytes,))

    def shard_arrays(self, shard: int) -> ShardArrays:
        """Memory-mapped (values, integers, per-token values) of one shard in storage dtypes: (logprobs, token ids,
        log residual) of a sparse cache, (nothing, int8 codes, scale) of a low-rank one."""
        arrays = self._shards[shard]
        if arrays is None:
            arrays = decode_shard(self._memmap(shard), self._layout(shard))
            self._shards[shard] = arrays
        return arrays

    def block(self, index: int) -> ShardArrays:
        """Stored arrays of block ``index``: values ``[L, v]``, integers ``[L, k]``, per-token values ``[L]`` (a
        cross-tokenizer cache: its shard's teacher width instead of ``L``)."""
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} is outside the cache's {self.n_blocks} blocks")
        shard, local = divmod(int(index), self.blocks_per_shard)
        values, integers, per_token = self.shard_arrays(shard)
        return values[local], integers[local], per_token[local]

    def _blocks(self, block_indices: Iterable[int] | torch.Tensor) -> list[ShardArrays]:
        if isinstance(block_indices, torch.Tensor):
            block_indices = block_indices.reshape(-1).tolist()
        parts = [self.block(int(i)) for i in block_indices]
        if not parts:
            raise ValueError("lookup needs at least one block index")
        return parts

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
        return (f"{type(self).__name__}({str(self.path)!r}, k={self.k}, mode={self.mode}, "
                f"blocks={self.n_blocks}x{self.block_size}, dtype={self.value_dtype}, {self.bytes_per_token} bytes/token)")


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


def cache_tokenizer(path: str | Path) -> Any:
    """The tokenizer a teacher cache was built with (stored inside it)."""
    path = Path(path)
    tok_dir = path / TOKENIZER_DIR
    if not (path / MANIFEST_NAME).exists() and not (path / PLAN_NAME).exists():
        raise DataError("not a teacher cache (no manifest.json)", path=path, hint="build one with `lmdistill cache-teacher CONFIG`")
    if not tok_dir.is_dir():
        raise DataError("the teacher cache has no stored tokenizer", path=tok_dir,
                        hint="set tokenizer.path in the run config to the teacher's tokenizer")
    return load_tokenizer(tok_dir)
