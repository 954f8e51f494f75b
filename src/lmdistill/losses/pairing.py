"""What objectives may learn about the run's two models before training: their tokenizers and shapes.

:meth:`lmdistill.losses.Objective.bind_models` receives a :class:`ModelPair` once, before the trainer is built:
cross-tokenizer objectives build their vocabulary maps from it, representation objectives size their learned
projections (so their parameters exist when the optimizer is made and resume exactly from checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lmdistill.models.vocab import SharedVocab, shared_vocab

__all__ = ["ModelPair", "model_shape"]


def model_shape(model: Any) -> tuple[int, int]:
    """(blocks, width) of a transformers model, from its config."""
    config = model.config
    return int(config.num_hidden_layers), int(config.hidden_size)


@dataclass
class ModelPair:
    """The run's teacher and student: tokenizers, output rows, blocks and widths. ``vocab`` is the ladder's
    string pairing when it made one (rungs 3-4), otherwise built on first use (``fold`` as in
    :func:`~lmdistill.models.vocab.shared_vocab`), as is FuseLLM's MinED map."""

    teacher_tokenizer: Any
    student_tokenizer: Any
    teacher_rows: int
    student_rows: int
    teacher_layers: int
    teacher_width: int
    student_layers: int
    student_width: int
    seed: int = 0
    fold: str = "prefix"
    vocab: SharedVocab | None = None
    _mined: Tensor | None = field(default=None, repr=False)

    @property
    def student_vocab(self) -> int:
        return len(self.student_tokenizer)

    def shared(self) -> SharedVocab:
        if self.vocab is None:
            self.vocab = shared_vocab(self.teacher_tokenizer, self.student_tokenizer, teacher_rows=self.teacher_rows,
                                      student_rows=self.student_rows, fold=self.fold)
        return self.vocab

    def mined_map(self) -> Tensor:
        if self._mined is None:
            from lmdistill.losses.alignment import min_edit_distance_map

            self._mined = min_edit_distance_map(self.teacher_tokenizer, self.student_tokenizer)
        return self._mined
