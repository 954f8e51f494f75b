"""Run configuration: pydantic models mirroring the pipeline's parts, loaded from YAML with overrides.

Every mistake is reported before any model loads, named by its key path with the allowed values:
an unknown or misspelt key, a wrong type, a file that does not exist.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmdistill.errors import ConfigError


BUILTIN_CORPORA = ("kjv", "gcide", "jargon", "fortunes")


class Section(BaseModel):
    """Base of every config section of every command: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def looks_local(path: str) -> bool:
    """Hub ids look like "org/name"; a path starting with / . ~ or with deeper nesting is local."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).expanduser().exists()


def require_existing(path: str | None, what: str) -> str | None:
    if path is not None and looks_local(path) and not Path(path).expanduser().exists():
        raise ValueError(f"{what} '{path}' does not exist")
    return path


class DataConfig(Section):
    corpus: str = Field("kjv", description="corpus name (kjv, gcide, jargon, fortunes) or a path to .txt/.jsonl/.parquet/.csv")
    block_size: int = Field(128, gt=1)
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
    cache_dir: str | None = Field(None, description="tokenized-data cache; default $LMDISTILL_CACHE_DIR or .cache/lmdistill")

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.corpus not in BUILTIN_CORPORA and not Path(self.corpus).expanduser().exists():
            raise ValueError(
                f"data.corpus '{self.corpus}' is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}) nor an existing file"
            )
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError("split_fractions must be three non-negative numbers summing to 1")
        return self


class TokenizerConfig(Section):
    path: str | None = Field(None, description="a local Hugging Face tokenizer directory or hub id; None trains a BPE")
    vocab_size: int = Field(8192, ge=256)

    _path_exists = field_validator("path")(lambda v: require_existing(v, "tokenizer path"))


class ModelConfig(Section):
    path: str | None = Field(None, description="local directory (save_pretrained) or hub id")
    preset: str | None = Field(None, description="a from-scratch preset, see `lmdistill presets`")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    init: Literal["scratch", "teacher_layers"] = Field(
        "scratch", description="student only: random init, or copy a subset of the teacher's layers"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.preset is None):
            raise ValueError("give exactly one of 'path' or 'preset'")
        return self

    _path_exists = field_validator("path")(lambda v: require_existing(v, "model path"))


class TeacherConfig(Section):
    path: str | None = Field(None, description="local directory (save_pretrained) or hub id of a live teacher")
    cache: str | None = Field(None, description="an offline teacher cache (lmdistill cache-teacher): no teacher model is loaded")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tail: Literal["student", "uniform"] = Field(
        "uniform",
        description="with a top-k cache: how the residual mass outside the stored top-k is shared among the other "
        "tokens; uniform = evenly (better students in bench/cache.py), student = in proportion to the student's own "
        "probabilities (the divergence of the top-k + one 'rest' bucket); see lmdistill.losses.SparseTeacher",
    )

    logits_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="with a low-rank cache: the dtype of the matrix product that rebuilds the teacher's logits "
        "(inputs and result; the losses still compute in float32); auto = bfloat16 where the device multiplies "
        "bfloat16 natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs with bf16), else float32",
    )

    _path_exists = field_validator("path")(lambda v: require_existing(v, "teacher path"))
    _cache_exists = field_validator("cache")(lambda v: require_existing(v, "teacher cache"))

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.path is None) == (self.cache is None):
            raise ValueError("give exactly one of 'path' (a live teacher) or 'cache' (an offline teacher cache)")
        if self.path is not None and self.logits_dtype != "auto":
            raise ValueError("'logits_dtype' applies to low-rank teacher caches (teacher.cache); a live teacher's "
                             "precision is 'dtype'")
        if self.cache is not None and self.dtype != "float32":
            raise ValueError("'dtype' is the precision a live teacher (teacher.path) is loaded in; a cache has no "
                             "model to load (for a low-rank cache's logits product use 'logits_dtype')")
        return self


class TrainConfig(Section):
    steps: int = Field(500, gt=0)
    batch_size: int = Field(16, gt=0, description="global batch: sequences per optimizer step, all ranks together")
    micro_batch_size: int | None = Field(None, gt=0, description="sequences per forward pass on one rank")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    chunked_loss: bool | Literal["auto"] = Field(
        "auto",
        description="compute the loss chunk by chunk from hidden states, never materialising [tokens, vocab] logits; "
        "auto = whenever the models and objective allow it",
    )
    chunk_size: int | None = Field(None, gt=0, description="rows per loss chunk; default 256 (fewer for vocabularies > 256k)")
    log_every: int = Field(10, gt=0)


class EvalConfig(Section):
    every: int = Field(100, gt=0)
    max_batches: int | None = Field(None, gt=0, description="cap on validation batches; None = whole split")
    batch_size: int = Field(16, gt=0)


class CheckpointConfig(Section):
    every: int = Field(100, gt=0)
    keep: int = Field(2, ge=1)


class RunConfig(Section):
    """Everything one run needs. `teacher` is absent for pretraining / label-only training."""

    output_dir: str = "runs/run"
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    student: ModelConfig = ModelConfig(preset="gpt2-student-1.5m")
    teacher: TeacherConfig | None = None
    objective: Any = Field("cross_entropy", description="objective name, {name: ..., params}, or {mix: [...]}")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the section at ``loc`` (for 'allowed keys' in error messages)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return sorted(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else None
        annotation = current.model_fields[part].annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return None
    return sorted(current.model_fields) if current is not None else None


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1]) or []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - {key}: unknown key{hint} allowed keys here: {', '.join(allowed)}")
        else:
            lines.append(f"  - {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (numbers, lists, null...)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, model: type[BaseModel] = RunConfig
) -> Any:
    """Read a YAML config (or start from defaults when ``path`` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    return validate_config(apply_overrides(raw, overrides or []), source, model)


def validate_config(raw: dict[str, Any], source: str = "config", model: type[BaseModel] = RunConfig) -> Any:
    """Validate a config mapping; errors name the key path and the allowed keys."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
