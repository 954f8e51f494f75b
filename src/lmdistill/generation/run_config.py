"""Run configs of the generation commands: ``lmdistill sft`` / ``distill`` with a ``regime`` section (:class:`TaskRunConfig`)
and ``lmdistill generate`` (:class:`GenerateConfig`). They reuse the sections of
:class:`lmdistill.config.RunConfig` and add the regime (which holds the task) and the generation
evaluation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmdistill.config import TeacherConfig, TokenizerConfig, TrainingRunConfig
from lmdistill.generation.config import BlackBoxConfig, RegimeConfig, SamplingConfig, Section, TaskConfig


class GenerationEvalConfig(Section):
    """Task evaluation after training: generate for held-out prompts, score against references."""

    split: Literal["validation", "test"] = "validation"
    max_examples: int | None = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    sampling: SamplingConfig = SamplingConfig(greedy=True, max_new_tokens=48)


class TaskRunConfig(TrainingRunConfig):
    """A training run on a task (``lmdistill sft``, ``lmdistill distill``): the sections of every training run
    (:class:`~lmdistill.config.TrainingRunConfig`) plus the regime (which holds the task), the generation
    evaluation and the tokenized-data cache."""

    output_dir: str = "runs/task"
    tokenizer: TokenizerConfig = TokenizerConfig(vocab_size=2048)
    regime: RegimeConfig = RegimeConfig()
    generation: GenerationEvalConfig = GenerationEvalConfig()
    cache_dir: str | None = Field(None, description="tokenized-data cache; default $LMDISTILL_CACHE_DIR or .cache/lmdistill")

    @property
    def block_size(self) -> int:
        return self.regime.max_length

    @model_validator(mode="after")
    def _teacher_needed(self) -> TaskRunConfig:
        if self.regime.kind in ("scrg",) and self.teacher is None:
            raise ValueError("regime.kind=scrg needs a teacher section (the teacher revises the student's samples)")
        if self.teacher is not None and getattr(self.teacher, "path", None) is None:
            raise ValueError(
                "task runs need a live teacher (teacher.path): student samples and rewritten prefixes are made during "
                "training, so no offline teacher cache holds their teacher logits"
            )
        return self


class GenerateConfig(Section):
    """``lmdistill generate``: a teacher answers a task's prompts; answers go to a resumable JSONL store
    (the dataset of sequence-level KD). The teacher is a local model (``teacher``) or an
    OpenAI-compatible endpoint (``blackbox``): give exactly one."""

    task: TaskConfig = TaskConfig()
    split: Literal["train", "validation", "test"] = "train"
    store: str = Field(..., description="JSONL file; completed answers are appended, a rerun resumes")
    teacher: TeacherConfig | None = None
    blackbox: BlackBoxConfig | None = None
    sampling: SamplingConfig = SamplingConfig(greedy=True, max_new_tokens=48)
    batch_size: int = Field(32, ge=1, description="local teacher: prompts per generation batch")
    seed: int = 0

    @model_validator(mode="after")
    def _one_teacher(self) -> GenerateConfig:
        if (self.teacher is None) == (self.blackbox is None):
            raise ValueError("give exactly one of 'teacher' (a local model) or 'blackbox' (an HTTP endpoint)")
        if self.teacher is not None and getattr(self.teacher, "path", None) is None:
            raise ValueError("generate needs teacher.path (a model that generates), not an offline logit cache")
        return self
