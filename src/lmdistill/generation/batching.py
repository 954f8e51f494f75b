"""Padded prompt/response batches: the unit every generation regime trains on.

A training example is ``BOS + prompt tokens + response tokens + EOS``: prompt and response are
tokenized separately, without special tokens, and the sequence starts with the tokenizer's BOS (for
lmdistill's tokenizers the EOS token, which doubles as BOS). That is exactly how a document sits in
the packed stream of :func:`lmdistill.data.blocks.tokenize_documents` (every document follows an
EOS), so a model pretrained on packed text, fine-tuned on these batches and asked to generate sees
one layout and the same prompt/response token boundary throughout. A batch is right-padded:

- ``input_ids`` [B, L]: the sequence without its last token, padded with the pad id;
- ``labels`` [B, L]: pre-shifted targets (``logits[:, t]`` predicts ``labels[:, t]``), equal to the
  next token where that token belongs to the response or is the closing EOS, -100 elsewhere
  (prompt, padding);
- ``attention_mask`` [B, L]: 1 on real tokens.

Sequences longer than ``max_length + 1`` tokens lose the end of their response (and the EOS);
a prompt longer than ``max_length`` keeps its last ``max_length - 1`` tokens so at least one
response token stays a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmdistill.constants import IGNORE_INDEX
from lmdistill.data.documents import Document
from lmdistill.errors import DataError
from lmdistill.train.schedule import BatchSchedule


@dataclass(frozen=True)
class Example:
    """One tokenized prompt/response pair. ``response`` includes the closing EOS when the response
    is complete (always for references; for a generated response only when the model emitted EOS)."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched fast path when available)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def bos_id_of(tokenizer: Any) -> int:
    """The id that starts every sequence: the tokenizer's BOS, else its EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """``[BOS] + tokens`` of each prompt: what generation starts from and training sequences begin with."""
    ids = encode_texts(tokenizer, prompts)
    bos = bos_id_of(tokenizer)
    for prompt, tokens in zip(prompts, ids):
        if not tokens:
            raise DataError(f"prompt {prompt!r} has no tokens")
    return [[bos] + tokens for tokens in ids]


def encode_examples(tokenizer: Any, docs: Sequence[Document]) -> list[Example]:
    """Tokenize prompt/response documents: ``[BOS] + prompt``, and the response with the EOS appended."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token", hint="load it with lmdistill.data.load_tokenizer")
    for doc in docs:
        if doc.prompt is None:
            raise DataError(f"document {doc.doc_id!r} has no prompt/response", hint="use a task's documents")
    prompts = encode_prompts(tokenizer, [d.prompt for d in docs])  # type: ignore[misc]
    responses = encode_texts(tokenizer, [d.response for d in docs])  # type: ignore[misc]
    return [Example(tuple(p), tuple(r) + (eos,)) for p, r in zip(prompts, responses)]


def pad_id_of(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate_examples(examples: Sequence[Example], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels``, ``attention_mask`` (see the module docstring)."""
    if not examples:
        raise ValueError("collate_examples got no examples")
    rows: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        prompt = list(ex.prompt)
        if len(prompt) >= max_length:
            prompt = prompt[-(max_length - 1):]
        seq = (prompt + list(ex.response))[: max_length + 1]
        targets = [IGNORE_INDEX] * (len(prompt) - 1) + seq[len(prompt):]
        rows.append((seq[:-1], targets))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(targets)] = torch.tensor(targets, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


class PromptResponseSource:
    """The ``fixed`` regime: prompt/response examples in a seeded order, loss on responses only.

    The order is :class:`~lmdistill.train.schedule.BatchSchedule` over examples (a pure function of
    seed and step), so the data position of a run is its step number and resume is exact. Each
    batch carries ``example_index`` [B] (which examples it holds). Also the base of the other
    regimes, which transform the examples of a step before collating them.
    """

    def __init__(
        self, examples: Sequence[Example], *, pad_id: int, global_batch: int, seed: int, max_length: int = 128
    ) -> None:
        if not examples:
            raise DataError("the task's training split has no examples")
        self.examples = list(examples)
        self.pad_id = pad_id
        self.max_length = max_length
        self.seed = seed
        self.schedule = BatchSchedule(len(self.examples), global_batch, seed)
        self.trainer: Any = None

    @classmethod
    def from_documents(
        cls, docs: Sequence[Document], tokenizer: Any, *, global_batch: int, seed: int, max_length: int = 128, **kwargs: Any
    ) -> PromptResponseSource:
        return cls(
            encode_examples(tokenizer, docs), pad_id=pad_id_of(tokenizer), global_batch=global_batch,
            seed=seed, max_length=max_length, **kwargs,
        )

    def step_examples(self, step: int, rank: int, world_size: int, micro_batch: int) -> list[tuple[Any, list[Example]]]:
        """(index array, examples) of each of this rank's micro-batches of optimizer step ``step``."""
        return [
            (idx, [self.examples[int(i)] for i in idx])
            for idx in self.schedule.micro_batches(step, rank, world_size, micro_batch)
        ]

    def transform(self, examples: list[Example], step: int, rank: int, micro_index: int) -> dict[str, torch.Tensor]:
        """Build one micro-batch from its examples (regimes override this)."""
        return collate_examples(examples, self.pad_id, self.max_length)

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for j, (idx, examples) in enumerate(self.step_examples(step, rank, world_size, micro_batch)):
            batch = self.transform(examples, step, rank, j)
            batch["example_index"] = torch.as_tensor(idx, dtype=torch.long)
            out.append(batch)
        return out

    def bind(self, trainer: Any) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

