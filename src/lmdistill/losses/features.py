"""Representation objectives: distillation through both models' hidden states, combinable with logit objectives
in a ``mix`` (e.g. ``{mix: [{name: forward_kl}, {name: hidden_states, weight: 0.5}]}``).

They read the ``output_hidden_states`` tuples of student and teacher (:meth:`Objective.state_per_token`), not the
logits (``reads_logits`` False); their learned parts (projections from the student's width to the teacher's,
running class means) are sized from the run's models (:meth:`Objective.bind_models`), trained beside the student
and saved in checkpoints as tensors, so a resumed run continues exactly. The formulas live in
:mod:`lmdistill.losses.representation`; per-token values are 0 where the label is ignored and go through the
trainer's one reduction with the logit part.

Across tokenizers the teacher's states come as :class:`~lmdistill.losses.representation.AlignedStates` (its own
tokens and the alignment): every objective here then compares both models at the aligned span ends, per sequence
in text order (after a span both have read the same text), and puts each span's value on the student row of its
last token, the row whose state was compared (:class:`_Paired`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lmdistill.constants import IGNORE_INDEX
from lmdistill.errors import ConfigError
from lmdistill.losses.core import Objective
from lmdistill.losses.pairing import ModelPair
from lmdistill.losses.representation import (
    AlignedStates,
    ClassMeans,
    HiddenProjection,
    HiddenStateKD,
    attention_relation_kd,
    knn_bandwidth,
    knn_gaussian_graph,
    nd_loss,
    relation_heads,
    resolve_layer_map,
    span_sequences,
    trg_global_loss,
    trg_inner_loss,
    trg_local_loss,
)
from lmdistill.losses.signals import SIGNAL_KINDS

__all__ = ["HiddenStateObjective", "TokenRelationObjective", "NormDirectionObjective", "AttentionRelationObjective"]

# every signal kind: these objectives read hidden states, which the teacher gives beside its signal (across
# tokenizers too, with the alignment); a teacher without states (a cache) is refused by its serves_states
_ANY_SIGNAL = frozenset(SIGNAL_KINDS)


def _check_layers(layers: Any) -> Any:
    if isinstance(layers, str) and layers not in ("uniform", "last"):
        raise ValueError(f"layers must be 'uniform', 'last' or a list, got {layers!r}")
    return list(layers) if isinstance(layers, (list, tuple)) else layers


class _Pooled(Sequence):
    """One model's hidden states read at given flat positions ``[B, G]`` (zero where ``mask`` is False), one layer
    at a time, as a sequence indexable like the ``output_hidden_states`` tuple."""

    def __init__(self, states: Sequence[Tensor], index: Tensor, mask: Tensor) -> None:
        self.states, self.index, self.mask = states, index, mask

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        x = self.states[i]
        pooled = x.reshape(-1, x.shape[-1])[self.index.to(x.device)]
        return torch.where(self.mask.to(x.device).unsqueeze(-1), pooled, torch.zeros((), dtype=x.dtype, device=x.device))


class _Paired:
    """Both models' states as the objectives compare them, ``[B, G, d]`` per layer with a mask and labels
    ``[B, G]``: token by token with one tokenizer (``G = L``, unchanged), or at the aligned span ends of each
    sequence when the teacher's states are :class:`AlignedStates`; :meth:`place` puts ``[B, G]`` values back on
    the student's ``[B * L]`` rows (a span's on the row of its last token, 0 elsewhere)."""

    def __init__(self, student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], labels: Tensor) -> None:
        b, length = student_states[0].shape[:2]
        device = student_states[0].device
        self.dtype = torch.promote_types(student_states[0].dtype, teacher_states[0].dtype)
        flat = labels.reshape(-1).to(device)
        self.rows = b * length
        self.index: Tensor | None = None
        if isinstance(teacher_states, AlignedStates):
            self.index, t_index, mask = span_sequences(teacher_states.alignment, device)
            self.labels = flat[self.index]
            self.mask = mask & (self.labels != IGNORE_INDEX)
            self.student: Sequence[Tensor] = _Pooled(student_states, self.index, self.mask)
            self.teacher: Sequence[Tensor] = _Pooled(teacher_states, t_index, self.mask)
        else:
            self.labels = flat.reshape(b, length)
            self.mask = self.labels != IGNORE_INDEX
            self.student, self.teacher = student_states, teacher_states

    def place(self, values: Tensor) -> Tensor:
        if self.index is None:
            return values.reshape(-1)
        out = values.new_zeros(self.rows)
        return out.index_put((self.index[self.mask],), values.reshape(self.mask.shape)[self.mask])


class _StateObjective(Objective):
    reads_logits = False
    uses_states = True
    accepted_signals = _ANY_SIGNAL

    def _bound(self, what: Any) -> Any:
        if what is None:
            raise ValueError(f"objective '{self.name}' is not sized yet: bind the run's models first (bind_models)")
        return what

    def per_token(self, student_logits: Tensor, teacher: Any, labels: Tensor | None, *, context: Any = None) -> Tensor:
        raise ValueError(f"objective '{self.name}' reads hidden states (state_per_token), not logits; the trainer "
                         "passes it both models' hidden states")


class HiddenStateObjective(_StateObjective):
    """Hidden-state KD over a layer map (``layers``: ``uniform``, ``last``, a list of teacher layers, one per student
    block, or ``[student, teacher]`` pairs), with a learned linear projection per mapped layer when the widths
    differ (FitNets, Romero et al., "FitNets: Hints for Thin Deep Nets", arXiv 1412.6550; TinyBERT's hidden-state
    loss, Jiao et al., arXiv 1909.10351). Per token: the mean over mapped layers of the MSE (``loss: mse``) or of
    ``1 - cos`` (``loss: cosine``) between the projected student state and the teacher's."""

    name = "hidden_states"

    def __init__(self, layers: Any = "uniform", loss: str = "mse") -> None:
        if loss not in ("mse", "cosine"):
            raise ValueError(f"loss must be 'mse' or 'cosine', got {loss!r}")
        self.layers = _check_layers(layers)
        self.loss = loss
        self.module: HiddenStateKD | None = None

    def bind_models(self, pair: ModelPair) -> None:
        try:
            self.module = HiddenStateKD(pair.student_layers, pair.teacher_layers, pair.student_width, pair.teacher_width,
                                        layers=self.layers, loss=self.loss, seed=pair.seed)
        except ConfigError as exc:
            raise ConfigError(f"objective hidden_states: {exc}") from None

    def state_per_token(self, student_states, teacher_states, labels: Tensor) -> Tensor:
        module = self._bound(self.module)
        view = _Paired(student_states, teacher_states, labels)
        return view.place(module(view.student, view.teacher, view.mask))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.module is None else list(self.module.parameters())

    def state_dict(self) -> dict:
        module = self._bound(self.module)
        return {"projection": {k: v.detach().clone() for k, v in module.projection.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self._bound(self.module).projection.load_state_dict(state["projection"])

    def config(self) -> dict:
        return {"name": self.name, "layers": self.layers, "loss": self.loss}


_TRG_TERMS = ("contextual", "local", "global")


def _trg_terms(terms: Any) -> dict[str, float]:
    if isinstance(terms, str):
        terms = [terms]
    if isinstance(terms, (list, tuple)):
        terms = {name: 1.0 for name in terms}
    if not isinstance(terms, dict) or not terms:
        raise ValueError(f"terms must be a list of {', '.join(_TRG_TERMS)} or a mapping of them to weights, got {terms!r}")
    out = {}
    for name, weight in terms.items():
        if name not in _TRG_TERMS:
            raise ValueError(f"terms: unknown TRG term {name!r}; allowed: {', '.join(_TRG_TERMS)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"terms.{name}: the weight must be a finite number >= 0, got {weight!r}")
        out[name] = float(weight)
    if not any(out.values()):
        raise ValueError("terms: at least one TRG term needs a weight > 0")
    return out


def _positive(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


class TokenRelationObjective(_StateObjective):
    """TRG (Zhang, Liu & He, "Knowledge Distillation via Token-level Relationship Graph", arXiv 2306.12442) on the
    mapped layers (``layers``, default the last of each model), its terms weighted by ``terms`` (a list, each
    weighing 1, or ``{contextual: a, local: b, global: c}``; default the contextual term alone):

    * ``contextual`` (inner-instance): per token, the mean squared difference of the two models' token-similarity
      rows ``softmax(F F^T / sqrt(d))`` within its sequence (:func:`~lmdistill.losses.representation.trg_inner_loss`).
    * ``local``: ``nodes`` tokens drawn at random from the batch's real tokens (the graph spans the sequences, as in
      the paper); each side's k-NN Gaussian graph ``A[i, j] = exp(-||x_i - x_j||^2 / (2 sigma))``
      (:func:`~lmdistill.losses.representation.knn_gaussian_graph`), per node ``KL(softmax A_S[i] || softmax
      A_T[i])`` (:func:`~lmdistill.losses.representation.trg_local_loss`). ``sigma: auto`` takes each side's mean
      squared k-NN distance (:func:`~lmdistill.losses.representation.knn_bandwidth`), or a number.
    * ``global``: per drawn node, InfoNCE between its projected student feature and every drawn teacher feature,
      ``-log softmax_j(cos(W s_i, t_j) / tau)[i]`` (:func:`~lmdistill.losses.representation.trg_global_loss`), with a
      learned projection ``W`` per mapped layer when the widths differ (trained with the student, checkpointed).
      The paper anneals ``tau`` from high to low: ``temperature: [start, end]`` moves linearly over the run's
      steps (a number keeps it fixed).

    The graph terms' per-node values stand on the drawn tokens' rows times ``N / M`` (``N`` real tokens in the
    micro-batch, ``M`` drawn), so the one reduction averages them over nodes. The draws come from the objective's
    own generator (seeded by the run), whose state is checkpointed with the annealing progress: a resumed run
    draws the same nodes. Widths may differ (local and contextual compare each side with itself). The defaults
    (``nodes`` 128, ``k`` 8, ``sigma: auto``, ``temperature: [1.0, 0.1]``) are this project's: the paper's full
    text was not available to take its values."""

    name = "trg"

    def __init__(self, layers: Any = "last", terms: Any = ("contextual",), nodes: int = 128, k: int = 8,
                 sigma: Any = "auto", temperature: Any = (1.0, 0.1)) -> None:
        self.layers = _check_layers(layers)
        self.terms = _trg_terms(terms)
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 2:
            raise ValueError(f"nodes must be an integer >= 2, got {nodes!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < nodes:
            raise ValueError(f"k must be an integer in [1, nodes - 1], got {k!r}")
        self.nodes, self.k = nodes, k
        self.sigma = sigma if sigma == "auto" else _positive(sigma, "sigma ('auto' or a number)")
        ends = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature, temperature]
        if len(ends) != 2:
            raise ValueError(f"temperature must be a number or [start, end], got {temperature!r}")
        self.temperature = [_positive(t, "temperature") for t in ends]
        self.progress = 0.0  # share of the run's steps done: anneals the global term's temperature
        self.pairs: list[tuple[int, int]] | None = None
        self.projection: HiddenProjection | None = None
        self.generator: torch.Generator | None = None

    @property
    def graph_terms(self) -> bool:
        return bool(self.terms.get("local") or self.terms.get("global"))

    def bind_models(self, pair: ModelPair) -> None:
        try:
            self.pairs = resolve_layer_map(self.layers, pair.student_layers, pair.teacher_layers)
        except ConfigError as exc:
            raise ConfigError(f"objective trg: {exc}") from None
        if self.terms.get("global"):
            self.projection = HiddenProjection(pair.student_width, pair.teacher_width, len(self.pairs), seed=pair.seed)
        self.generator = torch.Generator().manual_seed(pair.seed)

    def current_temperature(self) -> float:
        start, end = self.temperature
        return start + (end - start) * self.progress

    def on_step_end(self, loss: float, step: int, total_steps: int) -> None:
        self.progress = min(1.0, step / max(1, total_steps))

    def state_per_token(self, student_states, teacher_states, labels: Tensor) -> Tensor:
        pairs = self._bound(self.pairs)
        view = _Paired(student_states, teacher_states, labels)
        total = None
        weight = self.terms.get("contextual", 0.0)
        if weight:
            inner = sum(trg_inner_loss(view.student[s], view.teacher[t], view.mask) for s, t in pairs)
            total = inner * (weight / len(pairs))
        if self.graph_terms:
            graph = self._graph_losses(view, pairs)
            total = graph if total is None else total + graph.to(total.dtype)
        return view.place(total)

    def _graph_losses(self, view: _Paired, pairs: list[tuple[int, int]]) -> Tensor:
        """TRG's local and global terms per position ``[B, G]``: the drawn nodes' losses times ``N / M``, else 0."""
        generator = self._bound(self.generator)
        real = view.mask.reshape(-1).nonzero().squeeze(1)
        dtype = torch.float64 if view.dtype == torch.float64 else torch.float32
        out = torch.zeros(view.mask.numel(), dtype=dtype, device=view.mask.device)
        n = real.numel()
        drawn = min(self.nodes, n)
        if drawn < 2:  # no graph among fewer than two nodes
            return out.reshape(view.mask.shape)
        picked = real[torch.randperm(n, generator=generator)[:drawn].to(real.device)]
        k = min(self.k, drawn - 1)
        w_local, w_global = self.terms.get("local", 0.0), self.terms.get("global", 0.0)
        node = torch.zeros(drawn, dtype=dtype, device=out.device)
        for index, (s, t) in enumerate(pairs):
            student, teacher = view.student[s], view.teacher[t]
            xs = student.reshape(-1, student.shape[-1])[picked].to(dtype)
            xt = teacher.reshape(-1, teacher.shape[-1])[picked].detach().to(dtype)
            if w_local:
                sigma_s = knn_bandwidth(xs, k) if self.sigma == "auto" else self.sigma
                sigma_t = knn_bandwidth(xt, k) if self.sigma == "auto" else self.sigma
                node = node + w_local * trg_local_loss(knn_gaussian_graph(xs, k, sigma_s), knn_gaussian_graph(xt, k, sigma_t))
            if w_global:
                projected = self._bound(self.projection)(xs, index).to(dtype)
                node = node + w_global * trg_global_loss(projected, xt, self.current_temperature())
        node = node * (n / drawn / len(pairs))
        return out.index_put((picked,), node).reshape(view.mask.shape)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.projection is None else list(self.projection.parameters())

    def state_dict(self) -> dict:
        state: dict[str, Any] = {"progress": self.progress}
        if self.generator is not None:
            state["generator"] = self.generator.get_state().clone()
        if self.projection is not None:
            state["projection"] = {k: v.detach().clone() for k, v in self.projection.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.progress = float(state.get("progress", 0.0))
        if "generator" in state:
            self._bound(self.generator).set_state(state["generator"].to(torch.uint8).cpu())
        if "projection" in state:
            self._bound(self.projection).load_state_dict(state["projection"])

    def config(self) -> dict:
        spec: dict[str, Any] = {"name": self.name, "layers": self.layers, "terms": dict(self.terms)}
        if self.graph_terms:
            spec.update(nodes=self.nodes, k=self.k, sigma=self.sigma, temperature=list(self.temperature))
        return spec


class NormDirectionObjective(_StateObjective):
    """Feature norm and direction loss (Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm
    and Direction", arXiv 2305.17007) on the final hidden states, the next token as the class
    (:func:`~lmdistill.losses.representation.nd_loss`), with a learned projection when the widths differ.

    The class centres are the teacher's mean final features per next token, accumulated over the training batches
    seen so far (the paper computes them over the training set beforehand; here they sharpen as training goes, and
    a token not seen yet gives no loss). They are part of the objective's checkpointed state; their memory is
    ``vocabulary x teacher width`` float64 numbers. Across tokenizers the class of a span's pooled states is the
    student's next token after it."""

    name = "nd"

    def __init__(self) -> None:
        self.projection: HiddenProjection | None = None
        self.means: ClassMeans | None = None

    def bind_models(self, pair: ModelPair) -> None:
        self.projection = HiddenProjection(pair.student_width, pair.teacher_width, 1, seed=pair.seed)
        self.means = ClassMeans(pair.student_vocab, pair.teacher_width)

    def state_per_token(self, student_states, teacher_states, labels: Tensor) -> Tensor:
        projection, means = self._bound(self.projection), self._bound(self.means)
        view = _Paired(student_states, teacher_states, labels)
        student = view.student[-1].reshape(-1, view.student[-1].shape[-1])
        teacher = view.teacher[-1].reshape(-1, view.teacher[-1].shape[-1]).detach()
        flat = torch.where(view.mask, view.labels, IGNORE_INDEX).reshape(-1)
        means.update(teacher, flat)
        return view.place(nd_loss(projection(student), teacher, means.means(), flat))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [] if self.projection is None else list(self.projection.parameters())

    def state_dict(self) -> dict:
        projection, means = self._bound(self.projection), self._bound(self.means)
        return {"projection": {k: v.detach().clone() for k, v in projection.state_dict().items()},
                "means": means.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._bound(self.projection).load_state_dict(state["projection"])
        self._bound(self.means).load_state_dict(state["means"])


class AttentionRelationObjective(_StateObjective):
    """MiniLMv2's self-attention relation distillation (Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation
    Distillation for Compressing Pretrained Transformers", arXiv 2012.15828) on the mapped layers: each side's
    vectors ``[B, L, d]`` split into ``heads`` relation heads of ``d / heads``, per head ``R = softmax(A A^T /
    sqrt(d / heads))`` over the tokens up to each one (causal), and per token the mean over relation heads of
    ``KL(R_T[t] || R_S[t])`` (:func:`~lmdistill.losses.representation.attention_relation_kd`), averaged over the
    mapped layers. Widths may differ: only the relation-head count is shared (``heads: auto``, the default, takes
    the largest count up to 64 dividing both widths; the paper uses 48 for base-size and 64 for large-size
    teachers). The paper distils the student's last layer from the teacher's last layer (base-size teachers) or an
    upper-middle one (large-size teachers, e.g. layer 21 of BERT-large's 24): ``layers: last`` (the default) or
    ``layers: [[student, teacher]]``.

    What is related. The paper relates the queries, keys and values of the chosen attention layer (Q-Q, K-K and V-V
    relations, summed). The trainer hands objectives the ``output_hidden_states`` of both models, and projections
    read inside the attention modules would need forward hooks with one layout per family (fused ``c_attn`` in
    GPT-2, ``query_key_value`` interleaved per head in GPT-NeoX, ``qkv_proj`` in Phi-3, grouped keys and values and
    q/k norms elsewhere), replay under gradient checkpointing, and the aligned teacher's forward across tokenizers.
    So this objective relates the mapped layers' hidden states themselves, split into relation heads (the
    self-relation of the residual stream, as some reimplementations do): the three relations of the paper become
    one, and it works alike for every family, with LoRA, gradient checkpointing and across tokenizers (span-pooled
    states). :func:`~lmdistill.losses.representation.qkv_capture` gives the paper's Q/K/V for GPT-2 and Llama
    layouts outside the trainer. Memory: ``B x heads x L x L`` relation scores per side and mapped layer."""

    name = "attention_relations"

    def __init__(self, layers: Any = "last", heads: Any = "auto") -> None:
        if heads != "auto" and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
            raise ValueError(f"heads must be a positive integer or 'auto', got {heads!r}")
        self.layers = _check_layers(layers)
        self.heads = heads
        self.pairs: list[tuple[int, int]] | None = None
        self.relation_heads: int | None = None

    def bind_models(self, pair: ModelPair) -> None:
        try:
            self.pairs = resolve_layer_map(self.layers, pair.student_layers, pair.teacher_layers)
            self.relation_heads = relation_heads(self.heads, pair.student_width, pair.teacher_width)
        except ConfigError as exc:
            raise ConfigError(f"objective attention_relations: {exc}") from None

    def state_per_token(self, student_states, teacher_states, labels: Tensor) -> Tensor:
        pairs, heads = self._bound(self.pairs), self._bound(self.relation_heads)
        view = _Paired(student_states, teacher_states, labels)
        total = sum(attention_relation_kd([view.student[s]], [view.teacher[t]], heads, view.mask) for s, t in pairs)
        return view.place(total / len(pairs))

    def config(self) -> dict:
        return {"name": self.name, "layers": self.layers, "heads": self.heads}
