"""Batch sources: where the trainer's micro-batches come from.

Data regimes plug in here, not as new trainers: fixed data (packed blocks), teacher-generated data,
on-policy student samples, corrected samples. A source returns, for optimizer step ``step``, this
rank's micro-batches as dicts of tensors with at least ``input_ids`` [B, L] and pre-shifted ``labels``
[B, L] (-100 = not a target). Sources that need the live student (on-policy) get it through
``bind(trainer)``. A source whose position is not a pure function of the step keeps it in
``state_dict()``, which checkpoints save.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lmdistill.data.blocks import BlockDataset, collate
from lmdistill.train.schedule import BatchSchedule


class BatchSource(Protocol):
    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int) -> list[dict[str, torch.Tensor]]: ...

    def bind(self, trainer: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BlockSource:
    """Packed blocks of a token stream in a seeded order; the data position is the step number.

    Each batch also carries ``block_index`` [B], so teachers that are looked up rather than run (an
    offline cache) can find the block's stored signal."""

    def __init__(self, dataset: BlockDataset, global_batch: int, seed: int) -> None:
        self.dataset = dataset
        self.schedule = BatchSchedule(len(dataset), global_batch, seed)

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for idx in self.schedule.micro_batches(step, rank, world_size, micro_batch):
            batch = collate([self.dataset[int(i)] for i in idx])
            batch["block_index"] = torch.as_tensor(idx, dtype=torch.long)
            out.append(batch)
        return out

    def bind(self, trainer: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
