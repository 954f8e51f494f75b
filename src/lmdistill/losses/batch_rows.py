"""Objectives that need per-row fields of the batch (which rows the student generated, span ids), bound to them.

The trainer hands an objective ``(logits, teacher, labels)`` only. An objective that needs more declares the
batch fields it reads in ``batch_fields`` and gives, through ``for_batch(batch)``, an objective *bound* to one
batch: a :class:`RowBound` that calls the objective's ``per_token`` with those fields as keywords, rows in
the flattened ``[B * L]`` order of the logits. It works on both paths unchanged: on the chunked path the
fields are its batch context, sliced with the rows of each chunk, and when the objective couples the rows of
a sequence the chunks hold whole sequences (``row_group_size = L``). State, parameters and schedule stay with
the objective itself (the bound one delegates), so the trainer keeps calling ``on_step_end`` on the objective
it built.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from lmdistill.losses.core import Objective, OuterStep
from lmdistill.losses.signals import Teacher

__all__ = ["RowBound", "sequence_rows"]


def sequence_rows(batch: Mapping[str, Tensor], field: str) -> tuple[int, int]:
    """``(B, L)`` of a batch, from its ``input_ids`` (``[B, L]``), for spreading ``[B]`` fields over rows."""
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"binding the batch field '{field}' needs the batch's input_ids as a [B, L] tensor")
    return int(input_ids.shape[0]), int(input_ids.shape[1])


class RowBound(Objective):
    """``objective`` bound to per-row tensors ``rows`` (each ``[N]``, ``N = B * L``) and constant keywords.

    ``per_token(logits, teacher, labels)`` is ``objective.per_token(logits, teacher, labels, **rows, **constants)``;
    ``group_rows`` (when the objective couples the rows of a sequence) keeps chunks to whole groups;
    ``field_names`` names the batch field each keyword came from, for error messages.
    """

    def __init__(self, objective: Objective, rows: Mapping[str, Tensor], constants: Mapping[str, Any] | None = None,
                 group_rows: int | None = None, field_names: Mapping[str, str] | None = None) -> None:
        lengths = {name: int(t.shape[0]) for name, t in rows.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"bound row fields must have one row count, got {lengths}")
        self.objective = objective
        self.rows = dict(rows)
        self.constants = dict(constants or {})
        self.field_names = dict(field_names or {})  # keyword -> the batch field it came from (for messages)
        # instance attributes shadow the class defaults: a bound objective is what its objective is
        self.name = objective.name
        self.requires_teacher = objective.requires_teacher
        self.accepted_signals = objective.accepted_signals
        self.needs_batch_context = True
        self.has_outer_step = objective.has_outer_step
        if group_rows is not None:
            self.batch_coupled = True
            self.row_group_size = int(group_rows)
        else:
            self.batch_coupled = objective.batch_coupled
            self.row_group_size = objective.row_group_size

    def leaves(self) -> list[Objective]:
        return self.objective.leaves()

    def _check_rows(self, rows: Mapping[str, Tensor], n: int) -> None:
        for name, t in rows.items():
            if t.shape[0] != n:
                field = self.field_names.get(name, name)
                raise ValueError(f"objective '{self.name}': batch field '{field}' covers {t.shape[0]} rows but the "
                                 f"logits have {n}; bind the objective to the batch these logits come from")

    def per_token(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *, context: Any = None) -> Tensor:
        rows = self.rows if context is None else context
        self._check_rows(rows, student_logits.reshape(-1, student_logits.shape[-1]).shape[0])
        return self.objective.per_token(student_logits, teacher, labels, **rows, **self.constants)

    def batch_context(self, teacher_chunks: Callable[[], Iterable[tuple[int, int, Teacher]]], labels: Tensor, vocab_size: int) -> Any:
        self._check_rows(self.rows, int(labels.shape[0]))
        return self.rows

    def slice_context(self, context: Any, start: int, stop: int) -> Any:
        return {name: t[start:stop] for name, t in context.items()}

    # --- everything else is the objective's ---------------------------------------------------------------
    def outer_step(self, step: OuterStep) -> None:
        self.objective.outer_step(step)

    def state_dict(self) -> dict:
        return self.objective.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state)

    def on_step_end(self, loss: float, step: int, total_steps: int) -> None:
        self.objective.on_step_end(loss, step, total_steps)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.objective.parameters()

    def config(self) -> dict:
        return self.objective.config()

    def __repr__(self) -> str:
        return f"RowBound({self.objective!r}, fields={sorted(self.rows)})"
