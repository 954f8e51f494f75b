"""A decoder-only LM read as a text encoder through LoRA, for flipped knowledge distillation.

Li et al., "Flipping Knowledge Distillation: Leveraging Small Models' Expertise to Enhance LLMs in Text
Matching", arXiv 2507.05617: the LLM learns from a small encoder's similarity scores. The LLM is
reinterpreted as an encoder-decoder through LoRA: in W + B·A, the down-projection A compresses the hidden
state into an r-dimensional code (the *encoder*) and B maps it back into the model (the *decoder*). The
text representation is the A-output, pooled over the tokens, so its dimension is the LoRA rank.

Which A (our choice; the paper's abstract does not say): by default the last linear module whose input is
the hidden state of the last block (GPT-2: ``mlp.c_fc``, which reads ln_2 of the residual stream; Llama:
``mlp.up_proj``); ``representation_module`` picks another one. With our small KJV LM a low block reads
better (see configs/embed/flipped_kd.yaml). The forward pass stops at the representation module, so the
blocks above it cost nothing.

Which adapters (``target_modules="auto"``, the default): only modules that can change the representation,
i.e. the representation module (its A alone: its B acts after the code is taken and is frozen) and every
linear module whose output reaches the representation module's input. They are found once, structurally,
by autograd on a probe forward pass, so this holds for any architecture (in Llama, the representation
block's ``gate_proj`` runs before ``up_proj`` but does not feed it, and gets no adapter). Adapters anywhere
else would stay at their initial values: dead parameters that only cost optimizer state. Only LoRA
parameters train; the base LM stays frozen.
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
from lmdistill.models.modes import eval_mode


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


def _is_linear(module: nn.Module) -> bool:
    # GPT-2 uses transformers' Conv1D (a transposed Linear); peft adapts both.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def _hidden_size(lm: nn.Module) -> int | None:
    return getattr(lm.config, "hidden_size", None) or getattr(lm.config, "n_embd", None)


def _candidate_modules(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear modules of the causal LM that LoRA may adapt, in definition order (the LM head excluded:
    it reads the final hidden state, which the representation never reaches)."""
    head = lm.get_output_embeddings()
    return [(n, m) for n, m in lm.named_modules() if _is_linear(m) and m is not head]


def resolve_representation_module(lm: nn.Module, wanted: str | None) -> str:
    """Full name (in the plain causal LM) of the module whose LoRA-A code is the representation.

    ``wanted`` may be a full name or a suffix such as ``h.1.mlp.c_fc``; None picks the last module that
    reads the hidden state (the last block's MLP input projection in GPT-2 and Llama).
    """
    modules = _candidate_modules(lm)
    if wanted is not None:
        hits = [n for n, _ in modules if n == wanted or n.endswith("." + wanted)]
        if not hits:
            raise ConfigError(
                f"lm.representation_module '{wanted}' is not a linear module of the LM; "
                f"linear modules: {', '.join(n for n, _ in modules[-8:])} ..."
            )
        return hits[-1]
    hidden = _hidden_size(lm)
    reading_hidden = [n for n, m in modules if _in_features(m) == hidden]
    if not reading_hidden:
        raise ConfigError("no linear module reads the hidden state; set lm.representation_module explicitly")
    return reading_hidden[-1]


def modules_feeding(lm: nn.Module, tokenizer, representation: str) -> list[str]:
    """Names of the linear modules whose output reaches ``representation``'s input, in definition order.

    Structural, not numerical: every candidate's output gets a zero-valued probe added (the values do not
    change), the forward pass stops at ``representation``, and autograd reports which probes its input
    depends on (an unconnected probe has no gradient at all, not a zero one).
    """
    named = dict(_candidate_modules(lm))
    target = named[representation]
    probes: dict[str, torch.Tensor] = {}
    handles = []

    def add_probe(name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            probes[name] = torch.zeros((), dtype=output.dtype, requires_grad=True)
            return output + probes[name]

        return hook

    captured: dict[str, torch.Tensor] = {}

    def stop(_module: nn.Module, inputs: tuple) -> None:
        captured["x"] = inputs[0]
        raise _RepresentationReady

    for name, module in named.items():
        if module is not target:
            handles.append(module.register_forward_hook(add_probe(name)))
    handles.append(target.register_forward_pre_hook(stop))
    feats = tokenizer(["a probe sentence"], return_tensors="pt")
    try:
        with eval_mode(lm), torch.enable_grad():
            try:
                lm.base_model(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"])
            except _RepresentationReady:
                pass
    finally:
        for h in handles:
            h.remove()
    if "x" not in captured:
        raise RuntimeError(f"the representation module {representation} did not run in a forward pass")
    names = list(probes)
    if not names:
        return []
    grads = torch.autograd.grad(captured["x"].sum(), [probes[n] for n in names], allow_unused=True)
    return [n for n, g in zip(names, grads) if g is not None]


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
        order = np.argsort([-len(t) for t in texts], kind="stable")
        rows: list[torch.Tensor] = []
        with eval_mode(self), torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows.append(self.embed([texts[i] for i in order[start : start + batch_size]]).float())
        out = torch.cat(rows)
        restored = torch.empty_like(out)
        restored[torch.as_tensor(order, dtype=torch.long)] = out
        return restored.numpy()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.lm.parameters()}.values())


