"""Task metrics: ROUGE-L, exact match, and the teacher's log-likelihood of a model's outputs.

ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", ACL workshop) scores a
candidate against a reference by their longest common subsequence (LCS) of words:

    R = LCS / len(reference),  P = LCS / len(candidate),  F_beta = (1 + beta^2) R P / (R + beta^2 P)

with F = 0 when the LCS is 0. ``beta = 1`` (the F1 that the distillation literature reports, e.g.
MiniLLM and GKD, through the common ``rougeL`` implementations) is the default. Words are the
lower-cased alphanumeric runs of the text (punctuation separates words and is not itself a word).

Exact match compares whitespace-normalised, lower-cased strings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmdistill.data.documents import Document
from lmdistill.eval.lm import add_token_sums
from lmdistill.generation.batching import (
    Example,
    collate_examples,
    encode_examples,
    encode_prompts,
    encode_texts,
    pad_id_of,
)
from lmdistill.generation.sampling import SamplingParams, generate, sequence_logprobs, strip_eos
from lmdistill.generation.tasks import reference_of
from lmdistill.models.modes import eval_mode

_WORD = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)) time,
    O(min) memory)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            current[j] = previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure of ``candidate`` against ``reference`` (see the module docstring)."""
    cand, ref = rouge_tokens(candidate), rouge_tokens(reference)
    if not cand or not ref:
        return 0.0
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    recall, precision = lcs / len(ref), lcs / len(cand)
    return (1 + beta**2) * recall * precision / (recall + beta**2 * precision)


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(candidate: str, reference: str) -> bool:
    return normalize_answer(candidate) == normalize_answer(reference)


@dataclass
class GenerationScores:
    """Corpus-level scores: mean ROUGE-L and exact match over examples; the teacher's log-likelihood
    of the generated tokens (EOS included when generated) averaged over tokens (nats/token), and per
    example summed."""

    rouge_l: float
    exact_match: float
    n: int
    teacher_logprob_per_token: float | None = None
    teacher_logprob_per_example: float | None = None
    mean_response_tokens: float = 0.0
    samples: list[dict[str, str]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, float]:
        out = {"rouge_l": self.rouge_l, "exact_match": self.exact_match, "n": self.n,
               "mean_response_tokens": self.mean_response_tokens}
        if self.teacher_logprob_per_token is not None:
            out["teacher_logprob_per_token"] = self.teacher_logprob_per_token
            out["teacher_logprob_per_example"] = self.teacher_logprob_per_example
        return out


def score_texts(candidates: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(mean ROUGE-L, exact-match rate)."""
    if len(candidates) != len(references):
        raise ValueError("score_texts: candidates and references differ in number")
    if not candidates:
        return 0.0, 0.0
    rl = sum(rouge_l(c, r) for c, r in zip(candidates, references)) / len(candidates)
    em = sum(exact_match(c, r) for c, r in zip(candidates, references)) / len(candidates)
    return rl, em


@torch.no_grad()
def evaluate_generation(
    model: torch.nn.Module,
    tokenizer: Any,
    docs: Sequence[Document],
    *,
    params: SamplingParams = SamplingParams(greedy=True),
    teacher: torch.nn.Module | None = None,
    batch_size: int = 32,
    vocab_size: int | None = None,
    seed: int = 0,
    keep_samples: int = 5,
) -> GenerationScores:
    """Generate an answer for each document's prompt and score it against the document's reference;
    with ``teacher`` also the teacher's log-likelihood of the generated tokens."""
    eos, pad = tokenizer.eos_token_id, pad_id_of(tokenizer)
    vocab_size = vocab_size or len(tokenizer)
    prompts = encode_prompts(tokenizer, [d.prompt for d in docs])  # type: ignore[misc]
    generator = torch.Generator().manual_seed(seed)
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        outputs += generate(
            model, prompts[start : start + batch_size], eos_token_id=eos, pad_token_id=pad,
            params=params, generator=generator, vocab_size=vocab_size,
        )
    texts = [tokenizer.decode(strip_eos(o, eos), skip_special_tokens=True) for o in outputs]
    references = [reference_of(d) for d in docs]
    rl, em = score_texts(texts, references)
    scores = GenerationScores(rouge_l=rl, exact_match=em, n=len(docs),
                              mean_response_tokens=sum(len(o) for o in outputs) / max(1, len(outputs)))
    if teacher is not None:
        ll = sequence_logprobs(teacher, prompts, outputs, pad_token_id=pad, vocab_size=vocab_size, batch_size=batch_size)
        total = sum(s for s, _ in ll)
        count = sum(n for _, n in ll)
        scores.teacher_logprob_per_token = total / max(1, count) if math.isfinite(total) else float("-inf")
        scores.teacher_logprob_per_example = total / max(1, len(ll))
    scores.samples = [
        {"prompt": d.prompt or "", "reference": r, "output": t} for d, r, t in list(zip(docs, references, texts))[:keep_samples]
    ]
    return scores


def _slice_logits(logits: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    return logits[..., :vocab_size] if vocab_size is not None else logits


@torch.no_grad()
def response_token_sums(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    pad_id: int,
    max_length: int,
    batch_size: int = 32,
    vocab_size: int | None = None,
    teacher: Any = None,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """float64 sums over the response targets (response tokens and closing EOS, never prompt or
    padding) of padded prompt/response batches: [summed NLL (nats), number of targets, top-1
    agreements with the teacher, summed KL(teacher || student)]. The last two stay 0 without a
    ``teacher`` (an object with ``logits(input_ids, attention_mask)``). Batches ``rank, rank +
    world_size, ...`` only, so ranks can split the work and all-reduce the sums."""
    sums = torch.zeros(4, dtype=torch.float64)
    device = next(model.parameters()).device
    with eval_mode(model):
        n_batches = -(-len(examples) // batch_size)
        for b in range(rank, n_batches, world_size):
            batch = collate_examples(examples[b * batch_size : (b + 1) * batch_size], pad_id, max_length)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = _slice_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, vocab_size)
            t_logits = None
            if teacher is not None:
                t_logits = _slice_logits(teacher.logits(batch["input_ids"], batch["attention_mask"]), vocab_size)
                # one real vocabulary for both (padded embedding rows carry no mass)
                shared = min(logits.shape[-1], t_logits.shape[-1])
                logits, t_logits = logits[..., :shared], t_logits[..., :shared].double()
            add_token_sums(sums, logits.double(), batch["labels"], t_logits)
    return sums


@torch.no_grad()
def response_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    docs: Sequence[Document],
    *,
    batch_size: int = 32,
    vocab_size: int | None = None,
    max_length: int = 256,
) -> float:
    """Mean negative log-likelihood (nats/token) of the reference responses and their closing EOS given
    the prompts, computed on padded prompt/response batches (the layout the task regimes train on; the
    trainer's packed-block validation puts examples at arbitrary positions instead)."""
    sums = response_token_sums(model, encode_examples(tokenizer, docs), pad_id=pad_id_of(tokenizer),
                               max_length=max_length, batch_size=batch_size, vocab_size=vocab_size)
    return sums[0].item() / max(1.0, sums[1].item())


__all__ = [
    "GenerationScores",
    "encode_texts",
    "evaluate_generation",
    "exact_match",
    "lcs_length",
    "normalize_answer",
    "response_nll",
    "response_token_sums",
    "rouge_l",
    "rouge_tokens",
    "score_texts",
]
