"""Build a run from a validated config: tokenizer, data, teacher, student, objective -> Trainer.

Pretraining and label-only training are runs without a teacher and with the ``cross_entropy``
objective; distillation adds a teacher. Everything that can be checked without loading a model is
checked first (config, paths, objective name and parameters, the output directory: writable, not in use
by another run, not holding an earlier run unless resumed or overwritten).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmdistill.config import (
    ModelConfig,
    RunConfig,
    TeacherConfig,
    VocabConfig,
    check_block_size,
    check_model_paths,
    dump_config,
)
from lmdistill.data.blocks import TokenStream
from lmdistill.data.prepare import PreparedData, default_cache_dir, prepare_data
from lmdistill.data.tokenizer import load_tokenizer
from lmdistill.errors import ConfigError
from lmdistill.eval.monitor import MonitoredEvaluator
from lmdistill.losses import Objective, build_objective, on_aligned_spans
from lmdistill.losses.pairing import ModelPair, model_shape
from lmdistill.losses.signals import CROSSTOK
from lmdistill.models.loading import build_from_preset, count_parameters, load_causal_lm
from lmdistill.models.lora import apply_lora
from lmdistill.models.vocab import SharedVocab, check_vocab_compatible
from lmdistill.teachers.live import load_live_teacher
from lmdistill.train.guard import make_accelerator
from lmdistill.train.rundir import RunDirectory
from lmdistill.train.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)
_LAYER = re.compile(r"\.(h|layers)\.(\d+)\.")


def init_from_teacher_layers(student: PreTrainedModel, teacher: PreTrainedModel) -> list[int]:
    """Copy the teacher's embeddings, final norm and evenly spaced layers into a narrower-depth
    student of the same width (the layer-subset initialisation of DistilBERT-style students).
    Returns the teacher layer indices used. Fails clearly when the shapes do not allow it."""
    s_state, t_state = student.state_dict(), teacher.state_dict()
    n_s = 1 + max((int(m.group(2)) for k in s_state if (m := _LAYER.search(k))), default=-1)
    n_t = 1 + max((int(m.group(2)) for k in t_state if (m := _LAYER.search(k))), default=-1)
    if n_s == 0 or n_t == 0 or n_s > n_t:
        raise ConfigError(f"student.init=teacher_layers needs a student with at most the teacher's {n_t} layers (student has {n_s})")
    chosen = [round(i * (n_t - 1) / max(1, n_s - 1)) for i in range(n_s)] if n_s > 1 else [n_t - 1]
    new_state = {}
    for key, value in s_state.items():
        m = _LAYER.search(key)
        t_key = key if m is None else key[: m.start()] + f".{m.group(1)}.{chosen[int(m.group(2))]}." + key[m.end():]
        if t_key not in t_state or t_state[t_key].shape != value.shape:
            got = tuple(t_state[t_key].shape) if t_key in t_state else "absent"
            raise ConfigError(
                f"student.init=teacher_layers: shapes do not allow it ({key}: student {tuple(value.shape)}, "
                f"teacher {got}); use a student preset of the teacher's width, or student.init=scratch"
            )
        new_state[key] = t_state[t_key].detach().clone().to(value.dtype)
    student.load_state_dict(new_state)
    return chosen


def _tokenizer_for(config: RunConfig):
    """The tokenizer of the run's data: the student's (a teacher with another tokenizer reads the student's text
    in its own tokens). A cache stores blocks of its own tokenizer, so it fixes the data's."""
    if config.tokenizer.path:
        return load_tokenizer(config.tokenizer.path)
    if config.teacher is not None and config.teacher.cache is not None:
        from lmdistill.teachers.cache import cache_tokenizer

        return cache_tokenizer(config.teacher.cache)
    if config.student.path:
        return load_tokenizer(config.student.path)
    if config.teacher is not None and config.teacher.path is not None:
        return load_tokenizer(config.teacher.path)
    return None  # trained on the corpus by prepare_data


@dataclass
class Models:
    student: PreTrainedModel
    teacher: Any | None  # a teacher source (live model or offline cache), None for label-only runs
    teacher_model: PreTrainedModel | None  # the live teacher's model, when there is one
    vocab_size: int  # the student's logits are sliced to this: real tokens (shared with a same-map teacher)
    objective: Objective | None = None  # the objective as it runs for this pair (rung 3: on aligned spans)


