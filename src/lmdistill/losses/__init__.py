"""Logit-distillation objectives: pure functions of tensors, one registry, one reduction, a chunked path.

Quick use::

    from lmdistill.losses import build_objective, reduce_tokens, fused_linear_distill

    objective = build_objective({"mix": [{"name": "forward_kl", "weight": 0.5, "temperature": 2.0},
                                         {"name": "cross_entropy", "weight": 0.5}]})
    per_token = objective.per_token(student_logits, teacher_logits, labels)      # [N], 0 where labels == -100
    loss = reduce_tokens(per_token, labels, normalizer=global_valid_tokens)
    # or, without materialising the [N, V] logits:
    loss = fused_linear_distill(hidden, lm_head.weight, teacher_logits, labels, objective,
                                normalizer=global_valid_tokens)
    ...
    objective.on_step_end(loss.item(), step, total_steps)                        # TAID advances its schedule

Conventions (dtypes, masking, temperature) are described in :mod:`lmdistill.losses.core`; the forms a teacher's
signal takes (dense logits, sparse top-k or sampled, hidden states, low-rank codes) and which objectives accept
which, in :mod:`lmdistill.losses.signals`.
"""

from lmdistill.constants import IGNORE_INDEX
from lmdistill.losses.akl import AdaptiveKL
from lmdistill.losses.atkd import ATKD, ATKDSplit, decoupled_kd_parts
from lmdistill.losses.batch_rows import RowBound
from lmdistill.losses.chunked import default_chunk_size, fused_linear_distill
from lmdistill.losses.core import Divergence, Objective, OuterStep, reduce_tokens, valid_mask
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
    cross_entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from lmdistill.losses.registry import ALIASES, OBJECTIVES, Mixture, build_objective, objective_names, on_aligned_spans
from lmdistill.losses.signals import (
    SIGNAL_KINDS,
    HiddenStates,
    LowRankCodes,
    SparseTeacher,
    Teacher,
    TeacherSignal,
    signal_kind,
    teacher_log_probs,
)
from lmdistill.losses.sinkd import SinKD, sinkhorn_log_plan
from lmdistill.losses.taid import TAID
from lmdistill.losses.tgeo import TrilateralFusion

__all__ = [
    "IGNORE_INDEX",
    "ALIASES",
    "OBJECTIVES",
    "ATKD",
    "ATKDSplit",
    "AdaptiveKL",
    "CrossEntropy",
    "DACKL",
    "DistiLLM2",
    "Divergence",
    "ForwardKL",
    "GeneralizedJSD",
    "HiddenStates",
    "LowRankCodes",
    "Mixture",
    "Objective",
    "OuterStep",
    "SIGNAL_KINDS",
    "ReverseKL",
    "RowBound",
    "SinKD",
    "SkewKL",
    "SkewReverseKL",
    "SpanCorrelation",
    "SparseTeacher",
    "TAID",
    "Teacher",
    "TeacherSignal",
    "TotalVariation",
    "TrilateralFusion",
    "build_objective",
    "cross_entropy",
    "decoupled_kd_parts",
    "default_chunk_size",
    "forward_kl",
    "fused_linear_distill",
    "generalized_jsd",
    "objective_names",
    "on_aligned_spans",
    "reduce_tokens",
    "reverse_kl",
    "signal_kind",
    "sinkhorn_log_plan",
    "skew_kl",
    "skew_reverse_kl",
    "teacher_log_probs",
    "total_variation",
    "valid_mask",
]
