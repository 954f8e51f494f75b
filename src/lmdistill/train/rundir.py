"""The output directory of a training run: one run at a time, checked before any model loads, never
silently mixed with an earlier run.

* **Lock.** The main process holds an exclusive ``flock`` on ``<output_dir>/.lock`` for the whole run; the
  kernel drops it when the process ends, even on SIGKILL, so a stale lock never blocks a later run. A
  second run on the same directory stops at once, naming the first one's pid.
* **Writability.** The directory is created and a probe file written and removed first, so a read-only or
  missing location is one clear error before tokenizers and models load.
* **Reuse.** A directory that already holds a run (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
  ``final/``) is refused unless the run is resumed (``--resume``) or replaced (``--overwrite``, which removes
  only the files a run writes, never anything else in the directory). Resuming compares the saved
  ``config.yaml`` with the new settings: changes the checkpoint does not depend on are allowed and listed,
  any other change is refused with the list of what changed.

Several processes' liveness files (``.ranks/``, see :mod:`lmdistill.train.guard`) count as the run's files.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lmdistill.config import dump_config
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.train.checkpoint import CheckpointManager, write_text_atomic

RUN_ENTRIES = (
    "config.yaml", "metrics.jsonl", "checkpoints", "final", "final.tmp", "tensorboard", "generation_metrics.json", ".ranks",
)
# What marks a directory as holding a run (a tensorboard folder alone does not).
_RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final")
LOCK_NAME = ".lock"

# Settings a resumed run may change: none of them changes what the checkpoint's weights, optimizer moments,
# data position or RNG mean. The learning-rate settings are applied to the restored optimizer and schedule
# (lowering train.lr is how a diverged run is recovered); train.steps may grow (the cosine decay then
# stretches from the resume point on); micro-batching and the chunked loss compute the same gradients.
RESUMABLE_SETTINGS = (
    "output_dir", "data.cache_dir", "train.steps", "train.lr", "train.min_lr_ratio", "train.warmup_steps",
    "train.grad_clip", "train.log_every", "train.micro_batch_size", "train.chunked_loss", "train.chunk_size",
    "train.gradient_checkpointing", "monitor.",
    "eval.", "checkpoint.",
)


class OutputDirError(LmdistillError):
    """The output directory cannot be used as asked (in use, read-only, holds another run)."""


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    # the objective is one setting whatever its shape (a name, {name, params} or a mix)
    if isinstance(node, dict) and prefix != "objective.":
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def settings_diff(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, new value)}`` for every setting that differs."""
    a, b = _flatten(saved), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _resumable(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in RESUMABLE_SETTINGS)


def check_resume_settings(saved: dict[str, Any], config: BaseModel, checkpoint_step: int) -> list[str]:
    """The changes a resume may make, as ``key: old -> new`` lines; refuses (``ConfigError``) any other."""
    new = yaml.safe_load(dump_config(config))
    try:  # through today's schema, so a setting added since the run started compares at its default
        saved = yaml.safe_load(dump_config(type(config).model_validate(saved)))
    except ValueError:
        pass  # a setting since removed: compare as written (and refuse the difference)
    diff = settings_diff(saved, new)
    unsafe = {k: v for k, v in diff.items() if not _resumable(k)}
    steps = diff.get("train.steps")
    if steps is not None and isinstance(steps[1], int) and steps[1] < checkpoint_step:
        unsafe["train.steps"] = steps
    lines = {k: f"{k}: {old!r} -> {now!r}" for k, (old, now) in diff.items()}
    if unsafe:
        raise ConfigError(
            f"--resume: settings changed that the checkpoint at step {checkpoint_step} depends on: "
            + "; ".join(lines[k] for k in unsafe)
            + (" (train.steps must stay at least the checkpoint's step)" if "train.steps" in unsafe else "")
            + ". Keep them, or start over with --overwrite or another output_dir"
        )
    return list(lines.values())