def build_models(
    student_cfg: ModelConfig,
    teacher_cfg: TeacherConfig | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_positions: int,
    seed: int,
    cache_stream: TokenStream | None = None,
    block_size: int | None = None,
    objective: Objective | None = None,
    vocab: VocabConfig | None = None,
) -> Models:
    """Student (loaded or from a preset), teacher source, and their checked vocabulary alignment.

    A live teacher reads with its own tokenizer; the rung of the vocabulary ladder (``vocab``) decides whether it
    is one token map (rungs 1-2: logits compared column by column) or an aligned teacher (rungs 3-4, or a
    cross-tokenizer ``objective``). A teacher cache is in the data's tokens, the student's: a cache of the teacher's
    own tokens of that text (a cross-tokenizer cache) is an aligned teacher too. On rung 3 same-vocabulary parts of
    ``objective`` run on aligned spans; the objective as it runs is returned in :attr:`Models.objective`, its
    tokenizer maps bound."""
    if student_cfg.path:
        student = load_causal_lm(student_cfg.path, dtype=student_cfg.dtype)
        student_tokenizer = load_tokenizer(student_cfg.path)
        if student_cfg.lora is not None:
            student = apply_lora(student, student_cfg.lora)
    else:
        student = build_from_preset(student_cfg.preset, tokenizer, max_positions=max_positions, seed=seed)
        student_tokenizer = tokenizer
    student_rows = student.get_output_embeddings().weight.shape[0]
    teacher = None
    teacher_model = None
    vocab_size = len(tokenizer)
    teacher_side = None  # (tokenizer, output rows, (blocks, width)) of a teacher the objectives bind to
    if teacher_cfg is not None and teacher_cfg.path is not None:
        teacher_tokenizer = load_tokenizer(teacher_cfg.path)
        teacher = load_live_teacher(teacher_cfg.path, tokenizer=teacher_tokenizer, dtype=teacher_cfg.dtype,
                                    student_tokenizer=student_tokenizer, student_rows=student_rows, vocab=vocab,
                                    objective=objective)
        teacher_model = teacher.model
        teacher_side = (teacher_tokenizer, teacher_model.get_output_embeddings().weight.shape[0], model_shape(teacher_model))
        if CROSSTOK not in teacher.signal_kinds:
            vocab_size = teacher.alignment.real_vocab_size
    elif student_cfg.init == "teacher_layers":
        raise ConfigError("student.init=teacher_layers needs a live teacher (teacher.path)")
    if teacher_cfg is not None and teacher_cfg.cache is not None:
        from lmdistill.teachers.cache import open_teacher_cache

        try:  # the cache's data are in its tokenizer: the student's own (a cross-tokenizer cache) or one map with it
            vocab_size = check_vocab_compatible(
                tokenizer, student_tokenizer, teacher_rows=len(tokenizer), student_rows=student_rows
            ).real_vocab_size
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} A teacher cache for this student stores the teacher's own tokens of the student's text: build it "
                "with `lmdistill cache-teacher` and tokenizer: <the student's tokenizer directory> (cache.mode: topk)"
            ) from None
        # The cache checks its manifest (tokenizer, data, block size) against this run and refuses a mismatch.
        teacher = open_teacher_cache(
            teacher_cfg.cache, stream=cache_stream, tokenizer=tokenizer, block_size=block_size, tail=teacher_cfg.tail,
            logits_dtype=teacher_cfg.logits_dtype,
        )
        if CROSSTOK in teacher.signal_kinds:  # a cross-tokenizer cache: the teacher's top-k over its own tokens
            teacher.pair_with(student_tokenizer, student_rows=student_rows, vocab=vocab, objective=objective)
            teacher_side = (teacher.teacher_tokenizer, teacher.teacher_rows, teacher.teacher_shape)
    if teacher is not None and CROSSTOK in teacher.signal_kinds:  # the teacher reads the student's text in its own tokens
        vocab_size = len(student_tokenizer)
        if objective is not None:
            wrapped = on_aligned_spans(objective)
            if wrapped is not objective:
                log.info("rung 3: same-vocabulary parts run on character-aligned spans folded to the shared tokens: %s",
                         wrapped)
            objective = wrapped
    if teacher_side is not None and objective is not None:  # objectives size what they learn, or map vocabularies
        pairing = teacher.pairing
        pair = ModelPair(teacher_side[0], student_tokenizer, teacher_side[1], student_rows, *teacher_side[2],
                         *model_shape(student), seed=seed, fold=vocab.fold if vocab else "prefix",
                         vocab=pairing if isinstance(pairing, SharedVocab) else None)
        for leaf in objective.leaves():
            leaf.bind_models(pair)
    if teacher_model is not None and student_cfg.init == "teacher_layers":
        used = init_from_teacher_layers(student, teacher_model)
        log.info("student initialised from teacher layers %s", used)
    log.info("student: %.2fM parameters", count_parameters(student) / 1e6)
    return Models(student=student, teacher=teacher, teacher_model=teacher_model, vocab_size=vocab_size,
                  objective=objective)


