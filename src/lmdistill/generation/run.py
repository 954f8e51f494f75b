"""Task runs on the one trainer: ``lmdistill sft`` (prompt/response fine-tuning, loss on responses
only), task distillation with any regime, and ``lmdistill generate`` (teacher answers for
sequence-level KD, local or black-box).

A task run builds: the tokenizer (given, the teacher's, the student's, or a BPE trained on the
task's training split), the task's splits, token streams of the training and validation examples,
student, teacher, objective, the regime's batch source and a validation evaluator
(:func:`task_evaluator`: response-only NLL of held-out examples on padded prompt/response batches,
the layout the regimes train on, instead of the trainer's packed blocks), and hands them to
:class:`~lmdistill.train.trainer.Trainer`. After training, the model answers held-out prompts and is
scored (ROUGE-L, exact match, the teacher's log-likelihood of its answers): ``generation_metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from lmdistill.config import check_block_size, check_model_paths
from lmdistill.data.blocks import TokenStream, tokenize_documents
from lmdistill.data.cache import default_cache_dir
from lmdistill.data.documents import Document
from lmdistill.data.prepare import trained_tokenizer
from lmdistill.data.tokenizer import load_tokenizer
from lmdistill.errors import ConfigError
from lmdistill.eval.lm import metrics_from_sums
from lmdistill.eval.monitor import MonitoredEvaluator
from lmdistill.generation.batching import encode_examples, encode_prompts, pad_id_of
from lmdistill.generation.blackbox import BlackBoxTeacher, StoreReport
from lmdistill.generation.config import TaskConfig
from lmdistill.generation.metrics import GenerationScores, evaluate_generation, response_nll, response_token_sums
from lmdistill.generation.run_config import GenerateConfig, TaskRunConfig
from lmdistill.generation.sampling import SamplingParams
from lmdistill.generation.seqkd import fill_store_local, local_teacher_id
from lmdistill.generation.sources import MiniLLMSource, build_batch_source, check_regime_objective
from lmdistill.generation.store import ResponseStore
from lmdistill.generation.tasks import apply_chat_template, build_task
from lmdistill.losses import build_objective
from lmdistill.models.loading import load_causal_lm
from lmdistill.train.run import build_models
from lmdistill.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


def task_streams(splits: dict[str, list[Document]], tokenizer: Any, cache_dir: Path, name: str) -> dict[str, TokenStream]:
    """Token streams of the task's training and validation examples (loss mask on responses)."""
    return {
        split: tokenize_documents(splits[split], tokenizer, cache_dir / "tokens", f"task-{name}-{split}", show_progress=False)
        for split in ("train", "validation")
    }


