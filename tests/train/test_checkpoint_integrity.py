"""Checkpoint integrity: checksums recorded at save and verified at resume (falling back to the previous
intact checkpoint, naming the damaged file), fsync before publishing, a confined ``latest`` pointer, and
one-line errors for a full disk and for planted pickles (which are never run)."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from lmdistill.train.checkpoint import CHECKSUMS, CheckpointError, CheckpointManager, DamagedCheckpoint, file_sha256
from lmdistill.train.run import build_trainer
from tests.conftest import save_tiny_model
from tests.train.helpers import run_config
from tests.train.test_schedule_checkpoint import _Model


class _PlantedPayload:
    """Unpickling this runs ``touch <marker>``: what a planted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _manager_with_steps(root: Path, steps=(1, 2)) -> tuple[CheckpointManager, _Model]:
    model = _Model()
    opt = torch.optim.AdamW(model.parameters())
    model.w.sum().backward()
    opt.step()
    mgr = CheckpointManager(root, keep=5)
    for step in steps:
        mgr.save(step, model=model, tokenizer=None, optimizer=opt, state={"x": step})
    return mgr, model


def test_checksums_cover_every_file_and_files_reach_disk_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def recording_rename(self, target):
        events.append(("rename", str(self)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(Path, "rename", recording_rename)
    mgr, _ = _manager_with_steps(tmp_path, steps=(3,))
    monkeypatch.undo()
    ckpt = mgr.latest()
    sums = json.loads((ckpt.path / CHECKSUMS).read_text())["sha256"]
    files = {p.relative_to(ckpt.path).as_posix() for p in ckpt.path.rglob("*") if p.is_file()} - {CHECKSUMS}
    assert set(sums) == files and {"model/model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"} <= files
    for rel, digest in sums.items():
        assert file_sha256(ckpt.path / rel) == digest
    publish = events.index(("rename", str(tmp_path / "checkpoints" / ".tmp-step-0000003")))
    synced = {Path(path).name for kind, path in events[:publish] if kind == "fsync"}
    assert {"model.safetensors", "optimizer.pt", "rng.safetensors", "state.json", CHECKSUMS} <= synced


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _data_offset(safetensors_file: Path) -> int:
    header = int.from_bytes(safetensors_file.read_bytes()[:8], "little")
    return 8 + header + 4  # inside the first tensor's bytes: the file still parses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, kjv_small_txt, cache_dir, small_tokenizer):
    """Weights after 6 steps without interruption, and the config to redo it with a kill."""
    base = tmp_path_factory.mktemp("integrity")
    student = save_tiny_model(base / "student", small_tokenizer, layers=1, hidden=32, seed=4)
    cfg = run_config(base / "full", kjv_small_txt, cache_dir, student)
    trainer, _ = build_trainer(cfg, show_progress=False)
    trainer.train()
    trainer.close()
    model = trainer.accelerator.unwrap_model(trainer.model)
    return student, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _killed_run(tmp_path, corpus, cache_dir, student):
    cfg = run_config(tmp_path, corpus, cache_dir, student)
    trainer, _ = build_trainer(cfg, show_progress=False)
    original = trainer.train_step

    def dies_in_step_6(step):
        if step == 5:
            raise KeyboardInterrupt
        return original(step)

    trainer.train_step = dies_in_step_6
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [c.step for c in trainer.checkpoints.complete()] == [2, 4]
    return cfg


@pytest.mark.parametrize("damaged", ["model/model.safetensors", "optimizer.pt"])
def test_a_changed_byte_falls_back_to_the_previous_checkpoint(tmp_path, kjv_small_txt, cache_dir, uninterrupted, damaged, caplog):
    student, expected = uninterrupted
    cfg = _killed_run(tmp_path, kjv_small_txt, cache_dir, student)
    target = Path(cfg.output_dir) / "checkpoints" / "step-0000004" / damaged
    _flip_byte(target, _data_offset(target) if damaged.endswith(".safetensors") else target.stat().st_size // 2)
    resumed, _ = build_trainer(cfg, show_progress=False, resume=True)
    with caplog.at_level(logging.WARNING, logger="lmdistill.train.checkpoint"):
        resumed.train(resume=True)
    warning = caplog.text
    assert f"step-0000004 is damaged: {damaged} does not match its recorded checksum" in warning
    assert "resuming from" in warning and "step-0000002" in warning
    got = resumed.accelerator.unwrap_model(resumed.model).state_dict()
    for key, value in expected.items():  # resuming from step 2 redoes steps 3-6 exactly
        assert torch.equal(got[key], value), key


def test_a_damaged_header_without_checksums_is_one_line_naming_the_file(tmp_path, caplog):
    mgr, _ = _manager_with_steps(tmp_path, steps=(1, 2))
    newest = mgr.latest().path
    (newest / CHECKSUMS).unlink()  # as written by an older version: only reading can find the damage
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    with caplog.at_level(logging.WARNING, logger="lmdistill.train.checkpoint"):
        contents = mgr.read_newest_intact()
    assert contents.checkpoint.step == 1
    assert "model/model.safetensors is unreadable" in caplog.text and str(newest) in caplog.text
    (mgr.root / "step-0000001" / "optimizer.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError) as info:
        mgr.read_newest_intact()
    message = str(info.value)
    assert "\n" not in message and "optimizer.pt" in message and "model.safetensors" in message and "--overwrite" in message


def test_a_planted_pickle_is_never_run(tmp_path, caplog):
    """An attacker who can write the checkpoint can also rewrite checksums.json: loading must still refuse."""
    mgr, _ = _manager_with_steps(tmp_path, steps=(1, 2))
    marker = tmp_path / "pwned"
    newest = mgr.latest().path
    torch.save({"state": _PlantedPayload(marker)}, newest / "optimizer.pt")
    manifest = json.loads((newest / CHECKSUMS).read_text())
    manifest["sha256"]["optimizer.pt"] = file_sha256(newest / "optimizer.pt")
    (newest / CHECKSUMS).write_text(json.dumps(manifest))
    with pytest.raises(DamagedCheckpoint, match="optimizer.pt holds objects other than tensors") as info:
        CheckpointManager.read(mgr.latest())
    assert "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="lmdistill.train.checkpoint"):
        assert mgr.read_newest_intact().checkpoint.step == 1
    assert not marker.exists()


def test_latest_must_point_inside_its_directory(tmp_path, caplog):
    _manager_with_steps(tmp_path / "other", steps=(9,))
    mgr, _ = _manager_with_steps(tmp_path / "run", steps=(2,))
    (mgr.root / "latest").write_text("../../other/checkpoints/step-0000009")
    with caplog.at_level(logging.WARNING, logger="lmdistill.train.checkpoint"):
        latest = mgr.latest()
        candidates = mgr.candidates()
    assert latest.path == mgr.root / "step-0000002"
    assert [c.path for c in candidates] == [mgr.root / "step-0000002"]
    assert "ignoring" in caplog.text and "../../other" in caplog.text


def test_disk_full_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    mgr, model = _manager_with_steps(tmp_path, steps=(1,))
    opt = torch.optim.AdamW(model.parameters())

    def disk_full(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError) as info:
        mgr.save(2, model=model, tokenizer=None, optimizer=opt, state={})
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "optimizer.pt" in message
    assert "step-0000001 is kept" in message
    assert not list(mgr.root.glob(".tmp-*"))
    assert mgr.latest().step == 1


def test_a_real_full_disk_stops_the_run_with_one_line(tmp_path, kjv_small_txt, cache_dir, small_tokenizer):
    """The output directory on a 400 KiB tmpfs: the run fills it and stops with one line naming a path."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    if os.system(f"mount -t tmpfs -o size=400k tmpfs {mount} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=4)
        cfg = run_config(mount, kjv_small_txt, cache_dir, student, checkpoint={"every": 1, "keep": 5})
        from lmdistill.errors import LmdistillError
        from lmdistill.train.run import run_training

        with pytest.raises(LmdistillError) as info:
            run_training(cfg, show_progress=False)
        message = str(info.value)
        assert "\n" not in message and "No space left on device" in message and str(mount) in message
        assert not list((mount / "run" / "checkpoints").glob(".tmp-*"))
    finally:
        info = None  # the failed torch.save's writer (an open file on the mount) lives in the traceback
        gc.collect()
        assert os.system(f"umount {mount}") == 0
