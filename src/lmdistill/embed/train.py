"""Training loops for the four embedding methods: InfoNCE, Margin-MSE, flipped KD (MCL) and M3 self-KD.

Each loop draws batches of training pairs in a seeded order (a fresh permutation per pass), runs AdamW
with linear warm-up and linear decay (`run_loop`, shared by all four), and returns the per-step losses.
Documents of the query's own headword other than its positive are masked out of every softmax (they are
unlabelled positives, not negatives).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from lmdistill.embed.config import EmbedTrainConfig
from lmdistill.embed.losses import info_nce_from_scores, m3_self_distillation_loss, margin_mse_loss, mcl_loss
from lmdistill.embed.mining import TrainingSignal
from lmdistill.embed.task import RetrievalTask
from lmdistill.train.optim import adamw, linear_schedule

Log = Callable[[str], None]
# A step function maps a batch of training-pair indices to (loss, extra per-step numbers to record).
StepFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]
MASKED = -1e4  # a finite "minus infinity": keeps soft cross-entropy free of 0 * inf


@dataclass
class EmbedTrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    extra: dict[str, list[float]] = field(default_factory=dict)


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` batches of distinct indices; a new seeded permutation whenever one runs out."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order.extend(fresh)
        yield order[:batch_size]
        del order[:batch_size]


def make_optimizer(params: list[nn.Parameter], cfg: EmbedTrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The shared AdamW (:mod:`lmdistill.train.optim`) with the embedding recipe's linear warm-up and decay."""
    opt = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(cfg.warmup_steps, cfg.steps))


def run_loop(name: str, model: nn.Module, n_items: int, cfg: EmbedTrainConfig, step_fn: StepFn, *, seed: int, log: Log | None) -> EmbedTrainResult:
    """The loop every method shares: seeded batches of ``n_items`` indices, AdamW over the trainable
    parameters, gradient clipping, per-step loss (and extras) recorded, progress logged."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg)
    result = EmbedTrainResult()
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(batch_indices(n_items, cfg.batch_size, cfg.steps, seed)):
        loss, extras = step_fn(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{name}] non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        result.losses.append(loss.item())
        for key, value in extras.items():
            result.extra.setdefault(key, []).append(value)
        if log is not None and (step + 1) % cfg.log_every == 0:
            recent = result.losses[-cfg.log_every :]
            log(f"[{name}] step {step + 1}/{cfg.steps} loss {sum(recent) / len(recent):.4f} ({time.perf_counter() - start:.0f}s)")
    result.seconds = time.perf_counter() - start
    result.steps = cfg.steps
    model.eval()
    return result


def sample_negative(signal: TrainingSignal, pair: int, group: str, rng: random.Random, random_fraction: float) -> int:
    """One negative row for a training pair: a mined hard negative, or (with ``random_fraction``) a random
    document of another headword."""
    if signal.negatives[pair] and rng.random() >= random_fraction:
        return rng.choice(signal.negatives[pair])
    while True:
        row = rng.randrange(len(signal.doc_ids))
        if signal.doc_groups[row] != group:
            return row


def _batch_docs(
    task: RetrievalTask, batch: list[int], signal: TrainingSignal | None, rng: random.Random, random_fraction: float = 0.0
) -> list[int]:
    """Rows of the training corpus for the batch: positives, then one sampled negative per query
    (none when no negatives were mined and no random ones are asked for)."""
    if signal is None:
        return []
    rows = [signal.positive_index[i] for i in batch]
    negs = [
        sample_negative(signal, i, task.train[i].group, rng, random_fraction)
        for i in batch
        if signal.negatives[i] or random_fraction > 0
    ]
    return rows + negs


def _group_mask(task: RetrievalTask, batch: list[int], doc_groups: list[str], target: list[int]) -> torch.Tensor:
    """True where a candidate shares the query's headword but is not its target (an unlabelled positive)."""
    mask = torch.zeros(len(batch), len(doc_groups), dtype=torch.bool)
    for r, i in enumerate(batch):
        g = task.train[i].group
        for c, dg in enumerate(doc_groups):
            if dg == g and c != target[r]:
                mask[r, c] = True
    return mask


