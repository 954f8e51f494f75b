"""``lmdistill pretrain`` under several processes in which rank ``HANG_RANK`` stops itself (SIGSTOP, as a
hung or paused process would) at the start of step ``HANG_STEP``.

Usage (per rank, with the torch.distributed environment set): python hang_worker.py CONFIG.yaml
"""

from __future__ import annotations

import os
import signal
import sys

from lmdistill import cli
from lmdistill.train.trainer import Trainer

STOP_RANK, STOP_STEP = int(os.environ["HANG_RANK"]), int(os.environ["HANG_STEP"])
_train_step = Trainer.train_step


def train_step(self: Trainer, step: int) -> float:
    if self.accelerator.process_index == STOP_RANK and step + 1 == STOP_STEP:
        os.kill(os.getpid(), signal.SIGSTOP)
    return _train_step(self, step)


if __name__ == "__main__":
    Trainer.train_step = train_step
    sys.argv = ["lmdistill", "pretrain", sys.argv[1]]
    cli.main()
