"""A batch source that mixes domains by sampling weights (fixed, or DDK's adaptive ones), and the evaluator
that reports each domain's validation bits per byte.

Each optimizer step draws its global batch row by row: a row's domain is drawn from the current weights with a
generator seeded by (seed, step), and its block is the next one of that domain's seeded, epoch-wise reshuffled
order (a domain is read cyclically once exhausted, as in DDK §3.2). Every rank draws the whole global batch and
keeps its own contiguous share, so N processes read what one does.

The position in each domain's order is not a function of the step (it depends on the earlier draws), so it is
part of :meth:`MixtureSource.state_dict`, with the weights and their history (:class:`MixtureWeights`); the
trainer saves that state in every checkpoint, and a resumed run draws exactly the batches an uninterrupted one
does.

DDK's measurements happen here, before the step that needs them (:meth:`MixtureWeights.due`): the bound trainer's
student (and, once, its teacher) is scored on each domain's fixed validation sample. Each setting of the weights
is logged to ``metrics.jsonl`` as a ``kind: mixture`` record whose ``step`` is the first step that uses it (the
trainer's 1-based step count), so records of redone steps are dropped on resume like the trainer's own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lmdistill.data.blocks import BlockDataset, collate
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.eval.lm import evaluate_lm
from lmdistill.seeds import derived_seed
from lmdistill.selection.ddk import FirstBlocks, MixtureWeights, domain_perplexities, model_logits

log = logging.getLogger(__name__)


class MixtureSource:
    """Global batches drawn from ``domains`` (name -> training blocks) by ``weights`` (see the module
    docstring). ``validation`` (name -> blocks) is each domain's validation split; DDK measures on its first
    ``validation_blocks`` blocks."""

    def __init__(
        self,
        domains: Mapping[str, BlockDataset],
        weights: MixtureWeights,
        *,
        global_batch: int,
        seed: int,
        validation: Mapping[str, Dataset] | None = None,
        validation_blocks: int | None = 32,
        eval_batch_size: int = 16,
    ) -> None:
        if list(domains) != weights.names:
            raise ConfigError(f"the mixture's domains {weights.names} differ from the data's {list(domains)}")
        self.names = list(domains)
        self.domains = [domains[n] for n in self.names]
        self.weights = weights
        self.global_batch = global_batch
        self.seed = seed
        self.drawn = [0] * len(self.names)  # blocks read from each domain so far
        self.next_step = 0
        self.samples: list[Dataset] | None = None
        if weights.adaptive:
            if validation is None:
                raise ConfigError("DDK needs each domain's validation blocks to measure perplexities")
            self.samples = [FirstBlocks(validation[n], validation_blocks) for n in self.names]
        self.eval_batch_size = eval_batch_size
        self.trainer: Any = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    # ------------------------------------------------------------------------------ the trainer's protocol
    def bind(self, trainer: Any) -> None:
        self.trainer = trainer
        if self.weights.adaptive:
            teacher = getattr(trainer, "teacher", None)
            if teacher is None or not teacher.scores_text:
                what = "no teacher" if teacher is None else f"{teacher.description}, which cannot score text"
                raise ConfigError(f"mixture.policy: ddk measures the teacher's perplexity on each domain's validation "
                                  f"sample, but the run has {what}; use a live teacher (teacher.path) or a fixed mixture")

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.state_dict(), "drawn": list(self.drawn), "next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.weights.load_state_dict(state["weights"])
        if len(state["drawn"]) != len(self.names):
            raise ConfigError(f"the checkpoint's mixture has {len(state['drawn'])} domains, this run {len(self.names)}")
        self.drawn = [int(n) for n in state["drawn"]]
        self.next_step = int(state["next_step"])

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        if step != self.next_step:
            raise LmdistillError(f"MixtureSource: asked for step {step} but its position is step {self.next_step}; "
                                 "its draws advance one step at a time (restore a checkpoint's state to move it)")
        if self.weights.due(step):
            self._update(step)
        domain_of_row, blocks = self._draw(step)
        self.next_step += 1
        per_rank = self.global_batch // world_size
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        rows, where = blocks[mine], domain_of_row[mine]
        out = []
        for start in range(0, len(rows), micro_batch):
            items = [self.domains[int(d)][int(i)] for d, i in zip(where[start:start + micro_batch], rows[start:start + micro_batch])]
            batch = collate(items)
            batch["domain_index"] = torch.as_tensor(where[start:start + micro_batch], dtype=torch.long)
            out.append(batch)
        return out

    # ------------------------------------------------------------------------------ drawing
    def _perm(self, domain: int, epoch: int) -> np.ndarray:
        key = (domain, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.names):
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, domain, epoch]).permutation(len(self.domains[domain]))
        return self._perms[key]

    def _draw(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain of each row, block index of each row) of the global batch of ``step``; advances ``drawn``."""
        assert self.weights.weights is not None
        p = np.asarray(self.weights.weights, dtype=np.float64)
        rng = np.random.default_rng(derived_seed(self.seed, step, "mixture"))
        domain_of_row = rng.choice(len(self.names), size=self.global_batch, p=p / p.sum())
        blocks = np.empty(self.global_batch, dtype=np.int64)
        for row, d in enumerate(domain_of_row):
            n = len(self.domains[d])
            epoch, offset = divmod(self.drawn[d], n)
            blocks[row] = self._perm(int(d), epoch)[offset]
            self.drawn[d] += 1
        return domain_of_row, blocks

    # ------------------------------------------------------------------------------ DDK's measurement
    def _update(self, step: int) -> None:
        trainer = self.trainer
        if trainer is None:
            raise LmdistillError("MixtureSource with policy ddk needs the trainer's student: bind it first")
        acc = trainer.accelerator
        assert self.samples is not None
        common = dict(batch_size=self.eval_batch_size, rank=acc.process_index, world_size=acc.num_processes,
                      all_reduce=(lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu()) if acc.num_processes > 1 else None,
                      device=acc.device)
        teacher_ppl = None
        if self.weights.teacher_ppl is None:
            teacher_ppl = domain_perplexities(lambda ids: trainer.teacher.logits(ids)[..., : trainer.vocab_size],
                                              self.samples, **common)
        student = acc.unwrap_model(trainer.model)
        student_ppl = domain_perplexities(model_logits(student, trainer.vocab_size), self.samples, **common)
        weights = self.weights.update(step, student_ppl, teacher_ppl)
        record: dict[str, Any] = {"kind": "mixture", "step": step + 1}
        for name, w, s, t in zip(self.names, weights, student_ppl, self.weights.teacher_ppl or []):
            record.update({f"weight/{name}": w, f"student_ppl/{name}": s, f"teacher_ppl/{name}": t})
        trainer.log.write(record)
        log.info("DDK weights after %d steps: %s", step,
                 ", ".join(f"{n} {w:.3f}" for n, w in zip(self.names, weights)))


