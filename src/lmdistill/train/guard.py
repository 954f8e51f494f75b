"""Guards of a training run: divergence (non-finite loss, gradients, weights) and lost ranks.

A run of several processes waits in collectives for at most ``LMDISTILL_COLLECTIVE_TIMEOUT`` seconds (set
through Accelerate's ``InitProcessGroupKwargs(timeout=...)``, default 900); meanwhile each rank's
:class:`Heartbeat` thread writes ``<output_dir>/.ranks/rank-N.json`` every few seconds. The thread keeps
beating while its rank waits in a collective and stops with a stopped (SIGSTOP) or dead process, so when a
collective times out the ranks whose file went silent are the ones that stopped answering.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from lmdistill.errors import ConfigError, LmdistillError


class TrainingDiverged(LmdistillError):
    """The loss, the gradients, the weights or the validation loss became NaN or infinite; the last good
    checkpoint is kept."""


class CollectiveTimeout(LmdistillError):
    """Another rank stopped answering within the collective timeout."""


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """The Accelerator of a run: a bounded wait in collectives (``LMDISTILL_COLLECTIVE_TIMEOUT``), so a hung
    rank ends the run with an error instead of blocking the others for PyTorch's default half hour."""
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_seconds()))
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[timeout])


def nonfinite_names(named: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating-point tensors in ``(name, tensor)`` pairs holding a NaN or an infinity."""
    return [name for name, t in named if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    return [(f"optimizer state {i}.{key}", value) for i, state in enumerate(optimizer.state.values())
            for key, value in state.items()]


def grads_nonfinite(params: Iterable[torch.Tensor]) -> bool:
    """Whether any gradient of ``params`` holds a NaN or an infinity."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return False
    # the max-norm never overflows, and is NaN or infinite exactly when an entry is
    return not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf)))


def lost_rank(exc: BaseException) -> bool:
    """Whether a collective failed because another rank stopped answering (timeout, closed connection)."""
    text = str(exc).lower()
    return any(k in text for k in ("timed out", "timeout", "connection closed", "connection reset"))


def collective_timeout_seconds() -> float:
    """How long a rank waits for the others in one collective (``LMDISTILL_COLLECTIVE_TIMEOUT``, seconds)."""
    raw = os.environ.get("LMDISTILL_COLLECTIVE_TIMEOUT", "900")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"LMDISTILL_COLLECTIVE_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"LMDISTILL_COLLECTIVE_TIMEOUT must be positive, got {raw!r}")
    return value


class Heartbeat:
    """A daemon thread that writes ``<dir>/.ranks/rank-N.json`` (pid, host, step, time) every ``interval``
    seconds. It keeps running while its rank waits in a collective, and stops with a stopped or dead
    process, so a silent file points at the rank that stopped answering."""

    def __init__(self, output_dir: Path, rank: int, world_size: int, interval: float) -> None:
        self.dir = Path(output_dir) / ".ranks"
        self.rank, self.world_size, self.interval = rank, world_size, interval
        self.step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "step": self.step, "time": time.time()}
        path = self.dir / f"rank-{self.rank}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass  # liveness reporting must never stop training

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name=f"lmdistill-heartbeat-{self.rank}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def silent_ranks(self) -> list[str]:
        """Ranks whose heartbeat is older than three intervals (or absent), described for an error message."""
        now = time.time()
        out = []
        for rank in range(self.world_size):
            path = self.dir / f"rank-{rank}.json"
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                out.append(f"rank {rank} (no heartbeat file)")
                continue
            age = now - float(rec.get("time", 0))
            if age > 3 * self.interval:
                out.append(f"rank {rank} (pid {rec.get('pid')} on {rec.get('host')}, silent for {age:.0f}s, last at step {rec.get('step')})")
        return out
