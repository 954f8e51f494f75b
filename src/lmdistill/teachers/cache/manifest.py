"""A teacher cache's names, plan and manifest: which plan entries decide the stored bytes, how two plans differ,
the checksums, and reading a manifest with every entry a reader relies on checked (kind and format, one record per
shard with the blocks it should hold, file names that stay inside the cache directory)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from lmdistill.errors import DataError
from lmdistill.teachers.cache.projection import PROJECTION_NAME

CACHE_FORMAT = 1  # bump when the layout or the meaning of a stored value changes
CACHE_KIND = "lmdistill-teacher-cache"
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "plan.json"
TOKENIZER_DIR = "tokenizer"
TEACHER_TOKENIZER_DIR = "teacher_tokenizer"  # a cross-tokenizer cache's teacher tokenizer (its rows are the teacher's)
CACHE_MODES = ("topk", "sampled", "hybrid", "lowrank")
# modes whose stored values are an unbiased estimate of the teacher (no residual; draws seeded per shard)
SAMPLING_MODES = ("sampled", "hybrid")
_HASH_CHUNK = 1 << 22

# The plan entries a resumed or reused build must match, with a name for error messages.
PLAN_KEYS = {
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

# The entries that also decide a cross-tokenizer cache's bytes (``rows: teacher``): the teacher's tokenization of each
# block. Hashed only for such caches, so the plans (and finished shards) of the other caches keep their hashes.
CROSS_PLAN_KEYS = {
    "rows": "rows (whose tokens a block's rows are)",
    "teacher_tokenizer.fingerprint": "teacher tokenizer",
    "teacher_tokenizer.prefix_ids": "teacher prefix ids",
    "teacher_tokenizer.max_positions": "teacher position cap",
}
_CROSS_KEYS = ("fingerprint", "dir", "vocab_size", "prefix_ids", "max_positions")

# what a reader takes from a manifest (a manifest without one of them is damaged, not merely old)
_MANIFEST_KEYS = ("k", "block_size", "n_blocks", "blocks_per_shard", "n_shards", "vocab_size", "temperature", "dtype",
                  "index_dtype", "tokenizer_fingerprint", "data", "shards", "total_bytes")
_SHARD_KEYS = ("file", "n_blocks", "bytes", "sha256")


def shard_name(index: int) -> str:
    """The file stem of shard ``index`` (``shard-00000``)."""
    return f"shard-{index:05d}"


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


def dotted_get(mapping: dict[str, Any], dotted: str) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"``; None where a part is absent."""
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def teacher_rows(plan: dict[str, Any]) -> bool:
    """Whether a plan or manifest is a cross-tokenizer cache's: its blocks' rows are the teacher's own tokens."""
    return plan.get("rows", "student") == "teacher"


def _content_keys(*plans: dict[str, Any]) -> dict[str, str]:
    return {**PLAN_KEYS, **CROSS_PLAN_KEYS} if any(teacher_rows(p) for p in plans) else PLAN_KEYS


def plan_differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Human-readable differences between two cache plans (only the entries that decide the content)."""
    out = []
    for key, label in _content_keys(expected, found).items():
        a, b = dotted_get(expected, key), dotted_get(found, key)
        if a != b:
            out.append(f"{label}: existing {b!r}, requested {a!r}")
    return out


def plan_content_sha256(plan: dict[str, Any]) -> str:
    """Hash of the plan entries that decide the stored bytes (not the teacher's path or the corpus name,
    so a moved teacher directory does not invalidate finished shards)."""
    return hashlib.sha256(json_bytes({key: dotted_get(plan, key) for key in _content_keys(plan)})).hexdigest()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the {what}: {exc}", path=path, hint="rerun `lmdistill cache-teacher` to rebuild it") from None
    if not isinstance(data, dict):
        raise DataError(f"the {what} is not a JSON object", path=path, hint="rerun `lmdistill cache-teacher` to rebuild it")
    return data


def is_plain_file_name(name: Any) -> bool:
    """Whether ``name`` names a file directly inside a directory: no directory part (on any platform), not
    absolute, not ``.``/``..``. A manifest is data, so the files it names must not reach outside the cache."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\x00" in name:
        return False
    return PurePosixPath(name).name == name and PureWindowsPath(name).name == name


