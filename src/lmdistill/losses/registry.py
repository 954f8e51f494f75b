"""One registry from config names to objectives, and the weighted mixture of objectives."""

from __future__ import annotations

import inspect
import math
from functools import reduce
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lmdistill.errors import ConfigError
from lmdistill.losses.akl import AdaptiveKL
from lmdistill.losses.atkd import ATKD
from lmdistill.losses.core import Objective, Teacher, Workspace
from lmdistill.losses.crosstok import ULD, MinEDKD, SpanKD
from lmdistill.losses.dackl import DACKL, SpanCorrelation
from lmdistill.losses.distillm2 import DistiLLM2
from lmdistill.losses.divergences import (
    CrossEntropy,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    TotalVariation,
)
from lmdistill.losses.features import (
    AttentionRelationObjective,
    HiddenStateObjective,
    NormDirectionObjective,
    TokenRelationObjective,
)
from lmdistill.losses.minillm import MiniLLM
from lmdistill.losses.projection import ProjectedKD
from lmdistill.losses.sinkd import SinKD
from lmdistill.losses.taid import TAID
from lmdistill.losses.tgeo import TrilateralFusion

__all__ = ["OBJECTIVES", "ALIASES", "Mixture", "build_objective", "objective_names", "on_aligned_spans"]

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        ForwardKL,
        ReverseKL,
        GeneralizedJSD,
        TotalVariation,
        SkewKL,
        SkewReverseKL,
        TAID,
        ATKD,
        SinKD,
        CrossEntropy,
        TrilateralFusion,
        AdaptiveKL,
        DistiLLM2,
        DACKL,
        SpanCorrelation,
        SpanKD,
        ULD,
        MinEDKD,
        ProjectedKD,
        HiddenStateObjective,
        TokenRelationObjective,
        NormDirectionObjective,
        AttentionRelationObjective,
        MiniLLM,
    )
}
ALIASES = {
    "fkl": "forward_kl",
    "kl": "forward_kl",
    "rkl": "reverse_kl",
    "generalized_jsd": "jsd",
    "total_variation": "tvd",
    "skl": "skew_kl",
    "srkl": "skew_reverse_kl",
    "ce": "cross_entropy",
    "trilateral_fusion": "tgeo",
    "adaptive_kl": "akl",
    "distillm_2": "distillm2",
    "dackl": "dac_kl",
    "span": "span_correlation",
    "span_alignment": "span_kd",
    "universal_logit_distillation": "uld",
    "min_edit_distance": "mined",
    "projected": "projected_kd",
    "hidden": "hidden_states",
    "hidden_state": "hidden_states",
    "token_relations": "trg",
    "minilmv2": "attention_relations",
    "attention_relation": "attention_relations",
    "feature_norm_direction": "nd",
}


def objective_names() -> list[str]:
    """Every name :func:`build_objective` accepts (canonical names first, then aliases, then 'mix')."""
    return sorted(OBJECTIVES) + sorted(ALIASES) + ["mix"]


