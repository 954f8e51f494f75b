"""A live teacher: a causal LM run forward (no gradients) on every batch."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import VocabConfig
from lmdistill.losses import Objective
from lmdistill.losses.signals import CROSSTOK, DENSE, HIDDEN, HiddenStates
from lmdistill.models.heads import LogitTransform, linear_head_mismatch, logit_transform
from lmdistill.models.vocab import SAME_MAP_RUNGS, VocabAlignment, check_vocab_compatible, require_rung, vocab_ladder
from lmdistill.teachers.base import TeacherBase

__all__ = ["LiveTeacher", "load_live_teacher"]


class LiveTeacher(TeacherBase):
    """Teacher signal from a model in memory: dense logits (plain path) or its final hidden states with its
    output layer (chunked path). Logits are sliced to the shared real vocabulary, so padded output rows (one
    tokenizer, differently padded embeddings) never carry probability mass."""

    signal_kinds = frozenset({DENSE, HIDDEN})
    scores_text = True
    serves_states = True

    def __init__(self, model: PreTrainedModel, alignment: VocabAlignment, name: str | None = None) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.alignment = alignment
        self.pairing = alignment  # the vocabulary ladder's result (an aligned teacher's may be a SharedVocab)
        self.transform = logit_transform(model.config) or LogitTransform()
        self.description = f"the live teacher {name}" if name else "the live teacher"

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits [B, L, V_real] in the teacher's dtype (losses upcast)."""
        return self.alignment.slice(self.model(input_ids=input_ids, attention_mask=attention_mask).logits)

    def signal(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher logits for a training batch, flattened to [B*L, V_real] like the student's."""
        logits = self.logits(batch["input_ids"], batch.get("attention_mask"))
        return logits.reshape(-1, logits.shape[-1])

    def chunked_signal(self, batch: dict[str, torch.Tensor]) -> HiddenStates:
        """Final hidden states [B*L, H] with the output layer [V_real, H] (and bias) for the chunked loss path, and
        the model's known logit post-processing (soft-capping, scaling), applied per chunk."""
        hidden, weight, bias = self.hidden_and_weight(batch["input_ids"], batch.get("attention_mask"))
        return HiddenStates(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                            softcap=self.transform.softcap, scale=self.transform.scale)

    @torch.no_grad()
    def signal_and_states(self, batch: dict[str, torch.Tensor], *, chunked: bool) -> tuple[torch.Tensor | HiddenStates, tuple]:
        """The signal of :meth:`signal` (or :meth:`chunked_signal`) and every hidden state, from one forward."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        extra = {} if mask is None else {"attention_mask": mask}
        if chunked:
            out = self.model.base_model(input_ids=ids, output_hidden_states=True, **extra)
            head = self.model.get_output_embeddings()
            real = self.alignment.real_vocab_size
            bias = getattr(head, "bias", None)
            hidden = out.last_hidden_state
            signal = HiddenStates(hidden.reshape(-1, hidden.shape[-1]), head.weight[:real],
                                  None if bias is None else bias[:real], softcap=self.transform.softcap,
                                  scale=self.transform.scale)
            return signal, out.hidden_states
        out = self.model(input_ids=ids, output_hidden_states=True, **extra)
        logits = self.alignment.slice(out.logits)
        return logits.reshape(-1, logits.shape[-1]), out.hidden_states

    def chunked_mismatch(self, probe_ids: torch.Tensor) -> str | None:
        return linear_head_mismatch(self.model, probe_ids, lambda m: self.hidden_and_weight(probe_ids)[0],
                                    allow_transform=True)

    @torch.no_grad()
    def hidden_and_weight(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Final hidden states [B, L, H], output weight [V_real, H] and bias [V_real] (or None): the chunked
        loss path builds teacher logits chunk by chunk from these instead of materialising [B, L, V]."""
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        hidden = self.model.base_model(input_ids=input_ids, **extra).last_hidden_state
        head = self.model.get_output_embeddings()
        real = self.alignment.real_vocab_size
        bias = getattr(head, "bias", None)
        return hidden, head.weight[:real], None if bias is None else bias[:real]


def load_live_teacher(
    path: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str = "float32",
    student_tokenizer: PreTrainedTokenizerBase | None = None,
    student_rows: int | None = None,
    device: torch.device | str | None = None,
    vocab: VocabConfig | None = None,
    objective: Objective | None = None,
) -> TeacherBase:
    """Load a teacher model (local directory or hub id) and pair its vocabulary with the student's: the one
    loader of training, evaluation and ``cache-teacher``. ``tokenizer`` is the teacher's own; without a student
    (``cache-teacher``) the teacher is aligned with itself (its real tokens only).

    With a student, the rung of the vocabulary ladder is chosen (or forced by ``vocab``, a
    :class:`~lmdistill.config.VocabConfig`) and logged. Rungs 1-2 (one token-to-id map) give a
    :class:`LiveTeacher` unless ``objective`` is a cross-tokenizer one. With an ``objective`` (a training run on
    packed text), a cross-tokenizer objective or rung 3 (partial: the caller runs same-vocabulary objectives on
    aligned spans, :func:`lmdistill.losses.on_aligned_spans`) gives an
    :class:`~lmdistill.teachers.aligned.AlignedLiveTeacher`. Anything else off rungs 1-2 is refused, naming the
    differing tokens."""
    from lmdistill.models.loading import load_causal_lm

    model = load_causal_lm(str(path), dtype=dtype)
    if device is not None:
        model = model.to(device)
    rows = model.get_output_embeddings().weight.shape[0]
    if student_tokenizer is None:
        alignment = check_vocab_compatible(tokenizer, tokenizer, teacher_rows=rows, student_rows=rows)
        return LiveTeacher(model, alignment, name=str(path))
    ladder = {} if vocab is None else {"rung": vocab.rung, "min_shared_fraction": vocab.min_shared_fraction,
                                       "fold": vocab.fold}
    # logs which rung of the vocabulary ladder applies and why
    pairing = vocab_ladder(tokenizer, student_tokenizer, teacher_rows=rows,
                           student_rows=student_rows if student_rows is not None else rows, **ladder)
    # objectives that accept the aligned signal: cross-tokenizer ones (they accept nothing else) always take the
    # aligned teacher; representation objectives (they accept any signal) follow the rung
    accepts = objective is not None and objective.requires_teacher and not objective.refusals(CROSSTOK)
    only_aligned = accepts and any(not (o.accepted_signals - {CROSSTOK}) for o in objective.leaves() if o.requires_teacher)
    cross = only_aligned or (accepts and pairing.rung not in SAME_MAP_RUNGS)
    if objective is not None and (cross or pairing.rung == "partial"):
        from lmdistill.teachers.aligned import AlignedLiveTeacher, teacher_max_positions

        return AlignedLiveTeacher(model, tokenizer, student_tokenizer, pairing, name=str(path),
                                  max_positions=teacher_max_positions(str(path)))
    require_rung(pairing, "token-level distillation with a same-vocabulary objective", SAME_MAP_RUNGS)
    return LiveTeacher(model, pairing, name=str(path))
