"""Atomic, safe checkpoints.

Layout of ``<output_dir>/checkpoints/step-000100/``: ``model/`` (save_pretrained, safetensors),
``optimizer.pt`` (tensors and plain numbers only; read with ``weights_only=True``), ``rng.safetensors``
and ``state.json`` (step, scheduler, objective state, Python RNG, data position). A checkpoint is
written into a temporary directory and renamed into place only when complete, then ``latest`` is
pointed at it with an atomic file replace; older complete checkpoints are pruned only after that, so a
kill at any moment leaves the last good checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmdistill.errors import LmdistillError

STEP_PREFIX = "step-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


@dataclass
class Checkpoint:
    path: Path
    step: int


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def save(
        self,
        step: int,
        *,
        model: Any,
        tokenizer: Any,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
    ) -> Path:
        """Write checkpoint ``step`` atomically and point ``latest`` at it."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{STEP_PREFIX}{step:07d}"
        for stale in self.root.glob(".tmp-*"):  # partial writes of a killed run (one writer per run)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-{STEP_PREFIX}{step:07d}"
        tmp.mkdir()
        model.save_pretrained(tmp / "model", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump({**state, "step": step, "rng": rng_meta}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step: replace the old copy only once the new one is whole
            old = self.root / f".tmp-old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(self.root)
        write_text_atomic(self.root / "latest", final.name)
        self._prune()
        return final

    def _complete(self) -> list[Checkpoint]:
        found = []
        for p in self.root.glob(f"{STEP_PREFIX}*"):
            if p.is_dir() and (p / "state.json").exists():
                found.append(Checkpoint(p, int(p.name[len(STEP_PREFIX):])))
        return sorted(found, key=lambda c: c.step)

    def _prune(self) -> None:
        for ckpt in self._complete()[: -self.keep]:
            shutil.rmtree(ckpt.path, ignore_errors=True)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint (``latest`` pointer, else the highest complete step)."""
        pointer = self.root / "latest"
        if pointer.exists():
            path = self.root / pointer.read_text(encoding="utf-8").strip()
            if (path / "state.json").exists():
                return Checkpoint(path, int(path.name[len(STEP_PREFIX):]))
        complete = self._complete() if self.root.exists() else []
        return complete[-1] if complete else None

    @staticmethod
    def load_state(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore optimizer and RNG from ``ckpt``; return its state.json (model weights are loaded by the caller)."""
        try:
            optimizer.load_state_dict(torch.load(ckpt.path / "optimizer.pt", weights_only=True))
            state = json.loads((ckpt.path / "state.json").read_text(encoding="utf-8"))
            set_rng_state(load_file(str(ckpt.path / "rng.safetensors")), state["rng"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise LmdistillError(f"checkpoint {ckpt.path} is unreadable: {exc}") from exc
        return state
