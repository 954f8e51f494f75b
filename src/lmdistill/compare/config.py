"""The ``lmdistill compare`` config: a base run config, teacher choices, the grid, evaluation and budget.

Validated like every other config (unknown keys are errors naming the allowed ones). ``--set`` overrides
address it the same way (``--set base.train.steps=100 --set grid.seeds=[0,1]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmdistill.config import Section, apply_overrides, read_config_mapping, validate_config

__all__ = ["CompareConfig", "TeacherChoice", "BuildSpec", "GridConfig", "EvaluationConfig", "BudgetConfig",
           "load_compare_config", "base_mapping"]

TEACHER_ANSWERS = "teacher_answers"  # regime.store placeholder: the cell teacher's answers, generated once


class BuildSpec(Section):
    """A run that builds a teacher once: a built-in recipe (``lmdistill/recipes``, e.g. ``demo_teacher``) or a
    config file, with ``--set``-style overrides."""

    recipe: str | None = Field(None, description="a built-in recipe name, e.g. demo_teacher")
    config: str | None = Field(None, description="a run config file (YAML)")
    set: list[str] = Field(default_factory=list, description="overrides, e.g. [student.preset=gpt2-teacher-12m]")

    @model_validator(mode="after")
    def _one_source(self) -> BuildSpec:
        if (self.recipe is None) == (self.config is None):
            raise ValueError("give exactly one of 'recipe' (a built-in recipe name) or 'config' (a YAML file)")
        if self.config is not None and not Path(self.config).expanduser().is_file():
            raise ValueError(f"config file '{self.config}' does not exist")
        return self


class TeacherChoice(Section):
    """One teacher of the grid: an existing model (``path``), or one pretrained once (``pretrain``) and
    optionally fine-tuned on a task (``sft``). Built teachers are cached by their settings and reused."""

    path: str | None = Field(None, description="an existing teacher directory (save_pretrained)")
    pretrain: BuildSpec | None = Field(None, description="pretrain the teacher once with this run config")
    sft: BuildSpec | None = Field(None, description="then fine-tune it once with this task-run config (lmdistill sft)")
    cache: dict[str, Any] | None = Field(
        None, description="build one offline teacher cache (cache-teacher's `cache:` section, e.g. {mode: lowrank}) "
        "that every cell trains from; evaluation still scores with the live teacher")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keys of the cells' teacher section (dtype, tail)")

    @model_validator(mode="after")
    def _source(self) -> TeacherChoice:
        if (self.path is None) == (self.pretrain is None):
            raise ValueError("give exactly one of 'path' (an existing teacher) or 'pretrain' (build it once)")
        if self.sft is not None and self.pretrain is None:
            raise ValueError("'sft' fine-tunes a teacher built by 'pretrain'; an existing teacher (path) is used as it is")
        for key in ("path", "cache"):
            if key in self.options:
                raise ValueError(f"options.{key}: the teacher's {key} comes from the choice itself, not its options")
        return self


class GridConfig(Section):
    """The axes; every combination is one cell (one training run)."""

    objectives: list[Any] = Field(default_factory=list, description="objective specs (name, {name: ..., params}, "
                                  "{mix: [...]}); a mapping may add 'label' and 'set' (overrides); empty: base's objective")
    regimes: list[dict[str, Any]] = Field(
        default_factory=list, description="task grids only: regime sections (kind + parameters; task and max_length "
        "come from base.regime); may add 'label', 'set'")
    teachers: list[str] | None = Field(None, description="names from 'teachers'; default: all of them")
    seeds: list[int] = Field(default_factory=lambda: [0])

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        return seeds


class EvaluationConfig(Section):
    max_batches: int | None = Field(20, gt=0, description="validation batches per corpus (None: whole split)")
    batch_size: int = Field(16, gt=0)
    out_of_domain: Literal["auto"] | list[str] = Field(
        "auto", description="corpora for out-of-domain bits per byte: auto = every other installed built-in corpus")


class BudgetConfig(Section):
    """Equal steps (each cell trains ``base.train.steps``) or equal wall time: each row's seconds per step is
    measured once by a short probe run (``probe_warmup`` steps ignored, then ``probe_steps`` timed) and its
    cells train for ``seconds / (seconds per step)`` steps. ``seconds`` None: the baseline row's time for
    ``base.train.steps``. The measured rates are kept in ``calibration.json``, so reruns train the same steps."""

    equal: Literal["steps", "time"] = "steps"
    seconds: float | None = Field(None, gt=0)
    probe_steps: int = Field(8, ge=1)
    probe_warmup: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _fits(self) -> BudgetConfig:
        if self.equal == "steps" and self.seconds is not None:
            raise ValueError("budget.seconds applies to equal: time")
        return self


class CompareConfig(Section):
    output_dir: str = Field("runs/compare", description="cells/, report.md, report.html and plots go here")
    base: dict[str, Any] | str = Field(..., description="the run config every cell starts from (mapping or YAML file); "
                                       "with a 'regime' section the cells are task runs")
    teachers: dict[str, TeacherChoice] = Field(default_factory=dict, description="named teacher choices; "
                                               "empty: base's teacher section (if any) is the only one")
    grid: GridConfig = GridConfig()
    baseline: dict[str, str] = Field(default_factory=lambda: {"objective": "forward_kl"},
                                     description="the row others are compared with, by axis label (objective, regime, "
                                     "teacher); the other axes match")
    evaluation: EvaluationConfig = EvaluationConfig()
    budget: BudgetConfig = BudgetConfig()
    jobs: int = Field(1, ge=0, description="cells run at once, each in its own process; 0: one after another in "
                      "this process (no isolation; for debugging)")

    @field_validator("baseline")
    @classmethod
    def _axes(cls, baseline: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(baseline) - {"objective", "regime", "teacher"})
        if unknown:
            raise ValueError(f"unknown axes {unknown}; allowed: objective, regime, teacher")
        return baseline

    @model_validator(mode="after")
    def _teachers_named(self) -> CompareConfig:
        for name in self.grid.teachers or []:
            if name not in self.teachers:
                raise ValueError(f"grid.teachers: '{name}' is not among teachers ({', '.join(self.teachers) or 'none'})")
        for name in self.teachers:
            if not name or any(ch in name for ch in "/\\") or name.startswith("."):
                raise ValueError(f"teacher name '{name}' must be a plain name (no slashes, not starting with '.')")
        return self


def base_mapping(config: CompareConfig, source: str) -> dict[str, Any]:
    """The base run config as a mapping (read from its file when ``base`` names one)."""
    if isinstance(config.base, dict):
        return dict(config.base)
    return read_config_mapping(config.base, f"{source}: base: config file")


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> tuple[CompareConfig, dict[str, Any]]:
    """The validated config and the raw mapping it came from (after overrides; the report prints it)."""
    raw = apply_overrides(read_config_mapping(path, "compare config"), list(overrides or []))
    return validate_config(raw, str(Path(path)), model=CompareConfig), raw
