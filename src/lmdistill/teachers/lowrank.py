"""Moved: the low-rank projection lives in :mod:`lmdistill.teachers.cache.projection` (the cache package); this
module keeps the old import path working."""

from lmdistill.teachers.cache.projection import (
    CODE_MAX,
    FIT_TOKENS,
    PROJECTION_NAME,
    LowRankProjection,
    build_projection,
    check_linear_head,
    final_hidden,
    fidelity,
    fit_blocks,
    fit_projection,
    native_bf16_matmul,
    output_layer,
    projection_metadata,
)

__all__ = [
    "CODE_MAX",
    "FIT_TOKENS",
    "PROJECTION_NAME",
    "LowRankProjection",
    "build_projection",
    "check_linear_head",
    "fidelity",
    "final_hidden",
    "fit_blocks",
    "fit_projection",
    "native_bf16_matmul",
    "output_layer",
    "projection_metadata",
]