class LoraLMEncoder(CausalLMEncoder):
    """The flipped-KD student: base LM frozen, LoRA adapters trainable, representation = pooled LoRA-A code.

    ``target_modules``: ``"auto"`` adapts exactly the modules that can change the representation (see the
    module docstring); a peft value (a list of names, ``"all-linear"``) is used as given, with a warning
    naming adapters that cannot affect the representation. Either way the representation module's B is
    frozen: it only acts after the code is taken.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        r: int = 32,
        alpha: float = 64.0,
        dropout: float = 0.0,
        target_modules: list[str] | str = "auto",
        representation_module: str | None = None,
        pooling: str = "mean",
        max_seq_length: int = 96,
        adapter_path: str | Path | None = None,
    ) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        super().__init__(path, pooling=pooling, max_seq_length=max_seq_length)
        rep_base = resolve_representation_module(self.lm, representation_module)
        with warnings.catch_warnings():
            # GPT-2's Conv1D layers make peft warn that it switches fan_in_fan_out on: expected.
            warnings.simplefilter("ignore", UserWarning)
            if adapter_path is not None:
                self.lm = PeftModel.from_pretrained(self.lm, str(adapter_path), is_trainable=True)
            else:
                feeding = modules_feeding(self.lm, self.tokenizer, rep_base)
                if target_modules == "auto":
                    targets: list[str] | str = [*feeding, rep_base]
                else:
                    targets = target_modules
                config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
                self.lm = get_peft_model(self.lm, config)
        self.r = r
        self.representation_name, self._rep_layer = self._find_representation(rep_base)
        for p in self._rep_layer.lora_B.parameters():
            p.requires_grad_(False)
        if adapter_path is None and target_modules != "auto":
            self._warn_unused_adapters(set(feeding) | {rep_base})
        self._captured: torch.Tensor | None = None
        # Mean of the hidden state the representation module reads (see `fit_center`); None = not centred.
        self.register_buffer("center", None, persistent=False)
        self._rep_layer.lora_A["default"].register_forward_hook(self._capture)

    def _lora_layers(self) -> list[tuple[str, nn.Module]]:
        from peft.tuners.lora import LoraLayer

        return [(n, m) for n, m in self.lm.named_modules() if isinstance(m, LoraLayer)]

    def _find_representation(self, base_name: str) -> tuple[str, nn.Module]:
        hits = [(n, m) for n, m in self._lora_layers() if n == base_name or n.endswith("." + base_name)]
        if not hits:
            raise ConfigError(
                f"the representation module '{base_name}' has no LoRA adapter: add it to lm.target_modules "
                "(or use target_modules: auto)"
            )
        return hits[-1]

    def _warn_unused_adapters(self, useful: set[str]) -> None:
        unused = [n for n, _ in self._lora_layers() if not any(n == u or n.endswith("." + u) for u in useful)]
        if unused:
            warnings.warn(
                f"{len(unused)} LoRA adapters cannot change the representation ({self.representation_name}) and "
                f"will not train, e.g. {', '.join(unused[:3])}; lm.target_modules: auto adapts only the useful ones",
                UserWarning,
                stacklevel=3,
            )

    def _capture(self, module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        # A(h - mu) = A h - A mu: the code of the centred hidden state, with A's gradient intact.
        self._captured = output if self.center is None else output - F.linear(self.center.to(output.dtype), module.weight)
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

    @torch.no_grad()
    def fit_center(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Estimate mu, the mean over the tokens of ``texts`` of the hidden state that A reads, and centre
        the representation on it from now on: code = A(h - mu).

        Why: a causal LM's hidden states share a large common component. With the KJV demo LM read at block
        0 (rank 256, random A), GCIDE documents' codes had a mean pairwise cosine of 0.88 uncentred and 0.00
        centred, while the teacher's similarities of unrelated texts are near 0; centring took recall@10
        after training from 0.152 to 0.169 (configs/embed/flipped_kd.yaml). mu is a
        fixed buffer (saved with the adapter), not a trained parameter: the LoRA adapters stay the only
        trainable parameters.
        """
        self.center = None
        captured: list[torch.Tensor] = []
        handle = self._rep_layer.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
        total, count = None, 0
        with eval_mode(self):
            try:
                for start in range(0, len(texts), batch_size):
                    feats = self.tokenize(texts[start : start + batch_size])
                    captured.clear()
                    try:
                        self._body()(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"])
                    except _RepresentationReady:
                        pass
                    mask = feats["attention_mask"].bool()
                    tokens = captured[0][mask].double()
                    total = tokens.sum(0) if total is None else total + tokens.sum(0)
                    count += tokens.shape[0]
            finally:
                handle.remove()
        if total is None:
            raise ValueError("fit_center needs at least one text")
        self.center = (total / count).float()
        return self.center

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.lm.named_parameters() if p.requires_grad]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(path / "adapter"))
        if self.center is not None:
            torch.save(self.center.detach().cpu(), path / "center.pt")
        (path / "lora_encoder.json").write_text(
            json.dumps(
                {
                    "base_path": str(Path(self.path).resolve()),
                    "representation_module": self.representation_name,
                    "pooling": self.pooling,
                    "max_seq_length": self.max_seq_length,
                    "r": self.r,
                    "centered": self.center is not None,
                },
                indent=2,
            )
        )

    @classmethod
    def load(cls, path: str | Path) -> LoraLMEncoder:
        path = Path(path)
        meta = json.loads((path / "lora_encoder.json").read_text())
        rep = meta["representation_module"].split("base_model.model.", 1)[-1]
        encoder = cls(
            meta["base_path"],
            r=meta["r"],
            representation_module=rep,
            pooling=meta["pooling"],
            max_seq_length=meta["max_seq_length"],
            adapter_path=path / "adapter",
        )
        if meta.get("centered", False):
            encoder.center = torch.load(path / "center.pt", weights_only=True)
        return encoder