class Mixture(Objective):
    """A weighted sum of objectives: ``per_token = sum_k w_k * part_k.per_token``.

    Itself an :class:`Objective`: its state nests the parts' states, :meth:`on_step_end` reaches every part,
    and in the chunked path it sums the parts' analytic gradients when all parts have one (otherwise the
    whole mixture is differentiated with autograd per chunk).
    """

    name = "mix"

    def __init__(self, parts: Sequence[tuple[Objective, float]]) -> None:
        if not parts:
            raise ValueError("a mixture needs at least one part")
        for objective, weight in parts:
            if not isinstance(objective, Objective):
                raise ValueError(f"mixture parts must be objectives, got {objective!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        if all(weight == 0 for _, weight in parts):
            raise ValueError("at least one mixture weight must be > 0")
        outer = [objective.name for objective, _ in parts if objective.has_outer_step]
        if outer:
            raise ValueError(
                f"objective {outer[0]} learns through its own outer step and cannot sit inside a 'mix'; use it alone "
                "(tgeo already fuses the KD and label losses)"
            )
        self.parts = [(objective, float(weight)) for objective, weight in parts]
        objectives = [objective for objective, _ in self.parts]
        # instance attributes shadow the class defaults: a mixture is what its parts are
        self.requires_teacher = any(o.requires_teacher for o in objectives)
        self.needs_batch_context = any(o.needs_batch_context for o in objectives)
        groups = [o.row_group_size for o in objectives if o.row_group_size is not None]
        self.batch_coupled = any(o.batch_coupled for o in objectives)
        self.row_group_size = reduce(math.lcm, groups) if groups else None
        if any(o.batch_coupled and o.row_group_size is None for o in objectives):
            self.row_group_size = None
        self.accepted_signals = frozenset.intersection(*(o.accepted_signals for o in objectives if o.requires_teacher)) \
            if self.requires_teacher else type(self).accepted_signals
        # parts of each kind: logit parts (per_token, chunk kernels) and representation parts (state_per_token)
        self.logit_parts = [(o, w) for o, w in self.parts if o.reads_logits]
        self.state_parts = [(o, w) for o, w in self.parts if o.uses_states]
        self.reads_logits = bool(self.logit_parts)
        self.takes_aligned_windows = all(o.takes_aligned_windows for o, _ in self.logit_parts if o.requires_teacher)
        self.uses_states = bool(self.state_parts)

    def for_batch(self, batch: dict[str, Tensor]) -> Objective:
        bound = [(objective.for_batch(batch), weight) for objective, weight in self.parts]
        if all(b is o for (b, _), (o, _) in zip(bound, self.parts)):
            return self
        return Mixture(bound)  # the bound parts delegate state and schedules to this mixture's parts

    def leaves(self) -> list[Objective]:
        return [leaf for objective, _ in self.parts for leaf in objective.leaves()]

    def per_token(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None, *, context: Any = None) -> Tensor:
        contexts = context if context is not None else [None] * len(self.logit_parts)
        total = None
        for (objective, weight), part_context in zip(self.logit_parts, contexts):
            if weight == 0:
                continue
            term = objective.per_token(student_logits, teacher, labels, context=part_context)
            total = weight * term if total is None else total + weight * term
        if total is None:  # no logit part carries weight
            total = student_logits.new_zeros(student_logits.shape[:-1])
        return total

    def state_per_token(self, student_states, teacher_states, labels: Tensor) -> Tensor:
        total = None
        for objective, weight in self.state_parts:
            if weight == 0:
                continue
            term = objective.state_per_token(student_states, teacher_states, labels)
            total = weight * term if total is None else total + weight * term
        return total if total is not None else labels.new_zeros(labels.shape, dtype=torch.float32)

    def per_token_parts(self, student_logits: Tensor, teacher: Teacher | None, labels: Tensor | None) -> dict[str, Tensor]:
        """Unweighted per-token losses of each part, keyed ``"<index>:<name>"`` (for logging)."""
        return {
            f"{i}:{objective.name}": objective.per_token(student_logits, teacher, labels)
            for i, (objective, _) in enumerate(self.parts) if objective.reads_logits
        }

    def has_chunk_kernel(self) -> bool:
        return all(objective.has_chunk_kernel() for objective, _ in self.logit_parts)

    def chunk_value_and_grad(self, z, teacher, labels, ws: Workspace, context=None):
        if not self.has_chunk_kernel() or not any(weight for _, weight in self.logit_parts):
            return None
        contexts = context if context is not None else [None] * len(self.logit_parts)
        total_loss = None
        total_grad = ws.buf(f"mix_grad@{id(self)}")
        for (objective, weight), part_context in zip(self.logit_parts, contexts):
            if weight == 0:
                continue
            loss, grad = objective.chunk_value_and_grad(z, teacher, labels, ws, part_context)
            if total_loss is None:
                total_loss = weight * loss
                torch.mul(grad, weight, out=total_grad)
            else:
                total_loss = total_loss + weight * loss
                total_grad.add_(grad, alpha=weight)
        return total_loss, total_grad

    def batch_context(self, teacher_chunks: Callable[[], Iterable[tuple[int, int, Teacher]]], labels: Tensor, vocab_size: int) -> Any:
        return [
            objective.batch_context(teacher_chunks, labels, vocab_size) if objective.needs_batch_context else None
            for objective, _ in self.logit_parts
        ]

    def slice_context(self, context: Any, start: int, stop: int) -> Any:
        if context is None:
            return None
        return [
            None if part_context is None else objective.slice_context(part_context, start, stop)
            for (objective, _), part_context in zip(self.logit_parts, context)
        ]

    def state_dict(self) -> dict:
        return {"parts": [{"name": o.name, "state": o.state_dict()} for o, _ in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("parts")
        if not isinstance(saved, list) or len(saved) != len(self.parts):
            raise ValueError(f"mixture state must list {len(self.parts)} parts, got {saved!r:.200}")
        for (objective, _), entry in zip(self.parts, saved):
            if entry.get("name") != objective.name:
                raise ValueError(f"mixture state part '{entry.get('name')}' does not match objective '{objective.name}'")
        for (objective, _), entry in zip(self.parts, saved):
            objective.load_state_dict(entry["state"])

    def on_step_end(self, loss: float, step: int, total_steps: int) -> None:
        for objective, _ in self.parts:
            objective.on_step_end(loss, step, total_steps)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for objective, _ in self.parts for p in objective.parameters()]

    def config(self) -> dict:
        return {"mix": [{**objective.config(), "weight": weight} for objective, weight in self.parts]}

    def __repr__(self) -> str:
        return "Mixture(" + ", ".join(f"{w:g}*{o!r}" for o, w in self.parts) + ")"


def _allowed_params(cls: type[Objective]) -> list[str]:
    signature = inspect.signature(cls.__init__)
    return [name for name in signature.parameters if name != "self" and name not in cls.bound_params]


def _build_one(name: Any, params: Mapping[str, Any], key: str) -> Objective:
    if not isinstance(name, str):
        raise ConfigError(f"{key}.name: must be a string naming an objective; allowed: {', '.join(objective_names())}")
    canonical = ALIASES.get(name, name)
    cls = OBJECTIVES.get(canonical)
    if cls is None:
        raise ConfigError(f"{key}: unknown objective '{name}'; allowed: {', '.join(objective_names())}")
    allowed = _allowed_params(cls)
    for param in params:
        if param not in allowed:
            raise ConfigError(
                f"{key}.{param}: unknown parameter for objective '{canonical}'; "
                f"allowed: {', '.join(allowed) if allowed else '(none)'}"
            )
    params = dict(params)
    for param in getattr(cls, "nested_objectives", ()):  # e.g. tgeo's kd: a spec, built here
        if param in params:
            params[param] = build_objective(params[param], key=f"{key}.{param}")
    try:
        return cls(**params)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{key}: invalid parameter for objective '{canonical}': {error}") from None


def _build_mixture(entries: Any, key: str) -> Mixture:
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ConfigError(f"{key}: a mixture needs a non-empty list of parts, e.g. [{{name: forward_kl, weight: 0.5}}, ...]")
    parts = []
    for i, entry in enumerate(entries):
        entry_key = f"{key}[{i}]"
        weight: Any = 1.0
        if isinstance(entry, Mapping):
            entry = dict(entry)
            weight = entry.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"{entry_key}.weight: must be a finite number >= 0, got {weight!r}")
        parts.append((build_objective(entry, key=entry_key), float(weight)))
    if all(weight == 0 for _, weight in parts):
        raise ConfigError(f"{key}: at least one mixture weight must be > 0")
    try:
        return Mixture(parts)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None


def build_objective(spec: Any, *, key: str = "objective") -> Objective:
    """Build an objective from a config spec.

    Accepted forms:

    * ``"forward_kl"``: a name with default parameters (see :func:`objective_names`);
    * ``{"name": "jsd", "beta": 0.5, "temperature": 2.0}``: a name with constructor parameters;
    * ``{"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]}`` or the
      bare list ``[...]``: a weighted :class:`Mixture` (weight defaults to 1; parts may nest);
    * an :class:`Objective` instance, returned unchanged.

    Errors are :class:`~lmdistill.errors.ConfigError` naming the key path (``key`` is its prefix), the
    unknown name or parameter, and the allowed ones.
    """
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, str):
        return _build_one(spec, {}, key)
    if isinstance(spec, (list, tuple)):
        return _build_mixture(spec, key)
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "mix" in spec:
            extra = sorted(set(spec) - {"mix"})
            if extra:
                raise ConfigError(f"{key}: a mixture takes only the key 'mix' (weights go in each part), got also {extra}")
            return _build_mixture(spec["mix"], f"{key}.mix")
        if "name" not in spec:
            raise ConfigError(
                f"{key}: an objective needs 'name' (or 'mix' for a mixture); allowed names: {', '.join(objective_names())}"
            )
        name = spec.pop("name")
        if name == "mix":
            raise ConfigError(f"{key}: write a mixture as {{mix: [...]}}")
        if "weight" in spec:
            raise ConfigError(f"{key}.weight: weights belong to the parts of a mixture ({{mix: [...]}})")
        return _build_one(name, spec, key)
    raise ConfigError(f"{key}: expected an objective name, a mapping with 'name', or a mixture; got {type(spec).__name__}")


