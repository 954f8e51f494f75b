"""``lmdistill distill-mixture CONFIG``: distillation (or label-only training) on a mixture of domains, with DDK's
adaptive weights (:mod:`lmdistill.selection.ddk`) or a fixed uniform / size-proportional mixture.

A run config is a distillation run config (``lmdistill distill``) whose text comes from ``domains:`` instead of
``data.corpus``, plus a ``mixture:`` section and, optionally, the teacher-hacking ``monitor:``::

    output_dir: runs/ddk
    domains:
      - {name: kjv, source: kjv}
      - {name: gcide, source: gcide, max_documents: 4000}
      - {name: jargon, source: jargon}
      - {name: fortunes, source: fortunes}
    data: {block_size: 64}
    student: {preset: gpt2-student-1.5m}
    teacher: {path: runs/teacher-4dom/final}
    objective: {mix: [{name: cross_entropy, weight: 1.0}, {name: forward_kl, weight: 0.2}]}   # DDK's Eq. 3
    mixture: {policy: ddk, interval: 50, alpha: 0.5, validation_blocks: 32}
    train: {steps: 300, batch_size: 16}

The trainer is the project's one :class:`~lmdistill.train.trainer.Trainer` with a
:class:`~lmdistill.train.mixture_source.MixtureSource` and a per-domain evaluator; the mixture state (weights,
history, each domain's read position) is in every checkpoint, so ``--resume`` continues exactly. At the end the run
writes ``mixture.json`` (the weight history and the final per-domain metrics) and ``mixture.png`` (the weights over
training).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from lmdistill.config import DataConfig, RunConfig, Section
from lmdistill.data.cache import default_cache_dir
from lmdistill.data.domains import DomainData, DomainSpec, check_domains, prepare_domains
from lmdistill.data.tokenizer import load_tokenizer
from lmdistill.errors import ConfigError, DataError
from lmdistill.eval.monitor import MonitoredEvaluator
from lmdistill.losses import build_objective
from lmdistill.selection.ddk import MixtureWeights, plot_weights
from lmdistill.train.guard import make_accelerator
from lmdistill.train.mixture_source import DomainEvaluator, MixtureSource, domain_sizes
from lmdistill.train.run import build_models
from lmdistill.train.rundir import RunDirectory
from lmdistill.train.trainer import Trainer

log = logging.getLogger(__name__)


class MixtureSettings(Section):
    policy: Literal["ddk", "uniform", "proportional"] = Field(
        "ddk", description="ddk: adaptive weights (arXiv 2407.16154); uniform: 1/N; proportional: to training tokens")
    interval: int = Field(50, ge=1, description="ddk: steps between weight updates (the paper's K; 1,000 at its scale)")
    alpha: float = Field(0.5, ge=0, le=1, description="ddk: the smoothing coefficient of Eq. 2 (paper: 0.5)")
    smooth: bool = Field(True, description="ddk: factor smooth updating (false = the paper's 'w/o FS' ablation)")
    validation_blocks: int = Field(32, ge=1, description="ddk: blocks of each domain's validation split it measures on")
    plot: bool = Field(True, description="write mixture.png at the end")


class MixtureRunConfig(RunConfig):
    """A run on domains (see the module docstring); every other section is a run config's."""

    domains: list[DomainSpec] = Field(..., description="the domains: [{name, source, max_documents}]")
    mixture: MixtureSettings = MixtureSettings()

    @model_validator(mode="after")
    def _mixture_fits(self) -> MixtureRunConfig:
        # (the default value is accepted: a dumped config, such as the run's config.yaml, lists every field)
        if self.data.corpus != DataConfig.model_fields["corpus"].default:
            raise ValueError("data.corpus: a mixture run reads its text from 'domains:'; remove data.corpus")
        try:
            check_domains(self.domains)
        except DataError as exc:
            raise ValueError(str(exc)) from None
        if self.teacher is not None and self.teacher.cache is not None:
            raise ValueError("teacher.cache: a mixture's batches come from several token streams, which one offline cache "
                             "does not cover; use a live teacher (teacher.path)")
        if self.mixture.policy == "ddk" and self.teacher is None:
            raise ValueError("mixture.policy: ddk weighs domains by the student/teacher perplexity ratio and needs a "
                             "teacher (teacher.path); without one use policy uniform or proportional")
        return self


