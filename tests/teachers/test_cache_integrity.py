"""Integrity of the offline teacher cache: a rerun on a finished cache verifies its shards and recomputes damaged
ones, the reader's repair advice works when followed literally, a manifest cannot name files outside the cache
directory or lack what a reader needs, every file reaches the disk before it is renamed into place, and
``TeacherCache(path)`` opens each mode as its own class."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lmdistill.errors import DataError
from lmdistill.losses.signals import DENSE, LOWRANK, TOPK
from lmdistill.teachers.base import TeacherSource
from lmdistill.teachers.cache import (
    LowRankTeacherCache,
    SparseTeacherCache,
    TeacherCache,
    shrink_teacher_cache,
)
from tests.teachers.conftest import BLOCK, write_cache

REBUILD = "rerun `lmdistill cache-teacher` with the same config to rebuild it"


@pytest.fixture(scope="module")
def lowrank_cache(tmp_path_factory, teacher_model, few_data, small_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("lowrank") / "k8"
    write_cache(path, teacher_model, few_data, small_tokenizer, mode="lowrank")
    return path


def _damage(file: Path, how: str) -> None:
    if how == "corrupt":  # same size: only the checksum tells
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0x40
        file.write_bytes(bytes(data))
    elif how == "truncated":
        file.write_bytes(file.read_bytes()[:-10])
    else:
        file.unlink()


def _shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard-*.bin"))}


# ----------------------------------------------------------------------------------- rerun repairs
@pytest.mark.parametrize("how", ["corrupt", "truncated", "missing"])
def test_rerun_on_a_finished_cache_recomputes_a_damaged_shard(tmp_path, k8_cache, teacher_model, few_data,
                                                              small_tokenizer, how):
    out = tmp_path / "c"
    shutil.copytree(k8_cache, out)
    original = _shard_bytes(out)
    _damage(out / "shard-00002.bin", how)
    report = write_cache(out, teacher_model, few_data, small_tokenizer)
    assert report.complete and report.shards_written == [2] and 2 not in report.shards_skipped
    assert _shard_bytes(out) == original
    assert TeacherCache(out).n_blocks == TeacherCache(k8_cache).n_blocks  # every shard verified at open
    assert write_cache(out, teacher_model, few_data, small_tokenizer).shards_written == []


def test_following_the_readers_advice_repairs_the_cache(tmp_path, trained_teacher, few_chapters, cache_dir, capsys):
    """Damage a shard, open the cache, do exactly what the error's advice says (delete the files it names, rerun the
    command it names), and the cache reads again with its original bytes: for a truncated, corrupt or missing shard."""
    from lmdistill.cli.cache import cache_teacher

    out = tmp_path / "cli-cache"
    config = tmp_path / "cache.yaml"
    config.write_text(yaml.safe_dump({
        "output": str(out),
        "data": {"corpus": str(few_chapters), "block_size": BLOCK, "cache_dir": str(cache_dir)},
        "teacher": {"path": str(trained_teacher)},
        "cache": {"k": 8, "blocks_per_shard": 64, "mode": "topk"},
    }))
    cache_teacher(config, [])
    original = _shard_bytes(out)
    for shard, how in ((1, "truncated"), (2, "corrupt"), (3, "missing")):
        _damage(out / f"shard-{shard:05d}.bin", how)
        with pytest.raises(DataError, match=f"shard-{shard:05d}.bin is {how}") as info:
            TeacherCache(out)
        advice = re.fullmatch(r"(?:delete (\S+) and (\S+), then )?" + re.escape(REBUILD), info.value.hint)
        assert advice is not None, info.value.hint
        for name in filter(None, advice.groups()):
            (out / name).unlink()
        cache_teacher(config, [])
        assert TeacherCache(out).n_blocks > 0
        assert _shard_bytes(out) == original
    capsys.readouterr()


def test_a_derived_caches_advice_rebuilds_it_by_shrinking(tmp_path, k8_cache):
    small = shrink_teacher_cache(k8_cache, tmp_path / "k4", 4)
    original = _shard_bytes(small)
    _damage(small / "shard-00001.bin", "corrupt")
    with pytest.raises(DataError, match="is corrupt") as info:
        TeacherCache(small)
    advice = re.fullmatch(r"delete (\S+) and (\S+), then rerun shrink_teacher_cache\(SOURCE, '(.+)', (\d+)\) with "
                          r"the cache it was derived from \(k=8\) to rebuild it", info.value.hint)
    assert advice is not None, info.value.hint
    for name in advice.groups()[:2]:
        (small / name).unlink()
    shrink_teacher_cache(k8_cache, advice[3], int(advice[4]))
    assert TeacherCache(small).k == 4 and _shard_bytes(small) == original


@pytest.mark.parametrize("finished", [True, False])
def test_rerun_refits_a_damaged_projection(tmp_path, lowrank_cache, teacher_model, few_data, small_tokenizer, finished):
    """Finished: the projection fails the manifest's checksum, and the reader's advice (rerun) repairs it. Killed
    before the manifest: an unreadable projection is refitted instead of failing the resume."""
    out = tmp_path / "c"
    shutil.copytree(lowrank_cache, out)
    if finished:
        _damage(out / "projection.safetensors", "corrupt")
        with pytest.raises(DataError, match="projection projection.safetensors is corrupt") as info:
            TeacherCache(out)
        assert info.value.hint == REBUILD
    else:
        (out / "manifest.json").unlink()
        (out / "projection.safetensors").write_bytes(b"\x00" * 64)
    write_cache(out, teacher_model, few_data, small_tokenizer, mode="lowrank")
    repaired, reference = TeacherCache(out), TeacherCache(lowrank_cache)
    blocks = torch.arange(0, reference.n_blocks, 17)
    torch.testing.assert_close(repaired.block_logits(blocks), reference.block_logits(blocks), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------- manifest checks
@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_manifest_naming_a_shard_outside_the_cache_is_refused(tmp_path, k8_cache, where):
    cache = tmp_path / "cache"
    shutil.copytree(k8_cache, cache)
    outside = tmp_path / "x.bin"  # a real copy of the shard: a reader that followed the name would serve it
    shutil.copy(cache / "shard-00001.bin", outside)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][1]["file"] = "../x.bin" if where == "parent" else str(outside)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: the manifest names the file .*x\.bin'?, which is not a "
                                        r"plain file name inside the cache directory"):
        TeacherCache(cache, verify="first_use")


def test_a_manifest_naming_a_projection_outside_the_cache_is_refused(tmp_path, lowrank_cache):
    cache = tmp_path / "cache"
    shutil.copytree(lowrank_cache, cache)
    shutil.copy(cache / "projection.safetensors", tmp_path / "p.safetensors")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["projection"]["file"] = "../p.safetensors"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: the manifest names the file '\.\./p\.safetensors'"):
        TeacherCache(cache)


def test_a_manifest_lacking_what_the_reader_needs_is_named(tmp_path, k8_cache):
    cache = tmp_path / "cache"
    shutil.copytree(k8_cache, cache)
    good = json.loads((cache / "manifest.json").read_text())
    for edit, message in (
        (lambda m: m.pop("block_size"), r"manifest\.json: the manifest lacks block_size"),
        (lambda m: m["shards"][1].pop("sha256"), r"manifest\.json: shard 1's record lacks sha256"),
        (lambda m: m["shards"][1].update(n_blocks=3), r"manifest\.json: shard 1 is listed with 3 blocks, its place .* 64"),
        (lambda m: m["shards"].pop(), r"manifest\.json: the manifest lists \d+ shards, expected"),
    ):
        manifest = json.loads(json.dumps(good))
        edit(manifest)
        (cache / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DataError, match=message):
            TeacherCache(cache, verify="first_use")


# ------------------------------------------------------------------------------------ durability
def test_every_file_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, teacher_model, few_data,
                                                                      small_tokenizer, monkeypatch):
    """The temporary file of each shard, checksum record, plan and manifest is fsynced before the rename (else a
    power loss can keep the rename and lose the bytes), and the directory after it (so the rename itself lasts)."""
    out = tmp_path / "c"
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        stat = os.fstat(fd)
        events.append(("fsync", (stat.st_dev, stat.st_ino)))
        real_fsync(fd)

    def replace(src, dst, **kwargs) -> None:
        stat = os.stat(src)
        events.append(("replace", (stat.st_dev, stat.st_ino), Path(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_cache(out, teacher_model, few_data, small_tokenizer)
    monkeypatch.undo()
    directory = (out.stat().st_dev, out.stat().st_ino)
    renamed = [(i, e) for i, e in enumerate(events) if e[0] == "replace" and e[2].parent == out]
    names = {e[2].name for _, e in renamed}
    assert {"plan.json", "manifest.json", "shard-00000.bin", "shard-00000.json"} <= names
    assert len([n for n in names if n.endswith(".bin")]) == TeacherCache(out).manifest["n_shards"]
    for i, (_, file, target) in renamed:
        synced = [e[1] for e in events[:i] if e[0] == "fsync"]
        assert synced and synced[-1] == file, f"{target.name} was renamed into place before its bytes were synced"
        assert ("fsync", directory) in events[i + 1 :], f"the rename of {target.name} was not synced"


# ------------------------------------------------------------------------------------ mode classes
def test_teacher_cache_opens_each_mode_as_its_class(k8_cache, lowrank_cache):
    sparse, lowrank = TeacherCache(k8_cache), TeacherCache(lowrank_cache)
    assert type(sparse) is SparseTeacherCache and sparse.signal_kinds == {TOPK}
    assert type(lowrank) is LowRankTeacherCache and lowrank.signal_kinds == {DENSE, LOWRANK}
    assert all(isinstance(c, TeacherCache) and isinstance(c, TeacherSource) for c in (sparse, lowrank))
    assert SparseTeacherCache(k8_cache, verify="first_use").k == sparse.k  # a mode class opens its own mode
    with pytest.raises(DataError, match="a topk cache cannot be read as a LowRankTeacherCache"):
        LowRankTeacherCache(k8_cache)
    with pytest.raises(DataError, match="a lowrank cache cannot be read as a SparseTeacherCache"):
        SparseTeacherCache(lowrank_cache)