def read_manifest(cache: Path) -> dict[str, Any]:
    """The manifest of the finished cache in directory ``cache``, checked: a :class:`DataError` naming the manifest
    (or the missing file) when it is absent, of another kind or format, lacks an entry a reader needs, lists the
    wrong shards, or names a file outside the cache directory."""
    path = cache / MANIFEST_NAME
    if not path.exists():
        hint = (
            "an unfinished `lmdistill cache-teacher` run: rerun the same command to complete it"
            if (cache / PLAN_NAME).exists()
            else "build one with `lmdistill cache-teacher CONFIG`"
        )
        raise DataError(f"not a complete teacher cache: {MANIFEST_NAME} is missing", path=cache, hint=hint)
    m = read_json(path, "teacher cache manifest")
    rebuild = "rebuild the cache with `lmdistill cache-teacher` into a new directory"
    if m.get("kind") != CACHE_KIND or m.get("format") != CACHE_FORMAT:
        raise DataError(
            f"unsupported teacher cache (kind {m.get('kind')!r}, format {m.get('format')!r}; "
            f"this lmdistill reads {CACHE_KIND!r} format {CACHE_FORMAT})",
            path=path, hint="rebuild it with this version's `lmdistill cache-teacher`",
        )
    missing = [key for key in _MANIFEST_KEYS if key not in m]
    if missing:
        raise DataError(f"the manifest lacks {', '.join(missing)}", path=path, hint=rebuild)
    if m.get("mode", "topk") not in CACHE_MODES:
        raise DataError(f"unknown cache mode {m['mode']!r} (known: {', '.join(CACHE_MODES)})", path=path, hint=rebuild)
    records = m["shards"]
    if not isinstance(records, list) or len(records) != m["n_shards"]:
        raise DataError(f"the manifest lists {len(records) if isinstance(records, list) else 'no'} shards, expected "
                        f"{m['n_shards']}", path=path, hint=rebuild)
    for shard, record in enumerate(records):
        absent = [key for key in _SHARD_KEYS if not isinstance(record, dict) or key not in record]
        if absent:
            raise DataError(f"shard {shard}'s record lacks {', '.join(absent)}", path=path, hint=rebuild)
        expected = min(m["blocks_per_shard"], m["n_blocks"] - shard * m["blocks_per_shard"])
        if record["n_blocks"] != expected:
            raise DataError(f"shard {shard} is listed with {record['n_blocks']} blocks, its place in the cache holds "
                            f"{expected}", path=path, hint=rebuild)
    named = [record["file"] for record in records]
    if m.get("rows", "student") not in ("student", "teacher"):
        raise DataError(f"unknown rows {m['rows']!r} (known: student, teacher)", path=path, hint=rebuild)
    if teacher_rows(m):
        named.append(_check_cross(m, path, rebuild))
    if "projection" in m:
        if not isinstance(m["projection"], dict):
            raise DataError("the manifest's projection entry is not an object", path=path, hint=rebuild)
        named.append(m["projection"].get("file", PROJECTION_NAME))
    for name in named:
        if not is_plain_file_name(name):
            raise DataError(f"the manifest names the file {name!r}, which is not a plain file name inside the cache "
                            "directory; refusing to read outside it", path=path, hint=rebuild)
    return m


def _check_cross(m: dict[str, Any], path: Path, rebuild: str) -> str:
    """Check a cross-tokenizer manifest's own entries; returns the teacher tokenizer's directory name."""
    if m.get("mode", "topk") != "topk":
        raise DataError(f"a cross-tokenizer cache stores top-k entries, this one says mode {m['mode']!r}", path=path,
                        hint=rebuild)
    entry = m.get("teacher_tokenizer")
    absent = [key for key in _CROSS_KEYS if not isinstance(entry, dict) or key not in entry]
    if absent:
        raise DataError(f"the manifest's teacher_tokenizer entry lacks {', '.join(absent)}", path=path, hint=rebuild)
    for shard, record in enumerate(m["shards"]):
        width = record.get("teacher_positions")
        if not isinstance(width, int) or width < 1:
            raise DataError(f"shard {shard}'s record lacks its teacher width (teacher_positions)", path=path, hint=rebuild)
    return entry["dir"]
