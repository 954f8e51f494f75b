"""A live teacher: a causal LM run forward (no gradients) on every batch."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lmdistill.models.vocab import VocabAlignment


class LiveTeacher:
    """Teacher signal from a model in memory. Logits are sliced to the shared real vocabulary, so
    padded output rows (one tokenizer, differently padded embeddings) never carry probability mass."""

    def __init__(self, model: PreTrainedModel, alignment: VocabAlignment) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.alignment = alignment

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits [B, L, V_real] in the teacher's dtype (losses upcast)."""
        return self.alignment.slice(self.model(input_ids=input_ids, attention_mask=attention_mask).logits)

    def signal(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher logits for a training batch, flattened to [B*L, V_real] like the student's."""
        logits = self.logits(batch["input_ids"], batch.get("attention_mask"))
        return logits.reshape(-1, logits.shape[-1])

    def chunked_signal(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(hidden [B*L, H], weight [V_real, H][, bias [V_real]]) for the chunked loss path."""
        hidden, weight, bias = self.hidden_and_weight(batch["input_ids"], batch.get("attention_mask"))
        flat = hidden.reshape(-1, hidden.shape[-1])
        return (flat, weight) if bias is None else (flat, weight, bias)

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
