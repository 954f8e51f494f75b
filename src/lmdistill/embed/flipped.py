"""A decoder-only LM read as a text encoder through LoRA, for flipped knowledge distillation.

Li et al., "Flipping Knowledge Distillation: Leveraging Small Models' Expertise to Enhance LLMs in Text
Matching", arXiv 2507.05617: the LLM learns from a small encoder's similarity scores. The LLM is
reinterpreted as an encoder-decoder through LoRA: in W + B·A, the down-projection A compresses the hidden
state into an r-dimensional code (the *encoder*) and B maps it back into the model (the *decoder*). The
text representation is the A-output, pooled over the tokens, so its dimension is the LoRA rank.

Which A (our choice; the paper's abstract does not say): by default the last LoRA-wrapped module whose
input is the hidden state of the last block (GPT-2: ``mlp.c_fc``, which reads ln_2 of the residual
stream; Llama: ``mlp.up_proj``); ``representation_module`` picks another one. With our small KJV LM a low
block reads better: on GCIDE, 60 steps with the last block's A stayed at the LM's zero-shot level, while
block 1's A learned (see configs/embed/flipped_kd.yaml). The forward pass stops at the representation
module, so the blocks above it cost nothing. Only LoRA parameters train; the base LM stays frozen.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.embed.encoder import mean_pool
from lmdistill.errors import ConfigError


class _RepresentationReady(Exception):
    """Raised by the capture hook to end the forward pass once the representation exists."""


def _load_lm(path: str | Path):
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"LM path '{path}' is not a directory (expected save_pretrained output with a tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a causal LM and its tokenizer from '{path}': {exc}") from exc
    if tokenizer.pad_token_id is None:
        # Decoder tokenizers often lack a pad token; padding is masked out of the pooling anyway.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.convert_ids_to_tokens(0)
    tokenizer.padding_side = "right"
    return model, tokenizer


def _pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "last":
        last = mask.sum(1).long() - 1  # right padding: the last real token
        return states[torch.arange(states.shape[0], device=states.device), last]
    return mean_pool(states, mask)


class CausalLMEncoder(nn.Module):
    """Zero-shot reading of a causal LM as an encoder: pooled last hidden states (no training)."""

    def __init__(self, path: str | Path, *, pooling: str = "mean", max_seq_length: int = 96) -> None:
        super().__init__()
        self.lm, self.tokenizer = _load_lm(path)
        self.path = str(path)
        self.pooling = pooling
        self.max_seq_length = max_seq_length

    def _body(self) -> nn.Module:
        return self.lm.base_model  # the transformer without the LM head: the head is not needed

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt")
        )

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        feats = self.tokenize(texts)
        states = self._body()(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"]).last_hidden_state
        return F.normalize(_pool(states, feats["attention_mask"], self.pooling), dim=-1)

    def encode(self, texts: Sequence[str], batch_size: int = 32, **_: object) -> np.ndarray:
        was = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        rows: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows.append(self.embed([texts[i] for i in order[start : start + batch_size]]).float())
        self.train(was)
        out = torch.cat(rows)
        restored = torch.empty_like(out)
        restored[torch.as_tensor(order, dtype=torch.long)] = out
        return restored.numpy()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.lm.parameters()}.values())


class LoraLMEncoder(CausalLMEncoder):
    """The flipped-KD student: base LM frozen, LoRA adapters trainable, representation = pooled LoRA-A code."""

    def __init__(
        self,
        path: str | Path,
        *,
        r: int = 32,
        alpha: float = 64.0,
        dropout: float = 0.0,
        target_modules: list[str] | str = "all-linear",
        representation_module: str | None = None,
        pooling: str = "mean",
        max_seq_length: int = 96,
        adapter_path: str | Path | None = None,
    ) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        super().__init__(path, pooling=pooling, max_seq_length=max_seq_length)
        with warnings.catch_warnings():
            # GPT-2's Conv1D layers make peft warn that it switches fan_in_fan_out on: expected.
            warnings.simplefilter("ignore", UserWarning)
            if adapter_path is not None:
                self.lm = PeftModel.from_pretrained(self.lm, str(adapter_path), is_trainable=True)
            else:
                config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
                self.lm = get_peft_model(self.lm, config)
        self.r = r
        self.representation_name, self._rep_layer = self._find_representation(representation_module)
        self._captured: torch.Tensor | None = None
        self._rep_layer.lora_A["default"].register_forward_hook(self._capture)

    def _find_representation(self, wanted: str | None) -> tuple[str, nn.Module]:
        from peft.tuners.lora import LoraLayer

        hidden = getattr(self.lm.config, "hidden_size", None) or getattr(self.lm.config, "n_embd", None)
        layers = [(n, m) for n, m in self.lm.named_modules() if isinstance(m, LoraLayer)]
        if wanted is not None:
            hits = [(n, m) for n, m in layers if n == wanted or n.endswith("." + wanted)]
            if not hits:
                raise ConfigError(
                    f"lm.representation_module '{wanted}' is not a LoRA-wrapped module; "
                    f"LoRA modules: {', '.join(n for n, _ in layers[-8:])} ..."
                )
            return hits[-1]
        reading_hidden = [(n, m) for n, m in layers if getattr(m, "in_features", None) == hidden]
        if not reading_hidden:
            raise ConfigError("no LoRA module reads the hidden state; set lm.representation_module explicitly")
        return reading_hidden[-1]

    def _capture(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self._captured = output
        # Later layers cannot change the representation: stop the forward pass here (with a lower
        # representation_module this skips most of the network; the autograd graph up to here is kept).
        raise _RepresentationReady

    def _body(self) -> nn.Module:
        # PeftModel -> LoraModel -> the HF causal LM -> its transformer body (LoRA layers are inside it).
        return self.lm.base_model.model.base_model

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        feats = self.tokenize(texts)
        self._captured = None
        try:
            self._body()(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"])
        except _RepresentationReady:
            pass
        if self._captured is None:
            raise RuntimeError(f"the representation module {self.representation_name} did not run")
        code, self._captured = self._captured, None
        return F.normalize(_pool(code, feats["attention_mask"], self.pooling), dim=-1)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.lm.named_parameters() if p.requires_grad]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(path / "adapter"))
        (path / "lora_encoder.json").write_text(
            json.dumps(
                {
                    "base_path": str(Path(self.path).resolve()),
                    "representation_module": self.representation_name,
                    "pooling": self.pooling,
                    "max_seq_length": self.max_seq_length,
                    "r": self.r,
                },
                indent=2,
            )
        )

    @classmethod
    def load(cls, path: str | Path) -> LoraLMEncoder:
        path = Path(path)
        meta = json.loads((path / "lora_encoder.json").read_text())
        rep = meta["representation_module"].split("base_model.model.", 1)[-1]
        return cls(
            meta["base_path"],
            r=meta["r"],
            representation_module=rep,
            pooling=meta["pooling"],
            max_seq_length=meta["max_seq_length"],
            adapter_path=path / "adapter",
        )
