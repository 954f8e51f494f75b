"""A live teacher with its own tokenizer (vocabulary rungs 3 and 4): it reads the student's text in its own tokens.

For each batch the student's tokens are turned back into text, the teacher tokenizes that text itself, and the
two tokenizations are paired by character offsets (:class:`~lmdistill.losses.alignment.CrossTokenizerBatcher`).
The teacher never receives a student id: its signal is an :class:`~lmdistill.losses.crosstok.AlignedTeacher`,
its logits over its own vocabulary and the alignment, which only cross-tokenizer objectives accept; its hidden
states come with the same alignment (:class:`~lmdistill.losses.representation.AlignedStates`), which the
representation objectives compare with the student's at the aligned span ends.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import model_positions
from lmdistill.constants import IGNORE_INDEX
from lmdistill.errors import ConfigError
from lmdistill.losses.alignment import CrossTokenizerBatcher
from lmdistill.losses.crosstok import AlignedTeacher
from lmdistill.losses.representation import AlignedStates
from lmdistill.losses.signals import CROSSTOK
from lmdistill.models.vocab import SharedVocab, VocabAlignment
from lmdistill.teachers.base import TeacherBase

__all__ = ["AlignedLiveTeacher", "teacher_max_positions"]


class AlignedLiveTeacher(TeacherBase):
    """Teacher signal across tokenizers: the teacher's logits over its own real vocabulary for its own tokenization
    of each student sequence, with the alignment of the two. Runs on packed blocks (every row a full block of
    text); the plain loss path, except for objectives that take the student's rows chunk by chunk (projected_kd)."""

    signal_kinds = frozenset({CROSSTOK})
    scores_text = False  # it cannot score student ids; agreement metrics need one vocabulary
    serves_states = True  # its hidden states in its own tokens, with the alignment (representation objectives)

    def __init__(
        self,
        model: PreTrainedModel,
        teacher_tokenizer: PreTrainedTokenizerBase,
        student_tokenizer: PreTrainedTokenizerBase,
        pairing: VocabAlignment | SharedVocab,
        name: str | None = None,
        max_positions: int | None = None,
    ) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pairing = pairing
        self.teacher_tokenizer = teacher_tokenizer
        self.vocab_size = len(teacher_tokenizer)
        bos = teacher_tokenizer.bos_token_id
        # a teacher trained with a leading BOS sees one; the byte-level demo tokenizers have none
        prefix = (bos,) if bos is not None and getattr(teacher_tokenizer, "add_bos_token", False) else ()
        self.batcher = CrossTokenizerBatcher(student_tokenizer, teacher_tokenizer, teacher_prefix_ids=prefix)
        self.student_eos = student_tokenizer.eos_token_id
        self.max_positions = max_positions
        self.description = f"the live teacher {name} (its own tokenizer)" if name else "the live teacher (its own tokenizer)"

    def refusal_advice(self, kind: str) -> str:
        return ("cannot compare distributions across tokenizers; use a cross-tokenizer objective (projected_kd, span_kd, uld, mined, "
                "or a mix of one with cross_entropy), or give both models one tokenizer")

    def student_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The student's tokens of each row, ``[B, L + 1]``: the inputs and the final label."""
        if "attention_mask" in batch:
            raise ConfigError(
                f"{self.description} works on packed blocks of text (lmdistill train / distill); padded task batches "
                "(generation regimes) need one tokenizer for teacher and student"
            )
        input_ids, labels = batch["input_ids"], batch["labels"]
        last = labels[:, -1:]
        filler = self.student_eos if self.student_eos is not None else 0
        last = torch.where(last == IGNORE_INDEX, torch.full_like(last, filler), last)
        return torch.cat([input_ids, last], dim=1)

    @torch.no_grad()
    def signal(self, batch: dict[str, torch.Tensor]) -> AlignedTeacher:
        return self._forward(batch, states=False)[0]

    def chunked_signal(self, batch: dict[str, torch.Tensor]) -> AlignedTeacher:
        # the same signal: the chunked path cuts the student's rows, which only some objectives take (the trainer
        # keeps the plain path for the others)
        return self.signal(batch)

    @torch.no_grad()
    def signal_and_states(self, batch: dict[str, torch.Tensor], *, chunked: bool) -> tuple[AlignedTeacher, AlignedStates]:
        """The signal of :meth:`signal` and every hidden state of the same forward, in the teacher's own tokens, as
        :class:`~lmdistill.losses.representation.AlignedStates` (with the alignment): representation objectives
        compare them with the student's at the aligned span ends. ``chunked`` changes nothing (the signal is the
        same on both paths)."""
        return self._forward(batch, states=True)

    def _forward(self, batch: dict[str, torch.Tensor], *, states: bool) -> tuple[AlignedTeacher, AlignedStates | None]:
        inputs = self.batcher(self.student_tokens(batch).cpu(), max_teacher_len=self.max_positions)
        device = next(self.model.parameters()).device
        out = self.model(input_ids=inputs.teacher_input_ids.to(device),
                         attention_mask=inputs.teacher_attention_mask.to(device), output_hidden_states=states)
        logits = out.logits[..., : self.vocab_size]
        alignment = inputs.alignment.to(device)
        signal = AlignedTeacher(logits.reshape(-1, logits.shape[-1]), alignment, inputs.teacher_valid.to(device),
                                self.vocab_size)
        return signal, AlignedStates(out.hidden_states, alignment) if states else None


def teacher_max_positions(path: str) -> int | None:
    """The longest input a saved teacher takes when its positions are a learned table (None for rotary models,
    which take longer inputs, degrading)."""
    found = model_positions(path)
    return found[0] if found is not None and found[2] else None
