"""Models: loading causal LMs, from-scratch presets, teacher/student vocabulary alignment."""

from lmdistill.models.loading import build_from_preset, count_parameters, load_causal_lm
from lmdistill.models.presets import PRESETS, preset_config
from lmdistill.models.vocab import VocabAlignment, check_vocab_compatible

__all__ = [
    "PRESETS",
    "VocabAlignment",
    "build_from_preset",
    "check_vocab_compatible",
    "count_parameters",
    "load_causal_lm",
    "preset_config",
]
