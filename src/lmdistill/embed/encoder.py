"""Bi-encoders: a `transformers` encoder plus pooling, with sentence-transformers' conventions.

`TextEncoder.encode(texts, batch_size, normalize_embeddings, convert_to_tensor)` behaves like
``SentenceTransformer.encode`` (length-sorted batches, mean pooling over the attention mask, optional L2
normalisation), and `save` writes the files sentence-transformers needs (modules.json, 1_Pooling,
sentence_bert_config.json) so a saved student loads with ``SentenceTransformer(path)`` too.

Mean pooling is what Sentence-BERT (Reimers & Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese
BERT-Networks", arXiv 1908.10084) and all-MiniLM-L6-v2 use: the average of the token states under the
attention mask.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from lmdistill.errors import ConfigError
from lmdistill.models.modes import eval_mode

Pooling = Literal["mean", "cls"]


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where ``attention_mask`` is 1 (padding excluded)."""
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    return (token_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def read_sentence_transformers_setup(path: Path) -> tuple[Pooling | None, bool | None, int | None]:
    """(pooling, normalize, max_seq_length) from a sentence-transformers directory; None where absent."""
    pooling: Pooling | None = None
    normalize: bool | None = None
    max_len: int | None = None
    modules = path / "modules.json"
    if modules.is_file():
        entries = json.loads(modules.read_text())
        normalize = any(str(e.get("type", "")).endswith("Normalize") for e in entries)
        for e in entries:
            if str(e.get("type", "")).endswith("Pooling"):
                cfg_file = path / e.get("path", "") / "config.json"
                if cfg_file.is_file():
                    cfg = json.loads(cfg_file.read_text())
                    if cfg.get("pooling_mode_cls_token"):
                        pooling = "cls"
                    elif cfg.get("pooling_mode_mean_tokens") or cfg.get("pooling_mode") == "mean":
                        pooling = "mean"
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file():
        max_len = json.loads(sbert.read_text()).get("max_seq_length")
    return pooling, normalize, max_len


class TextEncoder(nn.Module):
    """A transformer encoder with pooling; `embed` keeps gradients (training), `encode` does not."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        pooling: Pooling = "mean",
        normalize: bool = True,
        max_seq_length: int = 128,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"unknown pooling '{pooling}'; allowed: mean, cls")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling: Pooling = pooling
        self.normalize = normalize
        self.max_seq_length = max_seq_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        num_layers: int | None = None,
        pooling: Pooling | None = None,
        normalize: bool | None = None,
        max_seq_length: int | None = None,
    ) -> TextEncoder:
        """Load an encoder directory; ``num_layers`` keeps only the first N layers (a smaller student)."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"encoder path '{path}' does not exist")
        st_pooling, st_normalize, st_max = read_sentence_transformers_setup(path)
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        if num_layers is not None:
            total = getattr(config, "num_hidden_layers", None)
            if total is not None and num_layers > total:
                raise ConfigError(f"num_layers={num_layers} but '{path}' has only {total} layers")
            config.num_hidden_layers = num_layers
        # Dropping layers leaves their weights unused: transformers would warn about each one.
        level = logging.getLogger("transformers.modeling_utils").level
        logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
        try:
            model = AutoModel.from_pretrained(str(path), config=config, local_files_only=True)
        finally:
            logging.getLogger("transformers.modeling_utils").setLevel(level)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(
            model,
            tokenizer,
            pooling=pooling or st_pooling or "mean",
            normalize=normalize if normalize is not None else (st_normalize if st_normalize is not None else True),
            max_seq_length=max_seq_length or st_max or 128,
        )

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def token_states(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**features).last_hidden_state

    def pool(self, token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return token_states[:, 0]
        return mean_pool(token_states, attention_mask)

    def embed(self, texts: Sequence[str], *, normalize: bool | None = None) -> torch.Tensor:
        """Sentence embeddings with gradients (for training)."""
        features = self.tokenize(texts)
        pooled = self.pool(self.token_states(features), features["attention_mask"])
        return F.normalize(pooled, dim=-1) if (self.normalize if normalize is None else normalize) else pooled

    def encode(
        self,
        texts: Sequence[str] | str,
        batch_size: int = 32,
        normalize_embeddings: bool | None = None,
        convert_to_tensor: bool = False,
        show_progress_bar: bool = False,
    ) -> np.ndarray | torch.Tensor:
        """Inference embeddings, sentence-transformers style: longest texts batched together, input order kept."""
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        order = np.argsort([-len(t) for t in items], kind="stable")
        chunks: list[torch.Tensor] = []
        with eval_mode(self), torch.inference_mode():
            for start in range(0, len(items), batch_size):
                batch = [items[i] for i in order[start : start + batch_size]]
                chunks.append(self.embed(batch, normalize=normalize_embeddings).float().cpu())
        out = torch.cat(chunks) if chunks else torch.zeros(0, self.dim)
        restored = torch.empty_like(out)
        restored[torch.as_tensor(order, dtype=torch.long)] = out
        if single:
            restored = restored[0]
        return restored if convert_to_tensor else restored.numpy()

    def save(self, path: str | Path) -> None:
        """save_pretrained + tokenizer + the sentence-transformers module files."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (path / "2_Normalize").mkdir(exist_ok=True)
        (path / "modules.json").write_text(json.dumps(modules, indent=2))
        (path / "1_Pooling").mkdir(exist_ok=True)
        (path / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {
                    "word_embedding_dimension": self.dim,
                    "pooling_mode_cls_token": self.pooling == "cls",
                    "pooling_mode_mean_tokens": self.pooling == "mean",
                    "pooling_mode_max_tokens": False,
                    "pooling_mode_mean_sqrt_len_tokens": False,
                },
                indent=2,
            )
        )
        (path / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.max_seq_length, "do_lower_case": False}, indent=2)
        )