class RunDirectory:
    """One run's output directory (see the module docstring). Only the main process writes or locks."""

    def __init__(self, path: str | Path, *, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self._lock_file: Any = None
        self.prepared_for: tuple[bool, bool] | None = None
        self.resume_changes: list[str] = []

    @classmethod
    def claim(cls, config: BaseModel, accelerator: Any, *, resume: bool | None, overwrite: bool) -> "RunDirectory":
        """The run directory of ``config.output_dir``, locked (main process) before any data or model loads. With
        ``resume`` given (True/False) or ``overwrite``, also checked for reuse now (:meth:`prepare`: an earlier run
        is refused unless resumed, or removed with ``overwrite``); otherwise the trainer checks it when it starts."""
        run_dir = cls(config.output_dir, is_main=accelerator.is_main_process)
        try:
            if resume is not None or overwrite:
                run_dir.prepare(config, resume=bool(resume), overwrite=overwrite)
            else:
                run_dir.acquire()
            accelerator.wait_for_everyone()  # the main process may have removed an earlier run (overwrite)
        except BaseException:
            run_dir.release()
            raise
        return run_dir

    # ------------------------------------------------------------------------------ lock, writes
    def check_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-probe-{socket.gethostname()}-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OutputDirError(
                f"output_dir {self.path} is not writable ({exc.strerror or exc}); choose another output_dir or make it writable"
            ) from exc

    def acquire(self) -> None:
        """Lock the directory for this run (main process; no-op when already held)."""
        if not self.is_main or self._lock_file is not None:
            return
        self.check_writable()
        lock_path = self.path / LOCK_NAME
        handle = open(lock_path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown pid"
            handle.close()
            raise OutputDirError(
                f"output_dir {self.path} is in use by another run ({holder}; lock {lock_path}); "
                "wait for it to finish, or choose another output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._lock_file = handle

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None

    @property
    def locked(self) -> bool:
        return self._lock_file is not None

    # ---------------------------------------------------------------------------------- reuse
    def run_entries(self) -> list[str]:
        """The markers of an earlier run present here (empty ``checkpoints/`` does not count)."""
        found = []
        for name in _RUN_MARKERS:
            p = self.path / name
            if p.is_dir() and name == "checkpoints" and not any(p.iterdir()):
                continue
            if p.exists():
                found.append(name)
        return found

    def clear(self) -> list[str]:
        """Remove what an earlier run wrote here (only :data:`RUN_ENTRIES`); returns what was removed."""
        removed = []
        for name in RUN_ENTRIES:
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
            else:
                continue
            removed.append(name)
        return removed

    def prepare(self, config: BaseModel, *, resume: bool, overwrite: bool = False) -> None:
        """Check (and lock) the directory for a run that starts fresh, resumes, or replaces an earlier run.

        Every rank runs the read-only checks, so all of them fail alike; only the main process locks and
        removes files. Idempotent for the same ``(resume, overwrite)``."""
        if self.prepared_for == (resume, overwrite):
            return
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other: resume the run, or replace it")
        self.check_writable()
        self.acquire()
        if overwrite:
            if self.is_main:
                removed = self.clear()
                if removed:
                    print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {self.path}", flush=True)
        elif resume:
            self._check_resume(config)
        else:
            found = self.run_entries()
            if found:
                raise OutputDirError(
                    f"output_dir {self.path} already holds a run ({', '.join(found)}); continue it with --resume, "
                    "or replace it with --overwrite (removes its checkpoints, metrics and final model), or choose another output_dir"
                )
        self.prepared_for = (resume, overwrite)

    def _check_resume(self, config: BaseModel) -> None:
        latest = CheckpointManager(self.path).latest()
        if latest is None:
            hint = " (it holds a run without one: replace it with --overwrite)" if self.run_entries() else ""
            raise OutputDirError(f"--resume: no checkpoint found in {self.path / 'checkpoints'}{hint}; start without --resume")
        saved_path = self.path / "config.yaml"
        if not saved_path.is_file():
            return
        try:
            saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise OutputDirError(f"--resume: cannot read the run's settings {saved_path} ({exc}); fix or remove the file") from exc
        self.resume_changes = check_resume_settings(saved, config, latest.step)


class MetricsLog:
    """JSON lines plus TensorBoard events, written by the main process only (opened on the first record, so
    constructing a trainer writes nothing into the output directory)."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        self.purge_step: int | None = None

    def resume_at(self, step: int, *, redo_final_eval: bool = False) -> None:
        """Drop the records of steps after ``step`` (they are redone), and their TensorBoard events; with
        ``redo_final_eval`` (a finished run resumed with nothing left to train) also ``step``'s evaluation."""
        if not self.enabled:
            return
        self.purge_step = step + 1
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            at = int(record.get("step", 0))
            if at < step or (at == step and not (redo_final_eval and record.get("kind") == "eval")):
                kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise LmdistillError(f"could not write {self.path}: {exc.strerror or exc}") from exc
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.purge_step)
        step = record.get("step", 0)
        for key, value in record.items():
            if key not in ("step", "kind") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