def build_trainer(
    config: RunConfig,
    *,
    show_progress: bool = True,
    accelerator: Any = None,
    resume: bool | None = None,
    overwrite: bool = False,
) -> tuple[Trainer, PreparedData]:
    """A trainer for ``config``. The output directory is locked and checked writable before any data or
    model loads; with ``resume`` given (True/False) it is also checked for reuse now (an earlier run is
    refused unless resumed, or removed with ``overwrite``), otherwise :meth:`Trainer.train` checks it."""
    objective = build_objective(config.objective)  # validates name and parameters before any model loads
    if objective.requires_teacher and config.teacher is None:
        raise ConfigError(f"objective '{objective.name}' needs a teacher: add teacher.path to the config")
    check_model_paths(config)  # a mistyped or wrong directory is named before any data is tokenized
    log.debug("run config (after overrides):\n%s", dump_config(config))
    for warning in check_block_size(config, config.block_size):
        log.warning(warning)
    accelerator = accelerator or make_accelerator(config.train.mixed_precision)
    run_dir = RunDirectory.claim(config, accelerator, resume=resume, overwrite=overwrite)
    try:
        trainer, data = _build(config, objective, show_progress, accelerator, run_dir)
    except BaseException:
        run_dir.release()
        raise
    return trainer, data


def _build(config: RunConfig, objective: Any, show_progress: bool, accelerator: Any,
           run_dir: RunDirectory) -> tuple[Trainer, PreparedData]:
    torch.manual_seed(config.train.seed)
    data = prepare_data(
        config.data.corpus,
        block_size=config.data.block_size,
        tokenizer=_tokenizer_for(config),
        vocab_size=config.tokenizer.vocab_size,
        fractions=config.data.split_fractions,
        cache_dir=Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir(),
    )
    tokenizer = data.tokenizer
    teacher_stream = data.streams["train"] if config.teacher is not None and config.teacher.cache else None
    models = build_models(
        config.student, config.teacher, tokenizer, max_positions=max(config.data.block_size, 128),
        seed=config.train.seed, cache_stream=teacher_stream, block_size=config.data.block_size,
        objective=objective, vocab=config.vocab,
    )
    student, teacher, vocab_size, objective = models.student, models.teacher, models.vocab_size, models.objective
    trainer = Trainer(
        config,
        student=student,
        tokenizer=tokenizer,
        objective=objective,
        train_stream=data.streams["train"],
        validation_stream=data.streams["validation"],
        teacher=teacher,
        vocab_size=vocab_size,
        accelerator=accelerator,
        show_progress=show_progress,
        run_dir=run_dir,
        evaluator=None if config.monitor is None else MonitoredEvaluator(config.monitor),
    )
    return trainer, data


def run_training(config: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 show_progress: bool = True) -> TrainResult:
    """Train (pretrain, label-only or distil, depending on the config), save the final model.

    An output directory that holds an earlier run is refused unless ``resume`` (continue its newest intact
    checkpoint; settings it depends on must not change) or ``overwrite`` (remove it first)."""
    trainer, _ = build_trainer(config, show_progress=show_progress, resume=resume, overwrite=overwrite)
    try:
        result = trainer.train(resume=resume)
        trainer.save_final()
    finally:
        trainer.close()
    return result
