"""Language-model evaluation: perplexity, bits per byte, and agreement with a teacher."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lmdistill.constants import IGNORE_INDEX
from lmdistill.data.blocks import collate
from lmdistill.models.modes import eval_mode


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    bytes_per_token: float,
    batch_size: int = 16,
    max_batches: int | None = None,
    teacher: object | None = None,
    vocab_size: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean next-token NLL over the validation targets, as perplexity and bits per byte.

    Bits per byte = NLL (nats/token) / ln 2 / (UTF-8 bytes per token of the split), so models with
    different tokenizers compare. With a teacher: top-1 agreement (student argmax == teacher argmax)
    and mean KL(teacher || student) over the same targets. Batches are sharded across ranks and the
    sums all-reduced, so every rank returns the same numbers.
    """
    with eval_mode(model):
        n_batches = math.ceil(len(dataset) / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        sums = torch.zeros(4, dtype=torch.float64)  # nll, targets, agreements, kl
        for b in range(rank, n_batches, world_size):
            items = [dataset[i] for i in range(b * batch_size, min((b + 1) * batch_size, len(dataset)))]
            batch = collate(items)
            logits = model(input_ids=batch["input_ids"]).logits
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            t_logits = None if teacher is None else teacher.logits(batch["input_ids"])
            add_token_sums(sums, logits.float(), batch["labels"], None if t_logits is None else t_logits.float())
        if all_reduce is not None:
            sums = all_reduce(sums)
    return metrics_from_sums(sums, bytes_per_token, with_teacher=teacher is not None)


def add_token_sums(sums: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                   teacher_logits: torch.Tensor | None = None) -> None:
    """Add one batch to ``sums`` (float64 [4]: summed NLL in nats, targets, top-1 agreements with the
    teacher, summed KL(teacher || student)) over the positions whose label is not -100. Computed in the
    logits' dtype (callers choose float32 or float64); the teacher terms stay 0 without teacher logits."""
    valid = labels != IGNORE_INDEX
    logp = F.log_softmax(logits[valid], dim=-1)
    sums[0] -= logp.gather(-1, labels[valid].unsqueeze(-1)).sum().double().cpu()
    sums[1] += int(valid.sum())
    if teacher_logits is not None:
        t_logp = F.log_softmax(teacher_logits[valid].to(logp.dtype), dim=-1)
        sums[2] += int((t_logp.argmax(-1) == logp.argmax(-1)).sum())
        p = t_logp.exp()
        # 0 * log 0 = 0: tokens the teacher rules out (masked padding rows) add nothing
        sums[3] += torch.where(p > 0, p * (t_logp - logp), torch.zeros((), dtype=p.dtype)).sum().double().cpu()


def metrics_from_sums(sums: torch.Tensor, bytes_per_token: float, *, with_teacher: bool) -> dict[str, float]:
    """``loss`` (mean NLL, nats/target), ``perplexity``, ``bits_per_byte``, ``tokens`` and, with a
    teacher, ``top1_agreement`` and ``kl_to_teacher`` from :func:`add_token_sums`'s totals."""
    n = max(sums[1].item(), 1.0)
    nll = sums[0].item() / n
    out = {
        "loss": nll,
        "perplexity": math.exp(min(nll, 50.0)),
        "bits_per_byte": nll / math.log(2) / max(bytes_per_token, 1e-9),
        "tokens": int(sums[1].item()),
    }
    if with_teacher:
        out["top1_agreement"] = sums[2].item() / n
        out["kl_to_teacher"] = sums[3].item() / n
    return out
