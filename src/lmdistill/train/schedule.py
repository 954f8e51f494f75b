"""Deterministic batch order: which blocks make up optimizer step ``s``, on which rank.

The order is a function of (seed, step) alone, so the data position of a run is just its step number:
resuming at step k reads exactly the blocks an uninterrupted run would, and N ranks together read the
same global batch as one process.
"""

from __future__ import annotations

import math

import numpy as np

from lmdistill.errors import ConfigError


class BatchSchedule:
    def __init__(self, n_items: int, global_batch: int, seed: int) -> None:
        if n_items == 0:
            raise ConfigError("the training split has no blocks: the corpus is smaller than one block")
        self.n_items = n_items
        self.global_batch = global_batch
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
        return self._perms[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """Block indices of optimizer step ``step`` (epochs are consecutive reshuffles)."""
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs, offsets = np.divmod(positions, self.n_items)
        return np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int) -> list[np.ndarray]:
        """This rank's contiguous share of the global batch, cut into micro-batches."""
        idx = self.global_indices(step)
        per_rank = self.global_batch // world_size
        mine = idx[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]

    def epochs(self, steps: int) -> float:
        return steps * self.global_batch / self.n_items


def accumulation_steps(global_batch: int, micro_batch: int | None, world_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation) for a global batch split over ``world_size`` ranks."""
    if global_batch % world_size:
        raise ConfigError(f"train.batch_size={global_batch} is not divisible by the {world_size} processes")
    per_rank = global_batch // world_size
    micro = min(micro_batch or per_rank, per_rank)
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro} must divide the per-process batch {per_rank} "
            f"(train.batch_size={global_batch} / {world_size} processes)"
        )
    return micro, math.ceil(per_rank / micro)
