"""What the writer stores of the teacher per position, computed from its logits: the top-k log-probabilities with
the residual mass (:func:`teacher_top_k`), k systematic draws (:func:`teacher_sampled`, random-sampling KD), or
the exact head plus threshold-sampled tail (:func:`teacher_hybrid`). All three return ``(values [B, L, k] float32,
token ids [B, L, k] int64, log residual [B, L] float32)``."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def teacher_top_k(
    model: torch.nn.Module, input_ids: torch.Tensor, *, k: int, temperature: float, vocab_size: int, row_chunk: int = 4096,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k of ``log_softmax(logits / T)`` over the real vocabulary, with the log of the
    mass outside the top-k, for ``input_ids`` ``[B, L]``: ``(logprobs [B, L, k] float32, ids [B, L, k]
    int64, log_residual [B, L] float32)``. The residual is summed over the complement directly (a
    log-sum-exp, not ``1 - sum``, which would cancel); it is -inf when k equals the vocabulary. ``attention_mask``
    marks the real tokens of right-padded rows (a cross-tokenizer cache's teacher tokens)."""
    with torch.no_grad():
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        logits = model(input_ids=input_ids, **extra).logits[..., :vocab_size]
        b, length, _ = logits.shape
        flat = logits.reshape(b * length, vocab_size)
        tops, ids, residuals = [], [], []
        for start in range(0, flat.shape[0], row_chunk):  # bounds the float32 copies at row_chunk x V
            logp = torch.log_softmax(flat[start : start + row_chunk].float() / temperature, dim=-1)
            top, idx = torch.topk(logp, k, dim=-1, sorted=True)
            if k < vocab_size:
                residual = torch.logsumexp(logp.scatter_(-1, idx, float("-inf")), dim=-1)
            else:
                residual = torch.full(top.shape[:-1], float("-inf"), dtype=top.dtype, device=top.device)
            tops.append(top)
            ids.append(idx)
            residuals.append(residual)
        return (
            torch.cat(tops).reshape(b, length, k).cpu(),
            torch.cat(ids).reshape(b, length, k).cpu(),
            torch.cat(residuals).reshape(b, length).cpu(),
        )


def _probability_rows(model: torch.nn.Module, input_ids: torch.Tensor, temperature: float, vocab_size: int,
                      row_chunk: int) -> Iterable[torch.Tensor]:
    """The teacher's float64 ``softmax(logits / T)`` over the real vocabulary for ``input_ids`` ``[B, L]``,
    flattened to rows and yielded ``row_chunk`` rows at a time (bounds the float64 copies)."""
    logits = model(input_ids=input_ids).logits[..., :vocab_size]
    flat = logits.reshape(-1, vocab_size)
    for start in range(0, flat.shape[0], row_chunk):
        yield torch.softmax(flat[start : start + row_chunk].double() / temperature, dim=-1).cpu()