def _batch_texts(task: RetrievalTask, signal: TrainingSignal | None, batch: list[int], rng: random.Random, random_fraction: float = 0.0):
    """(queries, documents, document groups, document rows): positives first (in batch order), then negatives."""
    queries = [task.train[i].query for i in batch]
    if signal is None:
        docs = [task.train[i].positive for i in batch]
        groups = [task.train[i].group for i in batch]
        rows: list[int] = []
    else:
        rows = _batch_docs(task, batch, signal, rng, random_fraction)
        docs = [task.train_corpus[signal.doc_ids[r]] for r in rows]
        groups = [signal.doc_groups[r] for r in rows]
    return queries, docs, groups, rows


def in_batch_info_nce(task: RetrievalTask, batch: list[int], scores: torch.Tensor, doc_groups: list[str], temperature: float) -> torch.Tensor:
    """InfoNCE where row r's positive is candidate r and other documents of its headword are masked out."""
    target = list(range(len(batch)))
    masked = scores.masked_fill(_group_mask(task, batch, doc_groups, target), MASKED)
    return info_nce_from_scores(masked, torch.tensor(target), temperature)


def train_infonce(
    student: nn.Module,
    task: RetrievalTask,
    cfg: EmbedTrainConfig,
    *,
    signal: TrainingSignal | None = None,
    random_fraction: float = 0.0,
    seed: int = 0,
    log: Log | None = None,
) -> EmbedTrainResult:
    """In-batch contrastive baseline (plus one mined hard negative per query when ``signal`` has them)."""
    rng = random.Random(seed + 1)

    def step(batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        queries, docs, groups, _ = _batch_texts(task, signal, batch, rng, random_fraction)
        scores = student.embed(queries) @ student.embed(docs).T
        return in_batch_info_nce(task, batch, scores, groups, cfg.temperature), {}

    return run_loop("infonce", student, len(task.train), cfg, step, seed=seed, log=log)


def train_margin_mse(
    student: nn.Module,
    task: RetrievalTask,
    cfg: EmbedTrainConfig,
    *,
    signal: TrainingSignal,
    random_fraction: float = 0.0,
    inbatch_weight: float = 0.0,
    seed: int = 0,
    log: Log | None = None,
) -> EmbedTrainResult:
    """Margin-MSE (arXiv 2010.02666) on (query, positive, teacher-mined hard negative) triples.

    ``inbatch_weight`` > 0 adds ``inbatch_weight`` x InfoNCE over the batch (every other positive and
    negative is a candidate), the combination commonly used with Margin-MSE; 0 is the paper's loss alone.
    """
    if signal.teacher_query is None:
        raise ValueError("Margin-MSE needs teacher scores: build the training signal with a teacher")
    rng = random.Random(seed + 1)
    usable = [i for i in range(len(task.train)) if signal.negatives[i] or random_fraction > 0]

    def step(picks: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [usable[i] for i in picks]
        pos_rows = [signal.positive_index[i] for i in batch]
        neg_rows = [sample_negative(signal, i, task.train[i].group, rng, random_fraction) for i in batch]
        q = student.embed([task.train[i].query for i in batch])
        docs = student.embed([task.train_corpus[signal.doc_ids[r]] for r in pos_rows + neg_rows])
        pos, neg = docs[: len(batch)], docs[len(batch) :]
        t_pos = signal.teacher_pair_scores(batch, pos_rows)
        t_neg = signal.teacher_pair_scores(batch, neg_rows)
        mse = margin_mse_loss((q * pos).sum(-1), (q * neg).sum(-1), t_pos, t_neg)
        if inbatch_weight <= 0:
            return mse, {}
        groups = [signal.doc_groups[r] for r in pos_rows + neg_rows]
        nce = in_batch_info_nce(task, batch, q @ docs.T, groups, cfg.temperature)
        return mse + inbatch_weight * nce, {"margin_mse": mse.item(), "infonce": nce.item()}

    return run_loop("margin_mse", student, len(usable), cfg, step, seed=seed, log=log)


def train_flipped(
    lm_encoder: nn.Module,
    task: RetrievalTask,
    cfg: EmbedTrainConfig,
    *,
    signal: TrainingSignal,
    margin: float,
    pos_threshold: float,
    neg_threshold: float,
    mcl_weight: float = 1.0,
    dist_weight: float = 1.0,
    contrastive_weight: float = 0.0,
    random_fraction: float = 0.0,
    seed: int = 0,
    log: Log | None = None,
) -> EmbedTrainResult:
    """Flipped KD (arXiv 2507.05617): the LM's LoRA-encoder similarities learn the teacher's, with MCL.

    Per batch: B queries against their B positives and one hard negative each; pair labels are 1 where the
    document has the query's headword. Teacher similarities come from the cached teacher embeddings.
    ``contrastive_weight`` > 0 adds an in-batch InfoNCE term on the same similarity matrix (our addition,
    not the paper's; see `lmdistill.embed.config.MCLConfig`).
    """
    if signal.teacher_query is None:
        raise ValueError("flipped KD needs the small teacher's similarities: build the signal with a teacher")
    rng = random.Random(seed + 1)

    def step(batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        rows = _batch_docs(task, batch, signal, rng, random_fraction)
        q = lm_encoder.embed([task.train[i].query for i in batch])
        d = lm_encoder.embed([task.train_corpus[signal.doc_ids[r]] for r in rows])
        student_sim = q @ d.T
        groups = [signal.doc_groups[r] for r in rows]
        labels = torch.tensor([[task.train[i].group == g for g in groups] for i in batch])
        out = mcl_loss(
            student_sim,
            signal.teacher_scores(batch, rows),
            labels,
            margin=margin,
            pos_threshold=pos_threshold,
            neg_threshold=neg_threshold,
            mcl_weight=mcl_weight,
            dist_weight=dist_weight,
        )
        extras = {"kept_positives": out.kept_positives, "kept_negatives": out.kept_negatives, "mcl": out.mcl.item(), "dist": out.dist.item()}
        loss = out.loss
        if contrastive_weight > 0:
            nce = in_batch_info_nce(task, batch, student_sim, groups, cfg.temperature)
            loss = loss + contrastive_weight * nce
            extras["contrastive"] = nce.item()
        return loss, extras

    return run_loop("flipped_kd", lm_encoder, len(task.train), cfg, step, seed=seed, log=log)


def train_m3(
    model: nn.Module,
    task: RetrievalTask,
    cfg: EmbedTrainConfig,
    *,
    signal: TrainingSignal | None,
    score_weights: tuple[float, float, float],
    loss_weights: tuple[float, float, float],
    self_distill: bool = True,
    random_fraction: float = 0.0,
    seed: int = 0,
    log: Log | None = None,
) -> EmbedTrainResult:
    """M3 self-knowledge distillation (arXiv 2402.03216) over in-batch + mined negatives."""
    rng = random.Random(seed + 1)

    def step(batch: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        queries, docs, groups, _ = _batch_texts(task, signal, batch, rng, random_fraction)
        q, d = model(queries), model(docs)
        target = list(range(len(batch)))
        mask = _group_mask(task, batch, groups, target)
        heads = [s.masked_fill(mask, MASKED) for s in (model.dense_scores(q, d), model.sparse_scores(q, d), model.multi_scores(q, d))]
        parts = m3_self_distillation_loss(
            *heads,
            torch.tensor(target),
            temperature=cfg.temperature,
            score_weights=score_weights,
            loss_weights=loss_weights,
            self_distill=self_distill,
        )
        extras = {"contrastive": parts["contrastive"].item()}
        if "self_distill" in parts:
            extras["self_distill"] = parts["self_distill"].item()
        return parts["total"], extras

    result = run_loop("m3", model, len(task.train), cfg, step, seed=seed, log=log)
    result.extra.setdefault("self_distill", [])
    return result