def on_aligned_spans(objective: Objective, *, key: str = "objective") -> Objective:
    """Vocabulary rung 3 (partly shared tokens): each part of ``objective`` that needs a same-vocabulary teacher
    runs on aligned spans folded to the shared tokens (:class:`~lmdistill.losses.crosstok.SpanKD` with that part
    inside, its temperature moved onto the span merge); label-only parts and cross-tokenizer parts stay as they
    are. Parts that couple rows or keep their own outer step cannot move inside a span merge: a ConfigError."""
    from lmdistill.losses.signals import CROSSTOK

    def wrap(part: Objective, where: str) -> Objective:
        if not part.requires_teacher or not part.refusals(CROSSTOK):
            return part
        if isinstance(part, Mixture):
            return Mixture([(wrap(p, f"{where}.mix[{i}]"), w) for i, (p, w) in enumerate(part.parts)])
        if part.has_outer_step or part.batch_coupled or part.needs_batch_context:
            raise ConfigError(
                f"{where}: '{part.name}' needs one vocabulary (it couples rows or keeps its own step), and this teacher "
                "and student share only part of theirs (rung 3); use a cross-tokenizer objective (projected_kd, span_kd, uld, mined) "
                "or a per-token divergence (forward_kl, reverse_kl, jsd, ...)"
            )
        spec = part.config()
        temperature = float(spec.get("temperature", 1.0))
        if spec.get("scale_by_t2") and temperature != 1.0:
            raise ConfigError(f"{where}: scale_by_t2 does not carry over to span-aligned KD (rung 3); drop it or use "
                              "temperature 1")
        inner = build_objective({**spec, "temperature": 1.0} if "temperature" in spec else spec, key=where)
        return SpanKD(inner=inner, temperature=temperature)

    return wrap(objective, key)
