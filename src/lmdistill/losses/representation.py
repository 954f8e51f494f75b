"""Representation distillation: hidden states, feature norm and direction, token relationship graphs, and
self-attention relations, as pure functions on tensors (per-token or per-node values) plus the small learned
modules they need.

Conventions. ``hidden_states`` follow Hugging Face's ``output_hidden_states``: index 0 is the embeddings, index i
the output of block i. Features are ``[B, L, d]`` (or flattened ``[N, d]``); a ``mask`` (``[B, L]`` bool) marks
real tokens. Per-token results are 0 at masked positions, so they add to a logit objective's per-token loss
before the project's one reduction. Across tokenizers, :func:`span_features` pools each side's hidden states at
the aligned spans of :class:`~lmdistill.losses.alignment.AlignedBatch` (the state after a span's last token has
read the same text on both sides), and every function here applies to the pooled pairs; :func:`span_sequences`
keeps them per sequence in text order, for the relations within a sequence. A teacher with another tokenizer
hands its states over as :class:`AlignedStates` (the tuple and the alignment).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lmdistill.errors import ConfigError
from lmdistill.losses.alignment import AlignedBatch

__all__ = [
    "resolve_layer_map",
    "HiddenProjection",
    "hidden_mse",
    "hidden_cosine",
    "HiddenStateKD",
    "nd_loss",
    "ClassMeans",
    "knn_gaussian_graph",
    "trg_local_loss",
    "trg_global_loss",
    "trg_inner_loss",
    "attention_relations",
    "attention_relation_kd",
    "qkv_capture",
    "span_features",
    "AlignedStates",
    "span_sequences",
    "knn_bandwidth",
    "relation_heads",
]


# --------------------------------------------------------------------------------------------- layer maps
def resolve_layer_map(spec: str | Sequence, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``(student index, teacher index)`` pairs into the two ``hidden_states`` tuples.

    ``"uniform"``: student block i (1..S) with teacher block ``round(i * T / S)`` (the last with the last);
    ``"last"``: the final blocks only; a list of ``[student, teacher]`` pairs; or a list of S teacher indices, one
    per student block. Indices may be 0 (embeddings) up to the number of blocks.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ConfigError(f"layer map: both models need at least one block (student {student_layers}, teacher {teacher_layers})")
    if spec == "uniform":
        return [(i, max(1, round(i * teacher_layers / student_layers))) for i in range(1, student_layers + 1)]
    if spec == "last":
        return [(student_layers, teacher_layers)]
    if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
        raise ConfigError(f"layers must be 'uniform', 'last', a list of [student, teacher] pairs or a list of "
                          f"{student_layers} teacher layers; got {spec!r}")
    if all(isinstance(x, int) for x in spec):
        if len(spec) != student_layers:
            raise ConfigError(f"layers: a list of teacher layers needs one per student block ({student_layers}), got {len(spec)}")
        pairs = [(i + 1, int(t)) for i, t in enumerate(spec)]
    else:
        pairs = []
        for item in spec:
            if not (isinstance(item, Sequence) and len(item) == 2 and all(isinstance(x, int) for x in item)):
                raise ConfigError(f"layers: each pair must be [student_layer, teacher_layer] integers, got {item!r}")
            pairs.append((int(item[0]), int(item[1])))
    for s, t in pairs:
        if not (0 <= s <= student_layers and 0 <= t <= teacher_layers):
            raise ConfigError(f"layers: pair [{s}, {t}] is out of range (student 0..{student_layers}, teacher 0..{teacher_layers})")
    return pairs


class HiddenProjection(nn.Module):
    """Learned linear maps from the student's width to the teacher's, one per mapped layer (FitNets' regressor,
    Romero et al., arXiv 1412.6550; TinyBERT's ``W_h``, arXiv 1909.10351). With equal widths and
    ``identity_if_equal`` there are no parameters. The weights live in :meth:`state_dict`; :meth:`save` and
    :meth:`load` write and read them as safetensors, so a checkpoint resumes them exactly."""

    def __init__(self, student_width: int, teacher_width: int, num_maps: int = 1, *, bias: bool = False,
                 identity_if_equal: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.student_width, self.teacher_width = int(student_width), int(teacher_width)
        self.identity = identity_if_equal and self.student_width == self.teacher_width
        generator = torch.Generator().manual_seed(seed)
        self.maps = nn.ModuleList()
        if not self.identity:
            for _ in range(num_maps):
                layer = nn.Linear(self.student_width, self.teacher_width, bias=bias)
                bound = 1.0 / math.sqrt(self.student_width)
                with torch.no_grad():
                    layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator))
                    if bias:
                        layer.bias.zero_()
                self.maps.append(layer)

    def forward(self, x: Tensor, index: int = 0) -> Tensor:
        if x.shape[-1] != self.student_width:
            raise ValueError(f"projection expects student features of width {self.student_width}, got {x.shape[-1]}")
        if self.identity:
            return x
        layer = self.maps[index]
        return layer(x.to(layer.weight.dtype))

    def save(self, path: str | Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path))

    def load(self, path: str | Path) -> None:
        state = load_file(str(path))
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{path}: projection weights do not fit this projection (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); it was saved for other widths or layer maps")


# --------------------------------------------------------------------------------------------- hidden states
def _masked(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values
    return torch.where(mask.reshape(values.shape), values, torch.zeros((), dtype=values.dtype, device=values.device))


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per token: mean over features of ``(student - teacher)^2`` (widths must match: project first)."""
    if student.shape != teacher.shape:
        raise ValueError(f"hidden_mse: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ; project first")
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    return _masked((student.to(dtype) - teacher.to(dtype)).pow(2).mean(-1), mask)


def hidden_cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Per token: ``1 - cos(student, teacher)``."""
    if student.shape != teacher.shape:
        raise ValueError(f"hidden_cosine: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ; project first")
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    s, t = student.to(dtype), teacher.to(dtype)
    cos = (s * t).sum(-1) / (s.norm(dim=-1).clamp_min(eps) * t.norm(dim=-1).clamp_min(eps))
    return _masked(1.0 - cos, mask)


class HiddenStateKD(nn.Module):
    """Hidden-state KD over a layer map, with a learned projection when widths differ: per token, the mean over
    mapped layers of :func:`hidden_mse` or :func:`hidden_cosine` between the projected student state and the
    teacher's (teacher states never get a gradient)."""

    def __init__(self, student_layers: int, teacher_layers: int, student_width: int, teacher_width: int,
                 *, layers: str | Sequence = "uniform", loss: str = "mse", seed: int = 0) -> None:
        super().__init__()
        if loss not in ("mse", "cosine"):
            raise ConfigError(f"hidden-state loss must be 'mse' or 'cosine', got {loss!r}")
        self.pairs = resolve_layer_map(layers, student_layers, teacher_layers)
        self.loss = loss
        self.projection = HiddenProjection(student_width, teacher_width, len(self.pairs), seed=seed)

    def forward(self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
        fn = hidden_mse if self.loss == "mse" else hidden_cosine
        total = None
        for k, (s, t) in enumerate(self.pairs):
            if s >= len(student_hidden) or t >= len(teacher_hidden):
                raise ValueError(f"layer pair ({s}, {t}) needs hidden states the models did not return "
                                 f"({len(student_hidden)} student, {len(teacher_hidden)} teacher)")
            value = fn(self.projection(student_hidden[s], k), teacher_hidden[t].detach(), mask)
            total = value if total is None else total + value
        return total / len(self.pairs)


# --------------------------------------------------------------------------------------------- ND loss
def nd_loss(student: Tensor, teacher: Tensor, class_means: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Feature norm and direction loss (Wang et al., "Improving Knowledge Distillation via Regularizing Feature
    Norm and Direction", arXiv 2305.17007), per sample:

        ``1 - <f_s, c_y / ||c_y||> / max(||f_s||, ||f_t||)``

    with ``c_y`` the teacher's mean feature of the sample's class: the projection of the student's feature on the
    class-mean direction, in units of the larger of the two norms, so it rewards alignment with the direction
    and a norm at least the teacher's (as the authors' ``DirectNormLoss``). For a language model the class is
    the next token. Rows with an ignored label or a class without a mean (all zeros) give 0.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"nd_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ; project first")
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    s, t = student.to(dtype), teacher.to(dtype).detach()
    valid = labels != ignore_index
    centre = class_means.to(dtype)[labels.clamp(min=0)]
    norm_c = centre.norm(dim=-1)
    valid = valid & (norm_c > 0)
    direction = centre / norm_c.clamp_min(torch.finfo(dtype).tiny).unsqueeze(-1)
    scale = torch.maximum(s.norm(dim=-1), t.norm(dim=-1)).clamp_min(torch.finfo(dtype).tiny)
    loss = 1.0 - (s * direction).sum(-1) / scale
    return torch.where(valid, loss, torch.zeros((), dtype=dtype, device=loss.device))


class ClassMeans:
    """Running exact means of teacher features per class (``[C, d]`` sums and counts; a checkpointable state).
    For a large vocabulary the teacher's output embedding rows are a cheap stand-in for the class directions."""

    def __init__(self, num_classes: int, width: int, dtype: torch.dtype = torch.float64) -> None:
        self.sums = torch.zeros(num_classes, width, dtype=dtype)
        self.counts = torch.zeros(num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, ignore_index: int = -100) -> None:
        keep = labels != ignore_index
        self.sums = self.sums.to(features.device)
        self.counts = self.counts.to(features.device)
        self.sums.index_add_(0, labels[keep], features[keep].to(self.sums.dtype))
        self.counts.index_add_(0, labels[keep], torch.ones_like(labels[keep]))

    def means(self) -> Tensor:
        return self.sums / self.counts.clamp_min(1).unsqueeze(-1).to(self.sums.dtype)

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["sums"].shape != self.sums.shape:
            raise ValueError(f"class means of shape {tuple(state['sums'].shape)} do not fit {tuple(self.sums.shape)}")
        self.sums, self.counts = state["sums"].clone(), state["counts"].clone()


# --------------------------------------------------------------------------------------------- TRG
def knn_gaussian_graph(nodes: Tensor, k: int, sigma: float) -> Tensor:
    """TRG's token graph (Zhang, Liu & He, "Knowledge Distillation via Token-level Relationship Graph", arXiv
    2306.12442): ``A[i, j] = exp(-||x_i - x_j||^2 / (2 sigma))`` when ``x_i`` is one of the ``k`` nearest
    neighbours of ``x_j`` (itself excluded), else 0. Neighbourhoods are chosen without gradient; weights carry it.

    TRG's total loss is ``L_logit + alpha L_inner + beta L_local + gamma L_global`` over tokens sampled at random
    from the batch's instances (the graph spans instances). The four TRG functions here follow the formulas as a
    summary of the paper states them (the full text was not available to check details such as the softmax over
    the zero entries of ``A``, kept here as written)."""
    if not 1 <= k < nodes.shape[0]:
        raise ValueError(f"knn graph: k must be in [1, {nodes.shape[0] - 1}] for {nodes.shape[0]} nodes, got {k}")
    sq = torch.cdist(nodes, nodes).pow(2)
    with torch.no_grad():
        ranked = sq.detach().clone()
        ranked.fill_diagonal_(float("inf"))
        neighbours = ranked.topk(k, dim=0, largest=False).indices  # [k, M]: the k nearest i of each column j
        member = torch.zeros_like(ranked, dtype=torch.bool).scatter_(0, neighbours, True)
    return torch.where(member, torch.exp(-sq / (2.0 * sigma)), torch.zeros((), dtype=sq.dtype, device=sq.device))


@torch.no_grad()
def knn_bandwidth(nodes: Tensor, k: int) -> Tensor:
    """A scale for :func:`knn_gaussian_graph`'s ``sigma`` from the nodes themselves (this project's choice where the
    paper's value is not known): the mean squared distance of each node to its ``k`` nearest others, so a typical
    neighbour weighs ``exp(-1/2)`` on either side whatever the model's feature scale. No gradient."""
    sq = torch.cdist(nodes, nodes).pow(2)
    sq.fill_diagonal_(float("inf"))
    return sq.topk(k, dim=0, largest=False).values.mean().clamp_min(torch.finfo(sq.dtype).tiny)


def trg_local_loss(student_graph: Tensor, teacher_graph: Tensor) -> Tensor:
    """TRG's local preserving loss per node ``i``: ``KL(softmax_j A_S[i, j] || softmax_j A_T[i, j])`` (the
    direction as the paper writes it)."""
    s = torch.log_softmax(student_graph, dim=-1)
    t = torch.log_softmax(teacher_graph.detach(), dim=-1)
    return (s.exp() * (s - t)).sum(-1)


def trg_global_loss(student_nodes: Tensor, teacher_nodes: Tensor, temperature: float) -> Tensor:
    """TRG's global relationship loss per node (InfoNCE over the sampled nodes): ``-log softmax_j(cos(s_i, t_j) /
    tau)[i]``; the student's nodes must already be projected to the teacher's width. The paper anneals ``tau``
    from high (coarse structure) to low (hard negatives): pass the current value."""
    if student_nodes.shape != teacher_nodes.shape:
        raise ValueError("trg_global_loss: project the student's nodes to the teacher's width first")
    s = nn.functional.normalize(student_nodes, dim=-1)
    t = nn.functional.normalize(teacher_nodes.detach(), dim=-1)
    logits = s @ t.T / temperature
    return -torch.log_softmax(logits, dim=-1).diagonal()


def trg_inner_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """TRG's contextual (inner-instance) loss per token: with ``CS = softmax(F F^T / sqrt(d))`` over the tokens of
    one sequence (each model its own ``d``), the mean over ``j`` of ``(CS_T[i, j] - CS_S[i, j])^2``. ``[B, L, d]``
    inputs; masked tokens are neither rows nor columns."""
    # a sequence with no real token keeps every column (its rows are zeroed below): no all -inf softmax
    columns = None if mask is None else (mask | ~mask.any(-1, keepdim=True)).unsqueeze(-2)

    def context(x: Tensor) -> Tensor:
        scores = x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])
        if columns is not None:
            scores = scores.masked_fill(~columns, float("-inf"))
        return torch.softmax(scores, dim=-1)

    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    diff = (context(teacher.detach().to(dtype)) - context(student.to(dtype))).pow(2)
    count = student.shape[-2] if mask is None else mask.sum(-1, keepdim=True).clamp_min(1)
    if mask is not None:
        diff = diff.masked_fill(~mask.unsqueeze(-2), 0.0)
    return _masked(diff.sum(-1) / count, mask)