def stream_name(task: TaskConfig) -> str:
    """A readable cache name for a task's streams (the cache key itself is the content hash)."""
    key = hashlib.sha256(json.dumps(task.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:8]
    return f"{task.name or Path(task.path).stem}-{key}"


def _validation_examples(docs: Sequence[Document], tokenizer: Any, batch_size: int, max_batches: int | None
                         ) -> tuple[list[Any], int, float]:
    """The scored validation examples (the first ``max_batches * batch_size``), the pad id and the UTF-8 bytes of
    response text per response target."""
    docs = list(docs)
    if max_batches is not None:
        docs = docs[: max_batches * batch_size]
    examples = encode_examples(tokenizer, docs)
    # bytes per target over the whole (uncut) responses, like TokenStream.bytes_per_target
    n_bytes = sum(len((d.response or "").encode("utf-8")) for d in docs)
    return examples, pad_id_of(tokenizer), n_bytes / max(1, sum(len(e.response) for e in examples))


def task_evaluator(
    docs: Sequence[Document],
    tokenizer: Any,
    *,
    max_length: int,
    batch_size: int = 16,
    max_batches: int | None = None,
) -> Callable[[Trainer], dict[str, float]]:
    """The trainer's ``evaluator`` for a task run: validation on the response tokens of held-out
    prompt/response examples (the first ``max_batches * batch_size`` of ``docs``, all when
    ``max_batches`` is None), each example padded on its own row as in training.

    Returns the keys of :func:`lmdistill.eval.lm.evaluate_lm`: ``loss`` (mean NLL, nats per response
    target: response tokens plus the closing EOS), ``perplexity`` (exp(loss)), ``bits_per_byte`` (loss /
    ln 2 / UTF-8 bytes of response text per response target, as the task's token stream counts them),
    ``tokens`` (targets scored), and with a live teacher (``trainer.teacher.logits``) ``top1_agreement``
    (student argmax == teacher argmax) and ``kl_to_teacher`` (mean KL(teacher || student)) on the same
    targets. Batches are split over ranks and the sums all-reduced, so every rank returns the same."""
    examples, pad_id, bytes_per_target = _validation_examples(docs, tokenizer, batch_size, max_batches)

    def evaluate(trainer: Trainer) -> dict[str, float]:
        acc = trainer.accelerator
        teacher = trainer.teacher if trainer.teacher is not None and trainer.teacher.scores_text else None
        sums = response_token_sums(
            acc.unwrap_model(trainer.model), examples, pad_id=pad_id, max_length=max_length, batch_size=batch_size,
            vocab_size=trainer.vocab_size, teacher=teacher, rank=acc.process_index, world_size=acc.num_processes,
        )
        sums = acc.reduce(sums.to(acc.device), reduction="sum").cpu() if acc.num_processes > 1 else sums
        return metrics_from_sums(sums, bytes_per_target, with_teacher=teacher is not None)

    return evaluate


def task_tokenizer(cfg: TaskRunConfig, train_docs: list[Document], cache_dir: Path) -> Any:
    for path in (cfg.tokenizer.path, cfg.teacher.path if cfg.teacher else None, cfg.student.path):
        if path:
            return load_tokenizer(path)
    return trained_tokenizer(train_docs, cfg.tokenizer.vocab_size, cache_dir)


@dataclass
class TaskRun:
    trainer: Trainer
    tokenizer: Any
    splits: dict[str, list[Document]]
    teacher_model: PreTrainedModel | None


def build_task_run(
    cfg: TaskRunConfig,
    *,
    splits: dict[str, list[Document]] | None = None,
    show_progress: bool = True,
    accelerator: Any = None,
) -> TaskRun:
    """Everything a task run needs, wired into one :class:`Trainer` (nothing is trained yet)."""
    check_model_paths(cfg)
    for warning in check_block_size(cfg, cfg.block_size):
        log.warning(warning)
    objective = build_objective(cfg.objective)
    check_regime_objective(cfg.regime.kind, objective)
    if objective.requires_teacher and cfg.teacher is None:
        raise ConfigError(f"objective '{objective.name}' needs a teacher: add teacher.path to the config")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    splits = splits or build_task(cfg.regime.task)
    tokenizer = task_tokenizer(cfg, splits["train"], cache_dir)
    if cfg.regime.task.chat_template == "tokenizer":
        splits = apply_chat_template(splits, tokenizer)
    torch.manual_seed(cfg.train.seed)
    positions = max(256, cfg.regime.max_length + cfg.regime.sampling.max_new_tokens + 64)
    models = build_models(cfg.student, cfg.teacher, tokenizer, max_positions=positions, seed=cfg.train.seed,
                          objective=objective, vocab=cfg.vocab)
    student, teacher, teacher_model, vocab_size = models.student, models.teacher, models.teacher_model, models.vocab_size
    objective = models.objective
    streams = task_streams(splits, tokenizer, cache_dir, stream_name(cfg.regime.task))
    source = build_batch_source(cfg.regime, tokenizer=tokenizer, global_batch=cfg.train.batch_size, seed=cfg.train.seed,
                                documents=splits["train"])
    if isinstance(source, MiniLLMSource):  # it samples from the teacher model itself, step by step
        source.teacher_lm = teacher_model
    evaluator = task_evaluator(splits["validation"], tokenizer, max_length=cfg.regime.max_length,
                               batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches)
    if cfg.monitor is not None:  # the teacher-hacking monitor on the task's validation prompts
        prompts = encode_prompts(tokenizer, [d.prompt or "" for d in splits["validation"][: cfg.monitor.prompts]])
        evaluator = MonitoredEvaluator(cfg.monitor, base=evaluator, prompts=prompts)
    trainer = Trainer(
        cfg, student=student, tokenizer=tokenizer, objective=objective,
        train_stream=streams["train"], validation_stream=streams["validation"], teacher=teacher,
        train_source=source, vocab_size=vocab_size, accelerator=accelerator, show_progress=show_progress,
        evaluator=evaluator,
    )
    return TaskRun(trainer=trainer, tokenizer=tokenizer, splits=splits, teacher_model=teacher_model)


def evaluate_task_model(
    model: torch.nn.Module, tokenizer: Any, docs: list[Document], cfg: TaskRunConfig,
    teacher_model: torch.nn.Module | None = None, vocab_size: int | None = None,
) -> GenerationScores:
    gen = cfg.generation
    docs = docs[: gen.max_examples] if gen.max_examples else docs
    return evaluate_generation(model, tokenizer, docs, params=SamplingParams.from_config(gen.sampling),
                               teacher=teacher_model, batch_size=gen.batch_size, vocab_size=vocab_size, seed=cfg.train.seed)


def score_model_on_task(cfg: TaskRunConfig, path: str | Path) -> dict[str, float]:
    """The model at ``path`` scored on ``cfg``'s task as a task run scores its trained student, without
    training: response bits per byte and perplexity on the validation examples the trainer's evaluation uses
    (``eval.max_batches`` x ``eval.batch_size``), and ROUGE-L / exact match of its generations on
    ``generation.split`` with ``generation.sampling`` (the teacher reference row of ``lmdistill compare``)."""
    splits = build_task(cfg.regime.task)
    tokenizer = load_tokenizer(path)
    if cfg.regime.task.chat_template == "tokenizer":
        splits = apply_chat_template(splits, tokenizer)
    model = load_causal_lm(path)
    examples, pad_id, bytes_per_target = _validation_examples(splits["validation"], tokenizer, cfg.eval.batch_size,
                                                              cfg.eval.max_batches)
    sums = response_token_sums(model, examples, pad_id=pad_id, max_length=cfg.regime.max_length,
                               batch_size=cfg.eval.batch_size, vocab_size=len(tokenizer))
    validation = metrics_from_sums(sums, bytes_per_target, with_teacher=False)
    scores = evaluate_task_model(model, tokenizer, splits[cfg.generation.split], cfg, vocab_size=len(tokenizer))
    generation = scores.as_dict()
    return {"bits_per_byte": validation["bits_per_byte"], "perplexity": validation["perplexity"],
            "rouge_l": generation["rouge_l"], "exact_match": generation["exact_match"]}


def run_task(cfg: TaskRunConfig, *, resume: bool = False, show_progress: bool = True,
             splits: dict[str, list[Document]] | None = None) -> dict[str, Any]:
    """Train on the task with the configured regime and objective, save ``final/``, then score
    generations on ``generation.split``; returns (and writes) the metrics."""
    run = build_task_run(cfg, splits=splits, show_progress=show_progress)
    result: TrainResult = run.trainer.train(resume=resume)
    final = run.trainer.save_final()
    model = run.trainer.accelerator.unwrap_model(run.trainer.model)
    start = time.perf_counter()
    eval_docs = run.splits[cfg.generation.split]
    scores = evaluate_task_model(model, run.tokenizer, eval_docs, cfg, run.teacher_model, run.trainer.vocab_size)
    nll = response_nll(model, run.tokenizer, eval_docs[: cfg.generation.max_examples] if cfg.generation.max_examples else eval_docs,
                       batch_size=cfg.generation.batch_size, vocab_size=run.trainer.vocab_size,
                       max_length=cfg.regime.max_length)
    metrics = {
        "output_dir": str(cfg.output_dir), "final_model": str(final), "regime": cfg.regime.kind,
        "train_seconds": result.train_seconds, "eval_seconds": time.perf_counter() - start,
        "validation": {k: v for k, v in result.final_metrics.items() if k != "kind"},
        "generation": {"split": cfg.generation.split, "response_nll": nll, **scores.as_dict()},
        "samples": scores.samples,
        "source_stats": getattr(run.trainer.source, "stats", {}),
    }
    if run.trainer.accelerator.is_main_process:
        Path(cfg.output_dir, "generation_metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def run_generate(cfg: GenerateConfig, *, progress: Any = None, environ: Any = None) -> StoreReport:
    """Teacher answers for every prompt of ``cfg.split`` into ``cfg.store`` (resumes; see
    :mod:`lmdistill.generation.seqkd`)."""
    docs = build_task(cfg.task)[cfg.split]
    if cfg.task.chat_template == "tokenizer":
        if cfg.teacher is None:
            raise ConfigError("task.chat_template: tokenizer needs a local teacher (its tokenizer's template); a "
                              "black-box endpoint applies its own template to chat requests")
        docs = apply_chat_template({cfg.split: docs}, load_tokenizer(cfg.teacher.path))[cfg.split]
    store = ResponseStore(cfg.store)
    prompts = [d.prompt for d in docs]
    ids = [d.doc_id for d in docs]
    if cfg.blackbox is not None:
        client = BlackBoxTeacher(cfg.blackbox, sampling=cfg.sampling, seed=cfg.seed, environ=environ)
        return client.fill_store(prompts, store, doc_ids=ids, progress=progress)
    assert cfg.teacher is not None
    model = load_causal_lm(cfg.teacher.path, dtype=cfg.teacher.dtype)
    tokenizer = load_tokenizer(cfg.teacher.path)
    return fill_store_local(model, tokenizer, prompts, store, teacher_id=local_teacher_id(cfg.teacher.path),
                            params=SamplingParams.from_config(cfg.sampling), batch_size=cfg.batch_size, seed=cfg.seed,
                            doc_ids=ids, progress=progress)


__all__ = ["TaskConfig", "TaskRun", "build_task_run", "run_generate", "run_task", "score_model_on_task", "task_evaluator",
           "task_streams"]
