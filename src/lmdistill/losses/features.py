"""Representation objectives: distillation through both models' hidden states, combinable with logit objectives
in a ``mix`` (e.g. ``{mix: [{name: forward_kl}, {name: hidden_states, weight: 0.5}]}``).

They read the ``output_hidden_states`` tuples of student and teacher (:meth:`Objective.state_per_token`), not the
logits (``reads_logits`` False); their learned parts (projections from the student's width to the teacher's,
running class means) are sized from the run's models (:meth:`Objective.bind_models`), trained beside the student
and saved in checkpoints as tensors, so a resumed run continues exactly. The formulas live in
:mod:`lmdistill.losses.representation`; per-token values are 0 where the label is ignored and go through the
trainer's one reduction with the logit part.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.errors import ConfigError
from lmdistill.losses.core import Objective
from lmdistill.losses.pairing import ModelPair
from lmdistill.losses.representation import (
    ClassMeans,
    HiddenProjection,
    HiddenStateKD,
    nd_loss,
    resolve_layer_map,
    trg_inner_loss,
)
from lmdistill.losses.signals import CROSSTOK, SIGNAL_KINDS

__all__ = ["HiddenStateObjective", "TokenRelationObjective", "NormDirectionObjective"]

# every same-vocabulary signal: these objectives read hidden states, which the teacher gives beside its signal
_SAME_TOKENS = frozenset(SIGNAL_KINDS) - {CROSSTOK}


def _check_layers(layers: Any) -> Any:
    if isinstance(layers, str) and layers not in ("uniform", "last"):
        raise ValueError(f"layers must be 'uniform', 'last' or a list, got {layers!r}")
    return list(layers) if isinstance(layers, (list, tuple)) else layers


def _mask(labels: Tensor, states: Sequence[Tensor]) -> Tensor:
    b, length = states[0].shape[:2]
    return (labels.reshape(b, length) != IGNORE_INDEX).to(states[0].device)


class _StateObjective(Objective):
    reads_logits = False
    uses_states = True
    accepted_signals = _SAME_TOKENS

    def _bound(self, what: Any) -> Any:
        if what is None:
            raise ValueError(f"objective '{self.name}' is not sized yet: bind the run's models first (bind_models)")
        return what

    def per_token(self, student_logits: Tensor, teacher: Any, labels: Tensor | None, *, context: Any = None) -> Tensor:
        raise ValueError(f"objective '{self.name}' reads hidden states (state_per_token), not logits; the trainer "
                         "passes it both models' hidden states")


class HiddenStateObjective(_StateObjective):
    """Hidden-state KD over a layer map (``layers``: ``uniform``, ``last``, a list of teacher layers, one per student
    block, or ``[student, teacher]`` pairs), with a learned linear projection per mapped layer when the widths
    differ (FitNets, Romero et al., "FitNets: Hints for Thin Deep Nets", arXiv 1412.6550; TinyBERT's hidden-state
    loss, Jiao et al., arXiv 1909.10351). Per token: the mean over mapped layers of the MSE (``loss: mse``) or of
    ``1 - cos`` (``loss: cosine``) between the projected student state and the teacher's."""

    name = "hidden_states"

    def __init__(self, layers: Any = "uniform", loss: str = "mse") -> None:
        if loss not in ("mse", "cosine"):
            raise ValueError(f"loss must be 'mse' or 'cosine', got {loss!r}")
        self.layers = _check_layers(layers)
        self.loss = loss
        self.module: HiddenStateKD | None = None

    def bind_models(self, pair: ModelPair) -> None:
        try:
            self.module = HiddenStateKD(pair.student_layers, pair.teacher_layers, pair.student_width, pair.teacher_width,
                                        layers=self.layers, loss=self.loss, seed=pair.seed)
        except ConfigError as exc:
            raise ConfigError(f"objective hidden_states: {exc}") from None

    def state_per_token(self, student_states, teacher_states, labels: Tensor) -> Tensor:
        module = self._bound(self.module)
        return module(student_states, teacher_states, _mask(labels, student_states)).reshape(-1)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.module is None else list(self.module.parameters())

    def state_dict(self) -> dict:
        module = self._bound(self.module)
        return {"projection": {k: v.detach().clone() for k, v in module.projection.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self._bound(self.module).projection.load_state_dict(state["projection"])

    def config(self) -> dict:
        return {"name": self.name, "layers": self.layers, "loss": self.loss}


class TokenRelationObjective(_StateObjective):
    """The contextual (inner-instance) term of TRG (Zhang, Liu & He, "Knowledge Distillation via Token-level
    Relationship Graph", arXiv 2306.12442): per token, the squared difference of the two models' token-similarity
    rows ``softmax(F F^T / sqrt(d))`` within its sequence (:func:`~lmdistill.losses.representation.trg_inner_loss`),
    averaged over the mapped layers (default the last of each). Widths may differ: each side compares its own
    tokens. TRG's graph terms (local k-NN graphs and the global contrastive term over sampled tokens) are not wired
    into the trainer."""

    name = "trg"

    def __init__(self, layers: Any = "last") -> None:
        self.layers = _check_layers(layers)
        self.pairs: list[tuple[int, int]] | None = None

    def bind_models(self, pair: ModelPair) -> None:
        try:
            self.pairs = resolve_layer_map(self.layers, pair.student_layers, pair.teacher_layers)
        except ConfigError as exc:
            raise ConfigError(f"objective trg: {exc}") from None

    def state_per_token(self, student_states, teacher_states, labels: Tensor) -> Tensor:
        pairs = self._bound(self.pairs)
        mask = _mask(labels, student_states)
        total = sum(trg_inner_loss(student_states[s], teacher_states[t], mask) for s, t in pairs)
        return (total / len(pairs)).reshape(-1)

    def config(self) -> dict:
        return {"name": self.name, "layers": self.layers}


class NormDirectionObjective(_StateObjective):
    """Feature norm and direction loss (Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm
    and Direction", arXiv 2305.17007) on the final hidden states, the next token as the class
    (:func:`~lmdistill.losses.representation.nd_loss`), with a learned projection when the widths differ.

    The class centres are the teacher's mean final features per next token, accumulated over the training batches
    seen so far (the paper computes them over the training set beforehand; here they sharpen as training goes, and
    a token not seen yet gives no loss). They are part of the objective's checkpointed state; their memory is
    ``vocabulary x teacher width`` float64 numbers."""

    name = "nd"

    def __init__(self) -> None:
        self.projection: HiddenProjection | None = None
        self.means: ClassMeans | None = None

    def bind_models(self, pair: ModelPair) -> None:
        self.projection = HiddenProjection(pair.student_width, pair.teacher_width, 1, seed=pair.seed)
        self.means = ClassMeans(pair.student_vocab, pair.teacher_width)

    def state_per_token(self, student_states, teacher_states, labels: Tensor) -> Tensor:
        projection, means = self._bound(self.projection), self._bound(self.means)
        student = student_states[-1].reshape(-1, student_states[-1].shape[-1])
        teacher = teacher_states[-1].reshape(-1, teacher_states[-1].shape[-1]).detach()
        flat = labels.reshape(-1).to(student.device)
        means.update(teacher, flat)
        return nd_loss(projection(student), teacher, means.means(), flat)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.projection is None else list(self.projection.parameters())

    def state_dict(self) -> dict:
        projection, means = self._bound(self.projection), self._bound(self.means)
        return {"projection": {k: v.detach().clone() for k, v in projection.state_dict().items()},
                "means": means.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._bound(self.projection).load_state_dict(state["projection"])
        self._bound(self.means).load_state_dict(state["means"])
