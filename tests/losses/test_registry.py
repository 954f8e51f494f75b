"""build_objective: every spec form, clear config errors, mixtures as objectives with nested state."""

from __future__ import annotations

import pytest
import torch

from lmdistill.errors import ConfigError
from lmdistill.losses import (
    OBJECTIVES,
    TAID,
    CrossEntropy,
    ForwardKL,
    GeneralizedJSD,
    Mixture,
    build_objective,
    objective_names,
    reduce_tokens,
)
from tests.losses.helpers import make_inputs


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_name_builds_and_round_trips_its_config(name):
    objective = build_objective(name)
    assert objective.name == name
    again = build_objective(objective.config())
    assert again.config() == objective.config()
    if objective.reads_logits and "dense" in objective.accepted_signals:  # the others: tests/train, test_crosstok
        z, zt, labels = make_inputs((8, 6), ignore_every=3)
        torch.testing.assert_close(again.per_token(z, zt, labels), objective.per_token(z, zt, labels))


def test_names_params_and_aliases():
    jsd = build_objective({"name": "jsd", "beta": 0.3, "temperature": 2.0})
    assert isinstance(jsd, GeneralizedJSD) and jsd.beta == 0.3 and jsd.temperature == 2.0
    assert isinstance(build_objective("fkl"), ForwardKL)
    assert isinstance(build_objective("ce"), CrossEntropy)
    assert not build_objective("ce").requires_teacher and build_objective("kl").requires_teacher


def test_mixture_forms_and_values():
    z, zt, labels = make_inputs((10, 7), ignore_every=4)
    spec = {"mix": [{"name": "forward_kl", "weight": 0.5, "temperature": 2.0}, {"name": "cross_entropy", "weight": 0.25}]}
    mix = build_objective(spec)
    assert isinstance(mix, Mixture) and mix.requires_teacher
    want = 0.5 * ForwardKL(2.0).per_token(z, zt, labels) + 0.25 * CrossEntropy().per_token(z, zt, labels)
    torch.testing.assert_close(mix.per_token(z, zt, labels), want)
    as_list = build_objective([{"name": "forward_kl", "weight": 0.5, "temperature": 2.0}, {"name": "ce", "weight": 0.25}])
    torch.testing.assert_close(as_list.per_token(z, zt, labels), want)
    torch.testing.assert_close(build_objective(mix.config()).per_token(z, zt, labels), want)
    parts = mix.per_token_parts(z, zt, labels)
    assert list(parts) == ["0:forward_kl", "1:cross_entropy"]
    ce_only = build_objective({"mix": ["cross_entropy"]})
    assert not ce_only.requires_teacher


def test_mixture_state_nests_and_on_step_end_reaches_parts():
    mix = build_objective({"mix": [{"name": "taid", "weight": 1.0, "alpha": 0.1}, {"name": "ce", "weight": 1.0}]})
    for step, loss in enumerate([3.0, 2.0, 1.0], start=1):
        mix.on_step_end(loss, step, 10)
    state = mix.state_dict()
    assert state["parts"][0]["name"] == "taid" and state["parts"][0]["state"]["t"] > 0.4
    fresh = build_objective({"mix": [{"name": "taid", "weight": 1.0, "alpha": 0.1}, {"name": "ce", "weight": 1.0}]})
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    wrong = build_objective({"mix": [{"name": "forward_kl", "weight": 1.0}, {"name": "ce", "weight": 1.0}]})
    with pytest.raises(ValueError, match="does not match"):
        wrong.load_state_dict(state)


def test_stateless_objectives_have_empty_state():
    objective = build_objective("forward_kl")
    assert objective.state_dict() == {}
    objective.load_state_dict({})
    objective.on_step_end(1.0, 1, 10)
    with pytest.raises(ValueError, match="stateless"):
        objective.load_state_dict({"t": 1})


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ("forwrd_kl", r"objective: unknown objective 'forwrd_kl'; allowed: .*forward_kl.*jsd.*taid"),
        ({"name": "jsd", "betta": 0.5}, r"objective\.betta: unknown parameter for objective 'jsd'; allowed: beta, temperature, scale_by_t2"),
        ({"name": "jsd", "beta": 1.5}, r"objective: invalid parameter for objective 'jsd': beta must be in \[0, 1\]"),
        ({"name": "forward_kl", "temperature": 0}, r"temperature must be a number > 0"),
        ({"name": "taid", "form": "mse"}, r"form must be 'kl' or 'ce'"),
        ({"mix": [{"name": "forward_kl", "weight": -1}]}, r"objective\.mix\[0\]\.weight: must be a finite number >= 0"),
        ({"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "nope"}]}, r"objective\.mix\[1\]: unknown objective 'nope'"),
        ({"mix": []}, r"non-empty list"),
        ({"mix": [{"name": "ce", "weight": 0}]}, r"at least one mixture weight must be > 0"),
        ({"name": "forward_kl", "weight": 0.5}, r"weights belong to the parts of a mixture"),
        ({"beta": 0.5}, r"needs 'name'"),
        (3, r"expected an objective name"),
        ({"name": "tgeo", "kd": "sinkd"}, r"kd must be a token-level teacher divergence"),
    ],
)
def test_config_errors_name_key_and_allowed_values(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_objective(spec)


def test_key_prefix_is_used():
    with pytest.raises(ConfigError, match=r"^train\.objective: unknown objective"):
        build_objective("x", key="train.objective")
    assert "mix" in objective_names() and "forward_kl" in objective_names()


def test_reduced_call_uses_the_one_reduction():
    z, zt, labels = make_inputs((9, 5), ignore_every=2)
    objective = TAID()
    assert objective(z, zt, labels).item() == pytest.approx(reduce_tokens(objective.per_token(z, zt, labels), labels).item())
    assert objective(z, zt, labels, normalizer=100).item() == pytest.approx(objective.per_token(z, zt, labels).sum().item() / 100)


def test_global_normaliser_makes_micro_batches_add_up_exactly():
    """reduce_tokens with the global valid-token count: micro-batch losses and gradients sum to the batch's."""
    z, zt, labels = make_inputs((24, 9), seed=2, ignore_every=5)
    objective = build_objective({"mix": [{"name": "jsd", "weight": 0.6}, {"name": "ce", "weight": 0.4}]})
    full_z = z.clone().requires_grad_(True)
    full = reduce_tokens(objective.per_token(full_z, zt, labels), labels)
    full.backward()
    parts_z = z.clone().requires_grad_(True)
    normalizer = int((labels != -100).sum())
    total = sum(
        reduce_tokens(objective.per_token(parts_z[s], zt[s], labels[s]), labels[s], normalizer)
        for s in (slice(0, 7), slice(7, 24))
    )
    total.backward()
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(parts_z.grad, full_z.grad)
    mask = labels != -100
    assert reduce_tokens(objective.per_token(z, zt, labels), mask).item() == pytest.approx(full.item())
