"""Run configuration: pydantic models mirroring the pipeline's parts, loaded from YAML with overrides.

Every mistake is reported before any model loads, named by its key path with the allowed values:
an unknown or misspelt key, a wrong type, a file that does not exist.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmdistill.errors import ConfigError
from lmdistill.models.lora import LoraSettings

BUILTIN_CORPORA = ("kjv", "gcide", "jargon", "fortunes")


class Section(BaseModel):
    """Base of every config section of every command: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def looks_local(path: str) -> bool:
    """Hub ids look like "org/name"; a path starting with / . ~ or with deeper nesting is local."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).expanduser().exists()


def require_existing(path: str | None, what: str) -> str | None:
    if path is not None and looks_local(path) and not Path(path).expanduser().exists():
        raise ValueError(f"{what} '{path}' does not exist{_did_you_mean(Path(path).expanduser())}")
    return path


def _did_you_mean(path: Path) -> str:
    """'; did you mean X?' for a missing path whose name is close to a sibling's, else a reminder of where paths
    are resolved from."""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        siblings = [p.name for p in parent.iterdir()]
        close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.75)
        if close:
            return f"; did you mean '{parent / close[0]}'?"
    return f" (paths are relative to the working directory, {Path.cwd()})"


MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def check_model_paths(config: BaseModel) -> None:
    """Before any data is tokenized or model loaded: every ``student.path`` / ``teacher.path`` of a run config is a
    loadable model (see :func:`require_model`); the error names the key."""
    for section in ("student", "teacher"):
        part = getattr(config, section, None)
        path = getattr(part, "path", None)
        if path is not None:
            try:
                require_model(path, f"{section}.path")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


# config.json keys holding a model's number of positions, and the families whose positions are a learned table
# (a longer sequence is an index error there; rotary models degrade instead, so they get a warning)
POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length")
LEARNED_POSITION_TYPES = ("gpt2", "gpt_neo", "opt", "bloom", "biogpt", "xglm", "codegen")


def model_positions(path: str | Path) -> tuple[int, str, bool] | None:
    """(positions, config key, learned table?) of a saved model's ``config.json``; None when it names none."""
    try:
        cfg = json.loads((Path(path).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in POSITION_KEYS:
        if isinstance(cfg.get(key), int):
            return cfg[key], key, cfg.get("model_type") in LEARNED_POSITION_TYPES
    return None


def check_block_size(config: BaseModel, block_size: int) -> list[str]:
    """Refuse a ``block_size`` beyond a learned-position model's table (naming the model and the key to change);
    returns warnings for rotary models asked to go beyond what they were configured for."""
    warnings = []
    for section in ("student", "teacher"):
        path = getattr(getattr(config, section, None), "path", None)
        found = model_positions(path) if path is not None else None
        if found is None or block_size <= found[0]:
            continue
        positions, key, learned = found
        what = (f"the block size {block_size} exceeds the {section}'s {positions} positions ({section}.path {path}: "
                f"config.json {key})")
        if learned:
            raise ConfigError(f"{what}; set data.block_size (or regime.max_length) to at most {positions}, or use "
                              f"another {section}")
        warnings.append(f"{what}; it has no learned position table, but it was not trained that long")
    return warnings


def require_model(path: str | None, key: str) -> str | None:
    """A model path (``key``: the config key) must be a hub id or a directory that ``save_pretrained`` wrote: a
    readable ``config.json`` and safetensors weights. Common mistakes get their own message: a typo (with the
    closest sibling), a file, a tokenizer-only directory, a run directory instead of its ``final/``."""
    if path is None:
        return None
    local = Path(path).expanduser()
    if not local.exists():
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        if looks_local(path) or offline:
            where = " and, offline (HF_HUB_OFFLINE=1), not a hub id either" if not looks_local(path) else ""
            raise ValueError(f"{key} '{path}' does not exist{where}{_did_you_mean(local)}")
        return path  # a hub id, downloaded at load time
    if not local.is_dir():
        raise ValueError(f"{key} '{path}' is a file; give the directory a model was saved into (save_pretrained)")
    config_file = local / "config.json"
    if not config_file.exists():
        final = local / "final"
        if (final / "config.json").exists():
            raise ValueError(f"{key} '{path}' is a run directory; did you mean '{final}'?")
        has_tokenizer = any((local / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
        what = "a tokenizer but no model" if has_tokenizer else "no model"
        raise ValueError(f"{key} '{path}' holds {what}: no config.json (save the model there with save_pretrained)")
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key} '{path}': config.json is not valid JSON ({exc})") from None
    if not any((local / name).exists() for name in MODEL_WEIGHT_FILES):
        raise ValueError(f"{key} '{path}' has a config.json but no safetensors weights (model.safetensors)")
    return path


class DataConfig(Section):
    corpus: str = Field("kjv", description="corpus name (kjv, gcide, jargon, fortunes) or a path to .txt/.jsonl/.parquet/.csv")
    block_size: int = Field(128, gt=1)
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
    cache_dir: str | None = Field(None, description="tokenized-data cache; default $LMDISTILL_CACHE_DIR or .cache/lmdistill")

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.corpus not in BUILTIN_CORPORA and not Path(self.corpus).expanduser().exists():
            close = difflib.get_close_matches(self.corpus, BUILTIN_CORPORA, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else " (paths are relative to the working directory)"
            raise ValueError(
                f"data.corpus '{self.corpus}' is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}) nor an "
                f"existing file{hint}"
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
    lora: LoraSettings | None = Field(
        None, description="student only: train LoRA adapters on a frozen base (path:), e.g. {r: 16, alpha: 32}; "
        "save: adapter | merged | both",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.preset is None):
            raise ValueError("give exactly one of 'path' or 'preset'")
        if self.lora is not None and self.path is None:
            raise ValueError("'lora' adapts a saved model: give 'path' (a preset student trains in full)")
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

    _path_exists = field_validator("path")(lambda v: require_existing(v, "model path"))
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


class VocabConfig(Section):
    """How teacher and student vocabularies are paired (:func:`lmdistill.models.vocab.vocab_ladder`)."""

    rung: Literal["auto", "identical", "padded", "partial", "different"] = Field(
        "auto", description="the vocabulary ladder's rung; auto = chosen from the two tokenizers (logged at start): "
        "identical, padded (one token map), partial (shared token strings), different (cross-tokenizer objectives)",
    )
    min_shared_fraction: float = Field(0.5, ge=0, le=1, description="auto picks partial when at least this share of "
                                       "the smaller vocabulary is shared by string, else different")
    fold: Literal["prefix", "bucket"] = Field(
        "prefix", description="rungs 3-4: an unshared token joins its longest shared prefix (prefix) or one bucket")


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
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward (less memory, "
                                         "about a third more compute)")

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> TrainConfig:
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} is larger than batch_size {self.batch_size} (the global batch "
                "of one optimizer step); lower micro_batch_size or raise batch_size"
            )
        return self


class EvalConfig(Section):
    every: int = Field(100, gt=0)
    max_batches: int | None = Field(None, gt=0, description="cap on validation batches; None = whole split")
    batch_size: int = Field(16, gt=0)


class CheckpointConfig(Section):
    every: int = Field(100, gt=0)
    keep: int = Field(2, ge=1)


class MonitorConfig(Section):
    """``monitor:`` of a distillation run: the teacher-hacking monitor (:mod:`lmdistill.eval.monitor`)."""

    oracle: str | None = Field(None, description="the oracle model (a local directory): enables the golden metric")
    mode: Literal["sequence", "token"] = Field("sequence", description="sequence: KL along sampled responses (paper); token: on validation text")
    prompts: int = Field(32, ge=1, description="validation prompts (sequence) or validation blocks (token)")
    prompt_tokens: int = Field(16, ge=1, description="sequence mode on packed text: a prompt is the first tokens of a validation block")
    generations: int = Field(1, ge=1, description="responses sampled per prompt from each reference model")
    max_new_tokens: int = Field(32, ge=1)
    rise_tolerance: float = Field(0.02, ge=0, description="relative rise of the golden metric above its minimum that flags hacking")
    fit_fraction: float = Field(0.5, gt=0, le=1, description="share of the evaluations the power law is fitted on")
    powerlaw_tolerance: float = Field(0.1, gt=0, description="relative miss of the power-law fit that flags the proxy")
    seed: int = 0
    batch_size: int = Field(16, ge=1)

    _oracle_exists = field_validator("oracle")(lambda v: require_existing(v, "monitor.oracle"))


class TrainingRunConfig(Section):
    """The sections every training run has, whatever its data: a corpus (:class:`RunConfig`) or a task with a
    regime (:class:`lmdistill.generation.run_config.TaskRunConfig`). The trainer reads only these and
    :attr:`block_size`."""

    output_dir: str = "runs/run"
    tokenizer: TokenizerConfig = TokenizerConfig()
    student: ModelConfig = ModelConfig(preset="gpt2-student-1.5m")
    teacher: TeacherConfig | None = None
    vocab: VocabConfig = VocabConfig()
    objective: Any = Field("cross_entropy", description="objective name, {name: ..., params}, or {mix: [...]}")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    monitor: MonitorConfig | None = Field(None, description="teacher-hacking monitor: proxy (teacher) and golden "
                                          "(oracle) metrics with every evaluation; {oracle: DIR}")

    @property
    def block_size(self) -> int:
        """Tokens per training row (a packed block, or a padded prompt/response example)."""
        raise NotImplementedError


class RunConfig(TrainingRunConfig):
    """Everything one run on a corpus needs. `teacher` is absent for pretraining / label-only training."""

    data: DataConfig = DataConfig()

    @property
    def block_size(self) -> int:
        return self.data.block_size


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
    """One line per mistake, each naming its key path (one line in all when there is one mistake)."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1]) or []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{key}: unknown key{hint}; allowed keys here: {', '.join(allowed)}")
        elif err["type"] == "value_error":
            # our own validators' messages are complete sentences; pydantic's prefix adds nothing
            problems.append(f"{key}: {str(err['msg']).removeprefix('Value error, ')}")
        else:
            problems.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    if len(problems) == 1:
        return f"invalid configuration in {source}: {problems[0]}"
    return "\n".join([f"invalid configuration in {source}:", *(f"  - {p}" for p in problems)])


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
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML: {_yaml_problem(exc)}") from None
    return raw


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, model: type[BaseModel] = RunConfig
) -> Any:
    """Read a YAML config (or start from defaults when ``path`` is None), apply overrides, validate."""
    raw = {} if path is None else read_config_mapping(path)
    source = "defaults" if path is None else str(Path(path))
    return validate_config(apply_overrides(raw, overrides or []), source, model)


def read_config_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is ``{}``); a missing file, broken YAML (with its
    line and column) or another top level is a one-line :class:`ConfigError` naming the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}{_yaml_location(exc)}: not valid YAML: {_yaml_problem(exc)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}


def _yaml_location(exc: yaml.YAMLError) -> str:
    """``:line:column`` of a YAML error (1-based), or nothing when it has no position."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return "" if mark is None else f":{mark.line + 1}:{mark.column + 1}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The YAML parser's own explanation, without its quoted ``<unicode string>`` locations."""
    parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
    text = "; ".join(p for p in parts if p)
    return text or str(exc).splitlines()[0]


def validate_config(raw: dict[str, Any], source: str = "config", model: type[BaseModel] = RunConfig) -> Any:
    """Validate a config mapping; errors name the key path and the allowed keys."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
