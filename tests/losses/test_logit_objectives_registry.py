"""The registry builds AKL, DistiLLM-2, DAC-KL and the span loss from config specs, with clear errors."""

from __future__ import annotations

import pytest
import torch

from lmdistill.errors import ConfigError
from lmdistill.losses import AdaptiveKL, DACKL, DistiLLM2, SpanCorrelation, build_objective
from lmdistill.losses.signals import SAMPLED, TOPK
from tests.losses.helpers import make_inputs


@pytest.mark.parametrize("spec,cls", [
    ({"name": "adaptive_kl", "mu": 0.3, "temperature": 2.0}, AdaptiveKL),
    ({"name": "distillm_2", "alpha_skl": 0.2, "beta_end": 1.0, "adaptive_alpha": True}, DistiLLM2),
    ({"name": "dackl", "n_inputs": 8, "min_window": 0.5, "learn_bounds": False}, DACKL),
    ({"name": "span", "span_size": 3}, SpanCorrelation),
])
def test_aliases_parameters_and_config_round_trip(spec, cls):
    objective = build_objective(spec)
    assert isinstance(objective, cls)
    again = build_objective(objective.config())
    assert again.config() == objective.config()
    z, zt, labels = make_inputs((2, 6, 9), seed=1, ignore_every=4)
    torch.testing.assert_close(again.per_token(z, zt, labels), objective.per_token(z, zt, labels))
    # every one needs the teacher's whole distribution: exact or completed signals, never sampled ones
    assert TOPK in objective.accepted_signals and SAMPLED not in objective.accepted_signals


@pytest.mark.parametrize("spec,pattern", [
    ({"name": "akl", "mu": 1.5}, r"objective: invalid parameter for objective 'akl': mu must be a number in \(0, 1\)"),
    ({"name": "distillm2", "beta": 1.2}, r"objective\.beta: unknown parameter for objective 'distillm2'; allowed: alpha_skl"),
    ({"name": "dac_kl", "sharpness": 0}, r"sharpness must be a number > 0"),
    ({"name": "span_correlation", "span_size": 1}, r"span_size must be an integer >= 2"),
    ({"mix": [{"name": "dac_kl"}, {"name": "ce"}]}, r"objective\.mix: objective dac_kl learns through its own outer step"),
])
def test_config_errors(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_objective(spec)


def test_the_papers_mixture_with_fixed_bounds():
    """SFT + DAC-KL + span loss (arXiv 2407.10068's sum), with the DAC-KL network held fixed."""
    mix = build_objective({"mix": [{"name": "ce"}, {"name": "dac_kl", "learn_bounds": False}, {"name": "span_correlation"}]})
    z, zt, labels = make_inputs((2, 8, 7), seed=2)
    parts = [build_objective("ce"), DACKL(learn_bounds=False), SpanCorrelation()]
    want = sum(p.per_token(z, zt, labels) for p in parts)
    torch.testing.assert_close(mix.per_token(z, zt, labels), want)
    assert mix.batch_coupled and mix.row_group_size == 4
