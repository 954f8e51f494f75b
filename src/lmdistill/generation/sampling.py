"""Generation for causal LMs: greedy or sampled, batched, with or without the KV cache.

Our own loop rather than ``model.generate``: it returns exactly the token ids the distillation
regimes need (no special-token or padding conventions to undo), takes a ``torch.Generator`` so
on-policy samples are a pure function of (seed, step) and resume is exact, slices logits to the real
vocabulary (padded output rows never get sampled) and runs the same arithmetic with and without the
cache, which the tests check token for token.

Batching: prompts are LEFT-padded so every row's next token sits in the last column; the attention
mask hides the padding and position ids count real tokens only, so a padded row computes the same
function as the prompt alone. With ``use_cache`` only the newest token is fed at each step and the
keys/values of earlier ones come from the cache (``past_key_values``); without it the whole sequence
is re-run every step (the reference the cached path must equal).

:func:`generate_mixed` runs the same loop over two models (student and teacher, each with its own cache) and
draws every token from MiniLLM's teacher-mixed distribution ``alpha p + (1 - alpha) q``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmdistill.errors import ConfigError
from lmdistill.models.modes import eval_mode


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 48

    @classmethod
    def from_config(cls, cfg: object) -> SamplingParams:
        return cls(
            greedy=cfg.greedy, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,  # type: ignore[attr-defined]
            max_new_tokens=cfg.max_new_tokens,  # type: ignore[attr-defined]
        )


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits [B, V] divided by the temperature, with tokens outside the top-k and outside the
    smallest set whose probability reaches top-p (nucleus sampling, Holtzman et al. 2019, arXiv
    1904.09751) set to -inf. The most likely token always survives."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from next-token logits [B, V]."""
    if params.greedy:
        return logits.argmax(-1)
    probs = F.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
            mask[i, width - len(p):] = 1
    return ids, mask


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    pad_token_id: int | None = None,
    params: SamplingParams = SamplingParams(),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Continue each prompt (token ids) until EOS or ``params.max_new_tokens`` new tokens.

    Returns, per prompt, the generated tokens; the EOS is included as the last token when the model
    produced it (a response without a final EOS was cut by the length limit). ``vocab_size`` limits
    the candidates to the first ``vocab_size`` logits (the tokenizer's real tokens). The model is put
    in eval mode for the call and restored afterwards.
    """
    return _decode([model], prompts, lambda logits: next_tokens(logits[0], params, generator),
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, max_new_tokens=params.max_new_tokens,
                   use_cache=use_cache, vocab_size=vocab_size)


def mixed_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """MiniLLM's teacher-mixed next-token distribution ``alpha p + (1 - alpha) q`` [B, V] from the student's and
    the teacher's next-token logits [B, V] (temperature 1; both cut to the narrower vocabulary)."""
    n = min(student_logits.shape[-1], teacher_logits.shape[-1])
    q = F.softmax(student_logits[..., :n].float(), dim=-1)
    p = F.softmax(teacher_logits[..., :n].float(), dim=-1)
    return alpha * p + (1.0 - alpha) * q


@torch.no_grad()
def generate_mixed(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    prompts: Sequence[Sequence[int]],
    *,
    alpha: float,
    eos_token_id: int,
    pad_token_id: int | None = None,
    max_new_tokens: int = 48,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Like :func:`generate`, each token drawn from ``alpha p + (1 - alpha) q`` (:func:`mixed_probs`): the
    teacher-mixed sampling of MiniLLM (Gu et al., arXiv 2306.08543, Eq. 4), both models stepping through the same
    prefixes (each with its own KV cache). ``alpha = 0`` draws exactly what :func:`generate` draws from the student
    at temperature 1 with the same generator, ``alpha = 1`` what it draws from the teacher; only models with a
    nonzero share are run (``teacher`` may be None when ``alpha = 0``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if teacher is None and alpha > 0:
        raise ValueError("generate_mixed: alpha > 0 needs the teacher model")
    models = [m for m, share in ((student, 1.0 - alpha), (teacher, alpha)) if share > 0 and m is not None]

    def choose(logits: list[torch.Tensor]) -> torch.Tensor:
        if len(logits) == 1:
            probs = F.softmax(logits[0].float(), dim=-1)
        else:
            probs = mixed_probs(logits[0], logits[1], alpha)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return _decode(models, prompts, choose, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                   max_new_tokens=max_new_tokens, use_cache=use_cache, vocab_size=vocab_size)


def _decode(
    models: Sequence[torch.nn.Module],
    prompts: Sequence[Sequence[int]],
    choose: Callable[[list[torch.Tensor]], torch.Tensor],
    *,
    eos_token_id: int,
    pad_token_id: int | None,
    max_new_tokens: int,
    use_cache: bool,
    vocab_size: int | None,
) -> list[list[int]]:
    """The decoding loop: every model reads the same left-padded prefixes; ``choose`` turns their next-token logits
    (one [B, V] per model, cut to ``vocab_size``) into one token per row."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    pad = eos_token_id if pad_token_id is None else pad_token_id
    device = next(models[0].parameters()).device
    longest = max(len(p) for p in prompts) + max_new_tokens
    for model in models:
        limit = _max_positions(model)
        if limit is not None and longest > limit:
            raise ConfigError(
                f"generation needs {longest} positions (prompt {longest - max_new_tokens} + {max_new_tokens} "
                f"new tokens) but the model has {limit}; lower max_new_tokens or shorten the prompts"
            )
    with contextlib.ExitStack() as modes:
        for model in models:
            modes.enter_context(eval_mode(model))
        ids, mask = _left_pad(prompts, pad, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = ids.shape[0]
        out: list[list[int]] = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        pasts: list = [None] * len(models)
        step_ids, step_pos = ids, positions
        for _ in range(max_new_tokens):
            logits = []
            for k, model in enumerate(models):
                if use_cache:
                    result = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                   past_key_values=pasts[k], use_cache=True)
                    pasts[k] = result.past_key_values
                else:
                    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                z = result.logits[:, -1, :]
                logits.append(z[:, :vocab_size] if vocab_size is not None else z)
            token = choose(logits)
            token = torch.where(done, torch.full_like(token, pad), token)
            for i in torch.nonzero(~done).flatten().tolist():
                out[i].append(int(token[i]))
            done = done | (token == eos_token_id)
            if bool(done.all()):
                break
            new_pos = positions[:, -1:] + 1
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
            positions = torch.cat([positions, new_pos], dim=1)
            step_ids, step_pos = token[:, None], new_pos
        return out


def strip_eos(tokens: Sequence[int], eos_token_id: int) -> list[int]:
    """The generated tokens before the first EOS."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    vocab_size: int | None = None,
    batch_size: int = 32,
) -> list[tuple[float, int]]:
    """(sum of log p(response token | prompt, earlier response tokens), number of tokens) for each
    pair, under ``model`` (e.g. the teacher's log-likelihood of a student's outputs). Empty responses
    give (0.0, 0)."""
    results: list[tuple[float, int]] = []
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk_p = prompts[start : start + batch_size]
            chunk_r = responses[start : start + batch_size]
            seqs = [list(p) + list(r) for p, r in zip(chunk_p, chunk_r)]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
                mask[i, : len(s)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            logp = F.log_softmax(logits.float(), dim=-1)
            for i, (p, r) in enumerate(zip(chunk_p, chunk_r)):
                if not r:
                    results.append((0.0, 0))
                    continue
                # the token at position t is predicted by the logits at t - 1
                pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=device)
                tok = torch.tensor(list(r), dtype=torch.long, device=device)
                total = logp[i, pos, tok].double().sum().item()
                results.append((total if math.isfinite(total) else float("-inf"), len(r)))
    return results