def _tokenizer(cfg: MixtureRunConfig) -> Any:
    # the student's tokenizer: a teacher with another one reads the student's text in its own tokens
    for path in (cfg.tokenizer.path, cfg.student.path, cfg.teacher.path if cfg.teacher else None):
        if path:
            return load_tokenizer(path)
    return None  # a BPE trained on the domains' training text


def build_mixture_trainer(cfg: MixtureRunConfig, *, show_progress: bool = True, accelerator: Any = None,
                          resume: bool | None = None, overwrite: bool = False) -> tuple[Trainer, DomainData]:
    """The trainer of a mixture run (nothing trained yet); the output directory is locked first and, with
    ``resume`` given, checked for reuse (as :func:`lmdistill.train.run.build_trainer`)."""
    objective = build_objective(cfg.objective)
    if objective.requires_teacher and cfg.teacher is None:
        raise ConfigError(f"objective '{objective.name}' needs a teacher: add teacher.path to the config")
    accelerator = accelerator or make_accelerator(cfg.train.mixed_precision)
    run_dir = RunDirectory.claim(cfg, accelerator, resume=resume, overwrite=overwrite)
    try:
        torch.manual_seed(cfg.train.seed)
        data = prepare_domains(
            cfg.domains, block_size=cfg.data.block_size, tokenizer=_tokenizer(cfg), vocab_size=cfg.tokenizer.vocab_size,
            fractions=cfg.data.split_fractions, cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir(),
        )
        models = build_models(cfg.student, cfg.teacher, data.tokenizer, max_positions=max(cfg.data.block_size, 128),
                              seed=cfg.train.seed, objective=objective, vocab=cfg.vocab)
        objective = models.objective
        train_blocks = {n: data.blocks(n, "train") for n in data.names}
        validation = {n: data.blocks(n, "validation") for n in data.names}
        weights = MixtureWeights(data.names, cfg.mixture.policy, interval=cfg.mixture.interval, alpha=cfg.mixture.alpha,
                                 smooth=cfg.mixture.smooth, sizes=domain_sizes(list(train_blocks.values())))
        source = MixtureSource(train_blocks, weights, global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                               validation=validation, validation_blocks=cfg.mixture.validation_blocks,
                               eval_batch_size=cfg.eval.batch_size)
        evaluator: Any = DomainEvaluator(validation, {n: data.streams[n]["validation"].bytes_per_target for n in data.names},
                                         batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches)
        if cfg.monitor is not None:
            evaluator = MonitoredEvaluator(cfg.monitor, base=evaluator)
        trainer = Trainer(
            cfg, student=models.student, tokenizer=data.tokenizer, objective=objective,
            train_stream=data.combined["train"], validation_stream=data.combined["validation"], teacher=models.teacher,
            train_source=source, vocab_size=models.vocab_size, accelerator=accelerator, show_progress=show_progress,
            evaluator=evaluator, run_dir=run_dir,
        )
    except BaseException:
        run_dir.release()
        raise
    return trainer, data


def run_mixture(cfg: MixtureRunConfig, *, resume: bool = False, overwrite: bool = False,
                show_progress: bool = True) -> dict[str, Any]:
    """Train on the mixture, save ``final/``, write ``mixture.json`` (and ``mixture.png``); returns the summary."""
    trainer, data = build_mixture_trainer(cfg, show_progress=show_progress, resume=resume, overwrite=overwrite)
    try:
        result = trainer.train(resume=resume)
        final = trainer.save_final()
    finally:
        trainer.close()
    source: MixtureSource = trainer.source  # type: ignore[assignment]
    summary = {
        "output_dir": str(cfg.output_dir), "final_model": str(final), "policy": cfg.mixture.policy, "domains": data.names,
        "validation": {k: v for k, v in result.final_metrics.items() if k != "kind"},
        "weights_history": source.weights.history, "blocks_drawn": dict(zip(data.names, source.drawn)),
        "train_seconds": result.train_seconds,
    }
    if trainer.accelerator.is_main_process:
        out = Path(cfg.output_dir)
        (out / "mixture.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        if cfg.mixture.plot:
            plot_weights(source.weights.history, data.names, out / "mixture.png", title=f"{cfg.mixture.policy} weights")
    return summary


__all__ = ["MixtureRunConfig", "MixtureSettings", "build_mixture_trainer", "run_mixture"]
