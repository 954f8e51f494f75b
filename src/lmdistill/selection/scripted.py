"""A teacher written as a Python function, served through the real OpenAI-compatible server.

:class:`FunctionLM` looks like a causal LM to :class:`~lmdistill.generation.server.ModelServer` (and to
:func:`~lmdistill.generation.sampling.generate`): at the prompt's forward pass it decodes the prompt, calls
``answer(prompt_text)`` and then emits the answer's tokens one by one (each as the only finite logit) and an EOS.
So a scripted teacher (a test's), or a teacher that is not a neural LM (``bench/data_centric.py``'s retrieval
teacher over a labelled pool), goes through the same HTTP client, retries, store and budget as a real endpoint.

It supports the KV-cache path the server uses (the "cache" is the answer and the position in it); the whole-
sequence path without a cache is refused, since it could not tell the prompt from the answer.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from lmdistill.errors import LmdistillError

NO_TOKEN = -1e4  # every other token's logit: exp(-1e4) is 0 in float32, so greedy and sampling pick the answer's


class FunctionLM(torch.nn.Module):
    """Continues a prompt with ``answer(prompt_text) + EOS`` (see the module docstring). ``tokenizer`` must
    round-trip text (a byte-level BPE does); ``context`` is the length the server may ask for."""

    def __init__(self, tokenizer: Any, answer: Callable[[str], str], *, context: int = 1 << 20) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.answer = answer
        self.vocab_size = len(tokenizer)
        self.config = SimpleNamespace(n_positions=context)
        self._device_anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.calls = 0

    def _start(self, input_ids: torch.Tensor) -> dict[str, Any]:
        if input_ids.shape[0] != 1:
            raise LmdistillError("FunctionLM answers one prompt at a time (the server sends one)")
        prompt = self.tokenizer.decode(input_ids[0].tolist(), skip_special_tokens=True)
        self.calls += 1
        text = self.answer(prompt)
        tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return {"tokens": list(tokens) + [self.tokenizer.eos_token_id], "emitted": 0}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: Any = None,
                past_key_values: dict[str, Any] | None = None, use_cache: bool = False, **_: Any) -> SimpleNamespace:
        if past_key_values is None:
            if not use_cache:
                raise LmdistillError("FunctionLM needs the KV-cache generation path (use_cache=True)")
            past_key_values = self._start(input_ids)
        tokens = past_key_values["tokens"]
        token = tokens[min(past_key_values["emitted"], len(tokens) - 1)]
        past_key_values["emitted"] += 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab_size), NO_TOKEN)
        logits[:, -1, token] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


__all__ = ["FunctionLM"]