def teacher_sampled(
    model: torch.nn.Module, input_ids: torch.Tensor, *, k: int, temperature: float, vocab_size: int,
    generator: torch.Generator, row_chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random-sampling KD signal (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs", arXiv:2503.16870): ``k`` tokens drawn from the teacher's ``softmax(logits / T)``
    per position, stored as the distinct drawn ids with log(count / k) (ids that were not drawn fill the
    remaining slots with -inf, so the ids of a row stay distinct) and no residual.

    The empirical distribution of the draws is an unbiased estimate of the teacher's, so the forward-KL
    gradient ``(q - p_hat) / T`` equals the full teacher's in expectation, whereas a top-k cache is biased: it
    never shows the student the tokens outside the top-k (the proposal here is the teacher itself, so the
    importance weights are the counts). The k draws are *systematic* rather than independent (one uniform
    offset ``u``, points ``(u + i) / k`` through the teacher's cumulative distribution; Douc, Cappé & Moulines,
    "Comparison of Resampling Schemes for Particle Filtering", arXiv:cs/0507025): still unbiased, but every
    count is within 1 of ``k p_v``, so the likely tokens are nearly exact and only the tail is random.
    Same return layout as :func:`teacher_top_k`; the log residual is -inf.
    """
    with torch.no_grad():
        b, length = input_ids.shape
        tops, ids = [], []
        steps = torch.arange(k, dtype=torch.float64) / k
        for probs in _probability_rows(model, input_ids, temperature, vocab_size, row_chunk):
            cdf = probs.cumsum(-1)
            cdf /= cdf[:, -1:].clone()  # exactly 1 at the end, so every point falls on a token
            offset = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) / k
            draws = torch.searchsorted(cdf, offset + steps, right=True).clamp_(max=vocab_size - 1)
            counts = torch.zeros_like(probs).scatter_add_(-1, draws, torch.ones_like(draws, dtype=probs.dtype))
            top, idx = torch.topk(counts, k, dim=-1, sorted=True)  # distinct ids; drawn ones first
            tops.append(torch.log(top / k).float())  # log 0 = -inf for the filler ids
            ids.append(idx)
        residual = torch.full((b, length), float("-inf"))
        return torch.cat(tops).reshape(b, length, k), torch.cat(ids).reshape(b, length, k), residual


def hybrid_split(top: torch.Tensor, rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``top`` (a row's k largest probabilities, sorted descending; float64) and ``rest`` (the
    mass outside them), the number h of head entries kept exactly and the threshold tau of
    :func:`teacher_hybrid`: the smallest h in [0, k) with ``top[h] <= tau_h = (mass from top[h] on) / (k - h)``.
    h = k - 1 always qualifies (the mass outside the top k - 1 is at least its largest entry), and the entries
    kept exactly all exceed tau. Tail masses are suffix sums, not 1 - head, which would cancel."""
    k = top.shape[-1]
    tail_mass = torch.flip(torch.cumsum(torch.flip(top, [-1]), -1), [-1]) + rest.unsqueeze(-1)
    tau = tail_mass / torch.arange(k, 0, -1, dtype=top.dtype, device=top.device)
    valid = top <= tau
    valid[..., -1] = True
    head = valid.to(torch.int8).argmax(-1)  # the first valid h
    return head, tau.gather(-1, head.unsqueeze(-1)).squeeze(-1)


def teacher_hybrid(
    model: torch.nn.Module, input_ids: torch.Tensor, *, k: int, temperature: float, vocab_size: int,
    generator: torch.Generator, row_chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact head + sampled tail: an unbiased k-entry estimate of the teacher with less variance than k draws.

    Per position, the h most likely tokens keep their exact probabilities and the remaining k - h slots go to
    systematic draws from the tail (the other tokens), each drawn token standing for ``tau = tail mass /
    (k - h)``; h is the smallest count for which every tail token's probability is at most tau (see
    :func:`hybrid_split`), so a tail token is drawn at most once, with probability p_v / tau. This is threshold
    sampling (Duffield, Lund & Thorup, "Learn more, sample less: control of volume and variance in network
    measurement", IEEE Trans. Inf. Theory 51(5), 2005; also "Priority sampling for estimation of arbitrary
    subset sums", arXiv:cs/0509026): every estimate ``p_hat_v`` is unbiased (``E[p_hat_v] = p_v``), sums to 1,
    and among unbiased estimators with k expected entries it minimises the total variance. Compared with k
    systematic draws (:func:`teacher_sampled`), likely tokens are exact instead of rounded to multiples of 1/k,
    and a peaked row fills all k slots instead of repeating its few likely tokens. Forward KL's gradient is the
    live teacher's in expectation, as with random-sampling KD (arXiv:2503.16870).
    Same return layout as :func:`teacher_top_k`; the log residual is -inf.
    """
    with torch.no_grad():
        b, length = input_ids.shape
        tops, ids = [], []
        slots = torch.arange(k, dtype=torch.float64)
        for probs in _probability_rows(model, input_ids, temperature, vocab_size, row_chunk):
            rows = probs.shape[0]
            top, top_ids = torch.topk(probs, k, dim=-1, sorted=True)
            rest = probs.scatter(-1, top_ids, 0.0).sum(-1)
            head, _ = hybrid_split(top, rest)
            in_head = slots.unsqueeze(0) < head.unsqueeze(-1)
            estimate = torch.zeros_like(probs).scatter_(-1, top_ids, torch.where(in_head, top, 0.0))
            tail = probs.scatter(-1, top_ids, torch.where(in_head, 0.0, top))  # head tokens removed
            cdf = tail.cumsum(-1)
            draws_wanted = k - head  # >= 1
            tau = cdf[:, -1] / draws_wanted  # the tail's own sum: the last point stays inside the tail
            offset = torch.rand(rows, 1, generator=generator, dtype=torch.float64)
            points = (offset + slots.unsqueeze(0)) * tau.unsqueeze(-1)
            draws = torch.searchsorted(cdf, points, right=True).clamp_(max=vocab_size - 1)
            used = (slots.unsqueeze(0) < draws_wanted.unsqueeze(-1)) & (tau.unsqueeze(-1) > 0)
            estimate.scatter_add_(-1, draws, torch.where(used, tau.unsqueeze(-1), 0.0).expand(rows, k))
            value, idx = torch.topk(estimate, k, dim=-1, sorted=True)  # distinct ids; unused slots are 0
            tops.append(torch.log(value).float())
            ids.append(idx)
        residual = torch.full((b, length), float("-inf"))
        return torch.cat(tops).reshape(b, length, k), torch.cat(ids).reshape(b, length, k), residual