class DomainEvaluator:
    """The trainer's ``evaluator`` for mixture runs: every domain's validation metrics (``bpb/NAME``,
    ``loss/NAME``) plus their unweighted means as ``bits_per_byte`` and ``loss`` (each domain counts once, as
    in the bench's tables), ``worst_bits_per_byte``, and with a teacher ``kl_to_teacher`` averaged likewise."""

    def __init__(self, validation: Mapping[str, BlockDataset], bytes_per_token: Mapping[str, float], *,
                 batch_size: int = 16, max_batches: int | None = None) -> None:
        self.validation = dict(validation)
        self.bytes_per_token = dict(bytes_per_token)
        self.batch_size = batch_size
        self.max_batches = max_batches

    def __call__(self, trainer: Any) -> dict[str, float]:
        acc = trainer.accelerator
        teacher = trainer.teacher if trainer.teacher is not None and trainer.teacher.scores_text else None
        return evaluate_domains(
            acc.unwrap_model(trainer.model), self.validation, self.bytes_per_token, batch_size=self.batch_size,
            max_batches=self.max_batches, teacher=teacher, vocab_size=trainer.vocab_size, rank=acc.process_index,
            world_size=acc.num_processes,
            all_reduce=(lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu()) if acc.num_processes > 1 else None,
        )


def evaluate_domains(model: torch.nn.Module, datasets: Mapping[str, Dataset], bytes_per_token: Mapping[str, float], *,
                     teacher: Any = None, **kwargs: Any) -> dict[str, float]:
    """Per-domain :func:`~lmdistill.eval.lm.evaluate_lm` metrics, flattened, and their means (see
    :class:`DomainEvaluator`)."""
    out: dict[str, float] = {}
    per_domain: dict[str, dict[str, float]] = {}
    for name, data in datasets.items():
        m = evaluate_lm(model, data, bytes_per_token=bytes_per_token[name], teacher=teacher, **kwargs)
        per_domain[name] = m
        out[f"bpb/{name}"] = m["bits_per_byte"]
        out[f"loss/{name}"] = m["loss"]
        if teacher is not None:
            out[f"kl_to_teacher/{name}"] = m["kl_to_teacher"]
    bpb = [m["bits_per_byte"] for m in per_domain.values()]
    out["bits_per_byte"] = float(np.mean(bpb))
    out["worst_bits_per_byte"] = float(np.max(bpb))
    out["loss"] = float(np.mean([m["loss"] for m in per_domain.values()]))
    out["perplexity"] = float(np.exp(min(out["loss"], 50.0)))
    if teacher is not None:
        out["kl_to_teacher"] = float(np.mean([m["kl_to_teacher"] for m in per_domain.values()]))
    return out


def domain_sizes(datasets: Sequence[BlockDataset]) -> list[float]:
    """Training blocks per domain (what a size-proportional mixture follows)."""
    return [float(len(d)) for d in datasets]


__all__ = ["DomainEvaluator", "MixtureSource", "domain_sizes", "evaluate_domains"]
