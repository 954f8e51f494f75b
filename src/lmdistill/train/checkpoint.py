"""Atomic, verified checkpoints.

Layout of ``<output_dir>/checkpoints/step-000100/``: ``model/`` (save_pretrained, safetensors),
``optimizer.pt`` (tensors and plain numbers only; read with ``weights_only=True``), ``rng.safetensors``,
``state.json`` (step, scheduler, objective state, Python RNG, data position) and ``checksums.json`` (the
SHA-256 of every other file). A checkpoint is written into a temporary directory, every file is fsynced,
and the directory is renamed into place only when complete; then ``latest`` is pointed at it with an
atomic file replace. Older checkpoints are pruned only after that, so a kill at any moment leaves the last
good checkpoint intact.

At resume every file is checked against ``checksums.json``: a changed byte, a truncated file or a file that
cannot be read makes that checkpoint *damaged*; resuming falls back to the previous intact one with a
warning that names the damaged file. ``latest`` must name a ``step-NNNNNNN`` directory beside it; any other
content (``../../elsewhere``) is ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmdistill.data.cache import fsync_directory
from lmdistill.errors import LmdistillError
from lmdistill.models.lora import is_lora, lora_state

STEP_PREFIX = "step-"
CHECKSUMS = "checksums.json"
_STEP_NAME = re.compile(rf"{STEP_PREFIX}(\d{{7,}})")
log = logging.getLogger(__name__)


class CheckpointError(LmdistillError):
    """A checkpoint could not be written, or none that is intact could be read."""


class DamagedCheckpoint(CheckpointError):
    """One checkpoint's files do not match their checksums or cannot be read (``file`` names the first)."""

    def __init__(self, checkpoint: Path, file: str, why: str) -> None:
        self.checkpoint, self.file, self.why = checkpoint, file, why
        super().__init__(f"checkpoint {checkpoint} is damaged: {file} {why}")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def io_failure(exc: BaseException, where: Path) -> str:
    """One line on why writing under ``where`` failed. torch.save and safetensors report a full disk as
    RuntimeError/SafetensorError ("unexpected pos ..."), so the free space is checked to say so plainly."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return f"No space left on device ({free} bytes free)"
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def file_sha256(path: Path, *, fsync: bool = False) -> str:
    """SHA-256 of a file; with ``fsync`` its data is also forced to disk (one pass over a just-written file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _files_under(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py_version, py_internal, py_gauss = random.getstate()
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


STATE_TENSORS = "state.safetensors"
_TENSOR_REF = "__tensor__"


def split_tensors(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` with every tensor replaced by ``{"__tensor__": name}`` (JSON-able), and the tensors by name;
    ``None`` values and plain numbers stay in place."""
    if isinstance(state, torch.Tensor):
        return {_TENSOR_REF: prefix}, {prefix: state.detach().cpu().contiguous()}
    if isinstance(state, dict):
        plain, tensors = {}, {}
        for key, value in state.items():
            plain[key], found = split_tensors(value, f"{prefix}/{key}" if prefix else str(key))
            tensors.update(found)
        return plain, tensors
    if isinstance(state, (list, tuple)):
        plain, tensors = [], {}
        for i, value in enumerate(state):
            item, found = split_tensors(value, f"{prefix}/{i}")
            plain.append(item)
            tensors.update(found)
        return plain, tensors
    return state, {}


def join_tensors(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(state, dict):
        if set(state) == {_TENSOR_REF}:
            return tensors[state[_TENSOR_REF]]
        return {key: join_tensors(value, tensors) for key, value in state.items()}
    if isinstance(state, list):
        return [join_tensors(value, tensors) for value in state]
    return state


@dataclass
class Checkpoint:
    path: Path
    step: int


@dataclass
class CheckpointContents:
    """Everything a checkpoint holds, read and checked but not applied yet."""

    checkpoint: Checkpoint
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, torch.Tensor]

    def restore_rng(self) -> None:
        set_rng_state(self.rng, self.state["rng"])


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    # ------------------------------------------------------------------------------------- writing
    def save(
        self,
        step: int,
        *,
        model: Any,
        tokenizer: Any,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        prune: bool = True,
    ) -> Path:
        """Write checkpoint ``step`` atomically and point ``latest`` at it.

        ``prune=False`` keeps the older checkpoints until :meth:`prune` is called (the trainer prunes once the
        next step has shown the new checkpoint's weights give a finite loss)."""
        final = self.root / f"{STEP_PREFIX}{step:07d}"
        tmp = self.root / f".tmp-{STEP_PREFIX}{step:07d}"
        current = tmp
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # partial writes of a killed run (one writer per run: locked)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            current = tmp / "model"
            if is_lora(model):  # the adapters only, under the file name every checkpoint has
                (tmp / "model").mkdir()
                save_file(lora_state(model), str(tmp / "model" / "model.safetensors"))
            else:
                model.save_pretrained(tmp / "model", safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "model")
            current = tmp / "optimizer.pt"
            torch.save(optimizer.state_dict(), current)
            rng_tensors, rng_meta = rng_state()
            current = tmp / "rng.safetensors"
            save_file(rng_tensors, str(current))
            plain, tensors = split_tensors(state)
            if tensors:  # e.g. an objective's learned network: tensors go to safetensors, never into a pickle
                current = tmp / STATE_TENSORS
                save_file(tensors, str(current))
            current = tmp / "state.json"
            current.write_text(json.dumps({**plain, "step": step, "rng": rng_meta}), encoding="utf-8")
            current = tmp
            # hashing reads each file once; the same pass forces it to disk before the rename publishes it
            sums = {p.relative_to(tmp).as_posix(): file_sha256(p, fsync=True) for p in _files_under(tmp)}
            with open(tmp / CHECKSUMS, "w", encoding="utf-8") as f:
                json.dump({"sha256": sums}, f, indent=0)
                f.flush()
                os.fsync(f.fileno())
            for sub in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
                fsync_directory(sub)
            if final.exists():  # a re-run of the same step: replace the old copy only once the new one is whole
                old = self.root / f".tmp-old-{final.name}"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old)
            else:
                tmp.rename(final)
            fsync_directory(self.root)
            write_text_atomic(self.root / "latest", final.name)
        except (OSError, RuntimeError, SafetensorError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = self.latest()
            where = getattr(exc, "filename", None) or current
            raise CheckpointError(
                f"could not write checkpoint {final}: {io_failure(exc, self.root)} (writing {where}); "
                + (f"the last good checkpoint {kept.path} is kept" if kept else "no earlier checkpoint exists")
            ) from exc
        # checkpoints after this step belong to a trajectory that was abandoned by resuming from an earlier one
        for later in [c for c in self.complete() if c.step > step]:
            shutil.rmtree(later.path, ignore_errors=True)
        if prune:
            self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the ``keep`` newest complete checkpoints."""
        for ckpt in self.complete()[: -self.keep]:
            shutil.rmtree(ckpt.path, ignore_errors=True)

    def discard(self, step: int) -> Checkpoint | None:
        """Delete checkpoint ``step`` (its weights diverged) and point ``latest`` at the newest earlier one,
        which is returned (None when there is none)."""
        target = self.root / f"{STEP_PREFIX}{step:07d}"
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        earlier = [c for c in self.complete() if c.step < step]
        pointer = self.root / "latest"
        if earlier:
            write_text_atomic(pointer, earlier[-1].path.name)
        elif pointer.exists():
            pointer.unlink()
        return earlier[-1] if earlier else None

    # ------------------------------------------------------------------------------------- reading
    def complete(self) -> list[Checkpoint]:
        """Renamed-into-place checkpoints, oldest first (not verified)."""
        found = []
        if not self.root.is_dir():
            return found
        for p in self.root.iterdir():
            m = _STEP_NAME.fullmatch(p.name)
            if m and p.is_dir() and (p / "state.json").exists():
                found.append(Checkpoint(p, int(m.group(1))))
        return sorted(found, key=lambda c: c.step)

    def _pointed(self) -> Checkpoint | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        m = _STEP_NAME.fullmatch(name)
        if m is None:
            log.warning("ignoring %s: it must name a %sNNNNNNN directory beside it, not %r", pointer, STEP_PREFIX, name[:200])
            return None
        path = self.root / name
        return Checkpoint(path, int(m.group(1))) if (path / "state.json").exists() else None

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint (``latest`` pointer, else the highest complete step); not verified."""
        return self._pointed() or (self.complete() or [None])[-1]

    def candidates(self) -> list[Checkpoint]:
        """Complete checkpoints in the order resuming tries them: ``latest``'s target, then newest first."""
        pointed = self._pointed()
        rest = [c for c in reversed(self.complete()) if pointed is None or c.path != pointed.path]
        return ([pointed] if pointed else []) + rest

    @staticmethod
    def verify(ckpt: Checkpoint) -> None:
        """Raise :class:`DamagedCheckpoint` naming the first file that differs from ``checksums.json``."""
        manifest = ckpt.path / CHECKSUMS
        if not manifest.exists():
            log.warning("checkpoint %s has no %s (written by an older lmdistill): its files are not verified", ckpt.path, CHECKSUMS)
            return
        try:
            sums = json.loads(manifest.read_text(encoding="utf-8"))["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DamagedCheckpoint(ckpt.path, CHECKSUMS, f"is unreadable ({exc})") from exc
        for rel, expected in sorted(sums.items()):
            path = ckpt.path / rel
            if not path.is_file():
                raise DamagedCheckpoint(ckpt.path, rel, "is missing")
            if file_sha256(path) != expected:
                raise DamagedCheckpoint(ckpt.path, rel, "does not match its recorded checksum")

    @staticmethod
    def read(ckpt: Checkpoint) -> CheckpointContents:
        """Verify and read every file of ``ckpt``; :class:`DamagedCheckpoint` names the first bad one."""
        CheckpointManager.verify(ckpt)
        current = "model/model.safetensors"
        try:
            weights = load_file(str(ckpt.path / current))
            current = "optimizer.pt"
            optimizer = torch.load(ckpt.path / current, weights_only=True)
            current = "state.json"
            state = json.loads((ckpt.path / current).read_text(encoding="utf-8"))
            if (ckpt.path / STATE_TENSORS).exists():
                current = STATE_TENSORS
                state = join_tensors(state, load_file(str(ckpt.path / current)))
            current = "rng.safetensors"
            rng = load_file(str(ckpt.path / current))
        except pickle.UnpicklingError as exc:
            # weights_only refuses anything but tensors and plain containers; its message is many lines long
            raise DamagedCheckpoint(ckpt.path, current, "holds objects other than tensors (refused to unpickle)") from exc
        except (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DamagedCheckpoint(ckpt.path, current, f"is unreadable ({first_line})") from exc
        if "rng" not in state or "step" not in state:
            raise DamagedCheckpoint(ckpt.path, "state.json", "lacks its 'rng' or 'step' entry")
        return CheckpointContents(ckpt, weights, optimizer, state, rng)

    def read_newest_intact(self) -> CheckpointContents | None:
        """The newest checkpoint whose files are intact, read; a warning names each damaged one skipped.
        None when there is no checkpoint; :class:`CheckpointError` when there are only damaged ones."""
        damaged = []
        for ckpt in self.candidates():
            try:
                contents = self.read(ckpt)
            except DamagedCheckpoint as exc:
                damaged.append(str(exc))
                log.warning("%s; trying the previous checkpoint", exc)
                continue
            if damaged:
                log.warning("resuming from %s instead (step %d)", ckpt.path, ckpt.step)
            return contents
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self.root}: " + "; ".join(damaged) + "; start over with --overwrite")
        return None

    @staticmethod
    def load_state(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore optimizer and RNG from ``ckpt``; return its state.json (model weights are loaded by the caller)."""
        contents = CheckpointManager.read(ckpt)
        try:
            optimizer.load_state_dict(contents.optimizer)
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {ckpt.path}: optimizer.pt does not fit this run's optimizer ({exc})") from exc
        contents.restore_rng()
        return contents.state
