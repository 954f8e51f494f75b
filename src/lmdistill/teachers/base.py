"""The teacher-source contract: what the trainer, the evaluators and the regimes ask of any teacher.

A teacher source turns a training batch into a teacher signal (:mod:`lmdistill.losses.signals`). Live models,
offline caches and (later) remote teachers implement the same small interface, declare which signal kinds they
serve, and check before training whether they can serve an objective, so the trainer never asks which one it
has.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from lmdistill.errors import ConfigError
from lmdistill.losses import Objective
from lmdistill.losses.signals import Teacher, TeacherSignal

__all__ = ["TeacherSource", "TeacherBase"]


@runtime_checkable
class TeacherSource(Protocol):
    """What any teacher gives. Batches are the trainer's (``input_ids`` [B, L], optional ``attention_mask``,
    ``block_index`` for packed blocks); signals are flattened to the student's ``[B*L]`` rows."""

    #: one line naming the teacher, for logs and error messages
    description: str
    #: the signal kinds :meth:`signal` and :meth:`chunked_signal` give (``lmdistill.losses.signals.SIGNAL_KINDS``)
    signal_kinds: frozenset[str]
    #: True when :meth:`logits` can score arbitrary text (evaluation's agreement and KL to the teacher)
    scores_text: bool

    def signal(self, batch: dict[str, torch.Tensor]) -> Teacher:
        """The per-token teacher of a batch: dense logits ``[B*L, V]`` or a sparse teacher."""
        ...

    def chunked_signal(self, batch: dict[str, torch.Tensor]) -> TeacherSignal:
        """The cheapest signal for the chunked loss path (hidden states, low-rank codes, sparse, or dense)."""
        ...

    def chunked_mismatch(self, probe_ids: torch.Tensor) -> str | None:
        """Why the chunked signal would not give the logits the plain one does (e.g. soft-capped logits),
        checked on one probe row; ``None`` when they agree."""
        ...

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits ``[B, L, V]`` of any text (only when :attr:`scores_text`)."""
        ...

    #: True when :meth:`signal_and_states` can give the teacher's hidden states (representation objectives)
    serves_states: bool

    def signal_and_states(self, batch: dict[str, torch.Tensor], *, chunked: bool) -> tuple[TeacherSignal, tuple]:
        """:meth:`chunked_signal` (``chunked``) or :meth:`signal`, and the teacher's ``output_hidden_states`` tuple
        (``[B, L, d]`` each), from one forward."""
        ...

    def check_objective(self, objective: Objective) -> None:
        """Raise a :class:`~lmdistill.errors.ConfigError` when this teacher cannot serve ``objective``."""
        ...


class TeacherBase:
    """Defaults shared by the teacher sources: the objective check from :attr:`signal_kinds` and no text scoring."""

    description: str = "teacher"
    signal_kinds: frozenset[str] = frozenset()
    scores_text: bool = False
    serves_states: bool = False

    def chunked_mismatch(self, probe_ids: torch.Tensor) -> str | None:
        return None

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise ConfigError(f"{self.description} cannot score arbitrary text (it serves stored positions only)")

    def refusal_advice(self, kind: str) -> str:
        """What to do when an objective cannot use this teacher's ``kind`` signals (one clause)."""
        return "choose an objective that accepts it, or another teacher"

    def signal_and_states(self, batch: dict[str, torch.Tensor], *, chunked: bool) -> tuple[TeacherSignal, tuple]:
        raise ConfigError(f"{self.description} gives no hidden states")

    def check_objective(self, objective: Objective) -> None:
        if objective.uses_states and not self.serves_states:
            parts = sorted({o.name for o in objective.leaves() if o.uses_states})
            raise ConfigError(
                f"objective part(s) {', '.join(parts)} read the teacher's hidden states, which {self.description} "
                "does not give (a cache stores none); use a live teacher (teacher.path), with any tokenizer"
            )
        for kind in sorted(self.signal_kinds):
            refused = objective.refusals(kind)
            if refused:
                raise ConfigError(
                    f"{self.description} gives {kind} teacher signals; objective part(s) {', '.join(sorted(set(refused)))} "
                    f"{self.refusal_advice(kind)}"
                )
