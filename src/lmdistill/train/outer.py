"""What the trainer offers an objective's own outer step (:class:`lmdistill.losses.OuterStep`): the student's hidden
states without gradients or dropout randomness, its output layer, the teacher, a held-out batch, the backward and
the mean over ranks. Kept beside the trainer, which calls :func:`outer_step_inputs` once per optimizer step."""

from __future__ import annotations

from typing import Any

import torch

from lmdistill.data.blocks import BlockDataset, collate
from lmdistill.losses import OuterStep
from lmdistill.models.modes import eval_mode
from lmdistill.seeds import derived_seed

__all__ = ["outer_step_inputs", "held_out_batch"]


def outer_step_inputs(trainer: Any, batch: dict[str, torch.Tensor], step: int) -> OuterStep:
    """The :class:`OuterStep` of ``trainer`` (a :class:`~lmdistill.train.trainer.Trainer`) at optimizer step ``step``."""
    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.model)
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    vocab = trainer.vocab_size
    batch = {k: v.to(acc.device) for k, v in batch.items()}

    def student_hidden(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        # no gradients and no dropout randomness consumed (exact resume)
        with torch.no_grad(), eval_mode(model, fork_rng=True):
            out = model(input_ids=input_ids.to(acc.device), output_hidden_states=True, logits_to_keep=1, **extra)
        return out.hidden_states[-1]

    def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
        return acc.reduce(t, reduction="mean") if acc.num_processes > 1 else t

    def held_out(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        return held_out_batch(trainer.train_data, b, seed=trainer.tc.seed, step=step, rank=acc.process_index,
                              device=acc.device)

    return OuterStep(
        step=step, lr=trainer.optimizer.param_groups[0]["lr"], batch=batch, student_hidden=student_hidden,
        output_layer=(head.weight[:vocab], None if bias is None else bias[:vocab]),
        teacher_signal=lambda b: trainer.teacher.signal(b),
        held_out=held_out, backward=acc.backward, mean_over_ranks=mean_over_ranks,
    )


def held_out_batch(train_data: BlockDataset, batch: dict[str, torch.Tensor], *, seed: int, step: int, rank: int,
                   device: torch.device | str) -> dict[str, torch.Tensor] | None:
    """As many training blocks as ``batch`` has rows, none of them in ``batch``, drawn by a generator seeded with
    (seed, step, rank): reproducible on resume (in task runs, whose batches are padded examples, these are packed
    task text). ``None`` when no other block exists."""
    if len(train_data) < 2:
        return None
    generator = torch.Generator().manual_seed(derived_seed(seed, step, rank, "held-out"))
    own = set(batch["block_index"].tolist()) if "block_index" in batch else set()
    candidates = torch.randperm(len(train_data), generator=generator).tolist()
    picks = [i for i in candidates if i not in own][: batch["input_ids"].shape[0]]
    if not picks:
        return None
    return {k: v.to(device) for k, v in collate([train_data[int(i)] for i in picks]).items()}
