"""Measurement: perplexity, bits per byte, teacher agreement."""

from lmdistill.eval.lm import evaluate_lm

__all__ = ["evaluate_lm"]
