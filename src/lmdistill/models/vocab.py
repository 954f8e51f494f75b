"""Teacher/student vocabulary compatibility.

Two cases users meet: (1) one tokenizer, output layers padded to different sizes (e.g. 151936 vs 152064
rows in one model family): not a mismatch; both logits are sliced to the tokenizer's real tokens, so
padding rows can never take probability mass. (2) Different token-to-id maps: a real mismatch, reported
before training with the differing tokens, never as a shape error inside a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from lmdistill.errors import ConfigError

CROSS_TOKENIZER_HINT = (
    "token-level distillation needs one token-to-id map; with different tokenizers distil on "
    "teacher-generated text (sequence-level KD) or use a cross-tokenizer objective"
)


@dataclass(frozen=True)
class VocabAlignment:
    """How to compare a student's and a teacher's logits column by column."""

    real_vocab_size: int  # tokens that exist in the (shared) tokenizer
    student_rows: int
    teacher_rows: int

    def slice(self, logits: torch.Tensor) -> torch.Tensor:
        """Keep the real tokens only; padded rows beyond them are dropped (their mass would be fake)."""
        return logits[..., : self.real_vocab_size]


def check_vocab_compatible(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    *,
    teacher_rows: int,
    student_rows: int,
    max_listed: int = 5,
) -> VocabAlignment:
    """Check that teacher and student share a token-to-id map; return how to align their logits."""
    t_vocab = teacher_tokenizer.get_vocab()
    s_vocab = student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab), key=t_vocab.get)[:max_listed]
        only_s = sorted(set(s_vocab) - set(t_vocab), key=s_vocab.get)[:max_listed]
        moved = sorted(
            (tok for tok in set(t_vocab) & set(s_vocab) if t_vocab[tok] != s_vocab[tok]), key=t_vocab.get
        )[:max_listed]
        parts = [f"teacher has {len(t_vocab)} tokens, student {len(s_vocab)}"]
        if only_t:
            parts.append("only in teacher: " + ", ".join(f"{tok!r}={t_vocab[tok]}" for tok in only_t))
        if only_s:
            parts.append("only in student: " + ", ".join(f"{tok!r}={s_vocab[tok]}" for tok in only_s))
        if moved:
            parts.append(
                "different ids: " + ", ".join(f"{tok!r} teacher={t_vocab[tok]} student={s_vocab[tok]}" for tok in moved)
            )
        raise ConfigError("teacher and student tokenizers differ (" + "; ".join(parts) + "). " + CROSS_TOKENIZER_HINT)
    real = len(t_vocab)
    for who, rows in (("teacher", teacher_rows), ("student", student_rows)):
        if rows < real:
            raise ConfigError(
                f"the {who}'s output layer has {rows} rows but its tokenizer has {real} tokens; "
                "the model was not built for this tokenizer"
            )
    return VocabAlignment(real_vocab_size=real, student_rows=student_rows, teacher_rows=teacher_rows)
