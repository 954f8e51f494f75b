"""A cache directory while it is written: which shards are finished (each has a checksum record that matches its
bytes), writing a shard durably, and the manifest that marks the cache complete. Shared by the writer and
:func:`~lmdistill.teachers.cache.writer.shrink_teacher_cache`."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmdistill.data.cache import atomic_write_bytes, publish_directory
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.teachers.cache.format import ShardLayout, encode_shard
from lmdistill.teachers.cache.manifest import (
    MANIFEST_NAME,
    PLAN_NAME,
    TEACHER_TOKENIZER_DIR,
    TOKENIZER_DIR,
    file_sha256,
    json_bytes,
    plan_content_sha256,
    plan_differences,
    read_json,
    shard_name,
)
from lmdistill.teachers.cache.projection import PROJECTION_NAME, projection_metadata

log = logging.getLogger(__name__)


class CacheDirectory:
    """The output directory of one cache plan: its shards' checksum records, their writing, the manifest.

    A shard is finished when ``shard-NNNNN.bin`` and its record ``shard-NNNNN.json`` (size, SHA-256, plan hash,
    the other inputs it was computed with) agree; every file lands through a temporary file, an fsync and an
    atomic rename (:func:`lmdistill.data.cache.atomic_write_bytes`), the record after the shard, so a record
    always describes a whole file and a killed writer leaves only temporary files behind."""

    def __init__(self, output: Path, plan: dict[str, Any]) -> None:
        self.output = Path(output)
        self.plan = plan
        self.plan_sha256 = plan_content_sha256(plan)
        # what else a shard was computed with (a low-rank cache's projection): a shard recorded with other
        # inputs is recomputed on resume
        self.inputs: dict[str, str] = {}

    def layout(self, shard: int, teacher_positions: int | None = None) -> ShardLayout:
        """Shard ``shard``'s layout; a cross-tokenizer shard's rows are its ``teacher_positions`` teacher rows."""
        first = shard * self.plan["blocks_per_shard"]
        n = min(self.plan["blocks_per_shard"], self.plan["n_blocks"] - first)
        rows = self.plan["block_size"] if teacher_positions is None else teacher_positions
        return ShardLayout(n, rows, self.plan["k"], self.plan["dtype"], self.plan["index_dtype"],
                           self.plan.get("value_count"), token_rows=teacher_positions is not None)

    def check_existing(self) -> bool:
        """Refuse an output holding a different cache; True when a manifest of this plan is there (the cache was
        finished once: its shards are still verified before they are trusted)."""
        manifest = self.output / MANIFEST_NAME
        plan_file = self.output / PLAN_NAME
        for path in (manifest, plan_file):
            if path.exists():
                found = read_json(path, "existing cache plan")
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

    def start(self, tokenizer: Any | None, write_shared: bool, teacher_tokenizer: Any | None = None) -> None:
        """Create the directory; the writer of the shared files also saves the data's tokenizer (and a cross-tokenizer
        cache's teacher tokenizer) and the plan."""
        self.output.mkdir(parents=True, exist_ok=True)
        if write_shared:
            for name, saved in ((TOKENIZER_DIR, tokenizer), (TEACHER_TOKENIZER_DIR, teacher_tokenizer)):
                if saved is not None and not (self.output / name / "tokenizer_config.json").exists():
                    tmp = Path(tempfile.mkdtemp(dir=self.output, prefix=f".{name}-tmp-"))
                    saved.save_pretrained(tmp)
                    publish_directory(tmp, self.output / name)
            if not (self.output / PLAN_NAME).exists():
                atomic_write_bytes(self.output / PLAN_NAME, json_bytes(self.plan))

    def shard_record(self, shard: int, verify: bool) -> dict[str, Any] | None:
        """The checksum record of a finished shard; None when the shard must be (re)computed (no record, or a
        record of another plan or other inputs, or bytes that do not match it: the size always, the SHA-256 when
        ``verify``)."""
        meta_path = self.output / f"{shard_name(shard)}.json"
        bin_path = self.output / f"{shard_name(shard)}.bin"
        if not meta_path.exists() or not bin_path.exists():
            return None
        try:
            record = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict):
            return None
        stale = any(record.get(key) != value for key, value in self.inputs.items())
        if record.get("plan_sha256") != self.plan_sha256 or stale or bin_path.stat().st_size != record.get("bytes"):
            log.warning("teacher cache: %s does not match its checksum record; recomputing it", bin_path.name)
            return None
        if verify and file_sha256(bin_path) != record.get("sha256"):
            log.warning("teacher cache: %s fails its checksum; recomputing it", bin_path.name)
            return None
        return record

    def write_shard(self, shard: int, logprobs: torch.Tensor, indices: torch.Tensor, log_residual: torch.Tensor,
                    teacher_tokens: torch.Tensor | None = None, teacher_lengths: torch.Tensor | None = None) -> dict[str, Any]:
        """Write one shard and its checksum record; a cross-tokenizer shard also stores the teacher's ids ``[n, T]``
        and lengths ``[n]`` (its width T is recorded as ``teacher_positions``)."""
        width = None if teacher_tokens is None else int(teacher_tokens.shape[1])
        layout = self.layout(shard, width)
        data = encode_shard(logprobs, indices, log_residual, layout, teacher_tokens, teacher_lengths)
        name = shard_name(shard)
        # The .bin lands first, then its checksum record: a record always describes a whole file.
        atomic_write_bytes(self.output / f"{name}.bin", data)
        record = {
            "file": f"{name}.bin",
            "shard": shard,
            "first_block": shard * self.plan["blocks_per_shard"],
            "n_blocks": layout.n_blocks,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "plan_sha256": self.plan_sha256,
            **({} if width is None else {"teacher_positions": width}),
            **self.inputs,
        }
        atomic_write_bytes(self.output / f"{name}.json", json_bytes(record))
        return record

    def finalize(self) -> Path:
        """Write the manifest from the shards' records (every shard must be finished) and remove what killed
        writers left behind."""
        records = []
        missing = []
        for shard in range(self.plan["n_shards"]):
            record = self.shard_record(shard, verify=False)  # fresh or verified on this run's resume check
            if record is None:
                missing.append(shard_name(shard))
            else:
                keys = ("file", "first_block", "n_blocks", "bytes", "sha256", "teacher_positions")
                records.append({k: record[k] for k in keys if k in record})
        if missing:
            raise LmdistillError(
                f"teacher cache {self.output}: shards {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                "are not finished; rerun the same command to complete them"
            )
        bpt = ShardLayout.bytes_per_token(self.plan["k"], self.plan["dtype"], self.plan["index_dtype"],
                                          self.plan.get("value_count"))
        extra = {}
        if "projection_sha256" in self.inputs:  # a low-rank cache; the hash was taken when its writers loaded it
            metadata = projection_metadata(self.output / PROJECTION_NAME)
            extra["projection"] = {"file": PROJECTION_NAME, "sha256": self.inputs["projection_sha256"], **metadata}
        manifest = {
            **self.plan,
            **extra,
            "shards": records,
            "bytes_per_token": bpt,
            "total_bytes": sum(r["bytes"] for r in records),
        }
        atomic_write_bytes(self.output / MANIFEST_NAME, json_bytes(manifest))
        remove_partial_files(self.output)  # leftovers of killed runs; every writer has finished here
        return self.output / MANIFEST_NAME


def remove_partial_files(output: str | Path) -> int:
    """Delete what killed writers left behind (temporary shard files and tokenizer directories);
    returns how many. Call it only when no writer is running on ``output``."""
    count = 0
    for path in Path(output).glob(".*"):
        if path.name.endswith(".tmp") and path.is_file():
            path.unlink(missing_ok=True)
            count += 1
        elif path.name.startswith((f".{TOKENIZER_DIR}-tmp-", f".{TEACHER_TOKENIZER_DIR}-tmp-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            count += 1
    return count