# --------------------------------------------------------------------------------------------- MiniLMv2
def attention_relations(x: Tensor, heads: int, mask: Tensor | None = None, causal: bool = True) -> Tensor:
    """MiniLMv2's self-attention relation (Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation Distillation
    for Compressing Pretrained Transformers", arXiv 2012.15828): the queries (or keys, or values) ``[B, L, d]``
    split into ``heads`` relation heads of ``d / heads``, and per head ``log softmax(A A^T / sqrt(d / heads))``
    over the keys ``[B, heads, L, L]``. ``causal`` restricts token t to tokens up to t (a decoder reads no
    further); masked tokens are never attended to."""
    b, length, d = x.shape
    if d % heads:
        raise ValueError(f"attention relations: width {d} is not divisible into {heads} relation heads")
    a = x.reshape(b, length, heads, d // heads).transpose(1, 2)
    scores = a @ a.transpose(-1, -2) / math.sqrt(d // heads)
    allowed = torch.ones(length, length, dtype=torch.bool, device=x.device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(b, 1, length, length)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :].bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    # a row with nothing allowed (a masked query) is set to attend to itself, then zeroed by the caller's mask
    empty = ~allowed.any(-1, keepdim=True)
    scores = torch.where(empty & torch.eye(length, dtype=torch.bool, device=x.device), torch.zeros_like(scores), scores)
    return torch.log_softmax(scores, dim=-1)


def relation_heads(heads: int | str, *widths: int, most: int = 64) -> int:
    """The relation-head count for widths that may differ: ``heads`` itself when it divides every width (else a
    ConfigError), or for ``"auto"`` the largest count up to ``most`` that does (MiniLMv2 uses 48 relation heads for
    base-size and 64 for large-size teachers; a count must split each side's width evenly)."""
    common = 0
    for width in widths:
        common = math.gcd(common, int(width))
    if heads == "auto":
        return max(h for h in range(1, most + 1) if common % h == 0)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ConfigError(f"heads must be a positive integer or 'auto', got {heads!r}")
    if common % heads:
        raise ConfigError(f"heads: {heads} relation heads do not split the widths {', '.join(map(str, widths))} evenly; "
                          "use a divisor of every width, or heads: auto")
    return heads


def attention_relation_kd(student: Sequence[Tensor], teacher: Sequence[Tensor], heads: int,
                          mask: Tensor | None = None, causal: bool = True) -> Tensor:
    """MiniLMv2's loss per token: over the given relation types (Q-Q, K-K, V-V: pass the three projections of one
    layer of each model; widths may differ, the head count is shared) the sum of the mean over relation heads of
    ``KL(R_T[t] || R_S[t])``."""
    if len(student) != len(teacher) or not student:
        raise ValueError("attention_relation_kd: pass the same relation inputs (e.g. Q, K, V) for both models")
    total = None
    for s, t in zip(student, teacher):
        dtype = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
        rs = attention_relations(s.to(dtype), heads, mask, causal)
        rt = attention_relations(t.detach().to(dtype), heads, mask, causal)
        pt = rt.exp()
        kl = torch.where(pt > 0, pt * (rt - rs), torch.zeros((), dtype=dtype, device=pt.device)).sum(-1).mean(1)
        total = kl if total is None else total + kl
    return _masked(total, mask)


class qkv_capture:
    """Context manager recording one attention layer's queries, keys and values ``[B, L, d]`` during a forward,
    for :func:`attention_relation_kd`. Knows GPT-2 style blocks (``transformer.h[i].attn.c_attn``, fused) and
    Llama style ones (``model.layers[i].self_attn.{q,k,v}_proj``)."""

    def __init__(self, model: nn.Module, layer: int) -> None:
        self.values: list[Tensor] = []
        self._handles: list = []
        base = getattr(model, "transformer", None)
        if base is not None and hasattr(base, "h"):
            fused = base.h[layer].attn.c_attn
            self._handles.append(fused.register_forward_hook(lambda m, i, out: self.values.extend(out.chunk(3, dim=-1))))
            return
        inner = getattr(model, "model", None)
        if inner is not None and hasattr(inner, "layers"):
            attn = inner.layers[layer].self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                self._handles.append(getattr(attn, name).register_forward_hook(lambda m, i, out: self.values.append(out)))
            return
        raise ConfigError(f"attention relations: no known attention layout in {type(model).__name__} "
                          "(GPT-2 c_attn or q_proj/k_proj/v_proj)")

    def __enter__(self) -> "qkv_capture":
        self.values.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


# --------------------------------------------------------------------------------------------- across tokenizers
def span_features(student_hidden: Tensor, teacher_hidden: Tensor, alignment: AlignedBatch) -> tuple[Tensor, Tensor]:
    """Each side's hidden state after the last token of every aligned span, ``([G', d_s], [G', d_t])``, for the
    spans where both sides have one: after a span both models have read the same text, however they split it."""
    s = student_hidden.reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    s_pos, t_pos = alignment.s_last_pos.to(s.device), alignment.t_last_pos.to(t.device)
    both = (s_pos >= 0) & (t_pos >= 0)
    return s[s_pos[both]], t[t_pos[both].to(t.device)]


class AlignedStates(tuple):
    """A teacher's ``output_hidden_states`` tuple (``[B, Lt, d]`` each, in its own tokens) with the
    :class:`~lmdistill.losses.alignment.AlignedBatch` pairing its tokens with the student's: what a teacher with
    another tokenizer gives the representation objectives, which then compare both sides at the aligned span ends
    (:func:`span_sequences`) instead of token by token."""

    alignment: AlignedBatch

    def __new__(cls, states: Sequence[Tensor], alignment: AlignedBatch) -> "AlignedStates":
        self = super().__new__(cls, states)
        self.alignment = alignment
        return self


def span_sequences(alignment: AlignedBatch, device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
    """Per sequence, in text order, the aligned spans after which both sides have a state (as
    :func:`span_features` pairs them): the flat student and teacher input positions of the spans' last tokens,
    ``[B, G]`` each (0 where padded), and a mask ``[B, G]`` of the real ones, ``G`` the most spans of any sequence.
    Indexing each side's flattened hidden states with them gives span-pooled sequences that read the same text,
    so the sequence-level relations (TRG's contextual term, MiniLMv2's relations) apply unchanged."""
    s_pos, t_pos = alignment.s_last_pos.to(device), alignment.t_last_pos.to(device)
    both = (s_pos >= 0) & (t_pos >= 0)
    s_pos, t_pos = s_pos[both], t_pos[both]
    batch = alignment.batch_size
    seq = torch.div(s_pos, alignment.student_len, rounding_mode="floor")
    counts = torch.bincount(seq, minlength=batch)
    width = max(1, int(counts.max())) if s_pos.numel() else 1
    rank = torch.arange(s_pos.numel(), device=s_pos.device) - (torch.cumsum(counts, 0) - counts)[seq]
    s_index = torch.zeros(batch, width, dtype=torch.long, device=s_pos.device)
    t_index = torch.zeros_like(s_index)
    mask = torch.zeros(batch, width, dtype=torch.bool, device=s_pos.device)
    s_index[seq, rank], t_index[seq, rank], mask[seq, rank] = s_pos, t_pos, True
    return s_index, t_index, mask
