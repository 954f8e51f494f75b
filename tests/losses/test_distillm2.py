"""DistiLLM-2 (arXiv 2503.07067): values and gradients against a float64 reference, the beta curriculum and the
adaptive skew coefficient as state, the per-row flag, and the chunked path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lmdistill.losses import SkewKL, SkewReverseKL, reduce_tokens
from lmdistill.losses.batch_rows import RowBound
from lmdistill.losses.distillm2 import DistiLLM2
from tests.losses import logit_refs as ref
from tests.losses.helpers import make_inputs


def _objective(beta: float, **kwargs) -> DistiLLM2:
    objective = DistiLLM2(**kwargs)
    objective.beta = beta
    return objective


@pytest.mark.parametrize("beta,a1,a2,T", [(1.0, 0.1, 0.1, 1.0), (1.3, 0.2, 0.05, 2.0), (0.0, 0.0, 0.5, 1.0), (2.0, 0.1, 0.0, 1.0)])
def test_per_row_flags_value_and_gradient(beta, a1, a2, T):
    z, zt, labels = make_inputs((18, 10), seed=5, ignore_every=4)
    flags = torch.zeros(18, dtype=torch.bool)
    flags[[1, 2, 3, 7, 11, 12, 17]] = True
    objective = _objective(beta, alpha_skl=a1, alpha_srkl=a2, temperature=T)
    leaf = z.clone().requires_grad_(True)
    got = objective.per_token(leaf, zt, labels, student_generated=flags)
    want, want_grad = ref.distillm2(z.numpy(), zt.numpy(), labels.numpy(), flags.numpy(), beta, a1, a2, T)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-13)
    (grad,) = torch.autograd.grad(got.sum(), leaf)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-9, atol=1e-13)


def test_per_sequence_flags_and_3d_logits():
    z, zt, labels = make_inputs((3, 5, 8), seed=6, ignore_every=3)
    seq_flags = torch.tensor([1.0, 0.0, 1.0])  # the on-policy regime's float flags
    objective = _objective(1.2)
    got = objective.per_token(z, zt, labels, student_generated=seq_flags)
    assert got.shape == (3, 5)
    rows = seq_flags.bool().repeat_interleave(5).numpy()
    want, _ = ref.distillm2(z.reshape(15, 8).numpy(), zt.reshape(15, 8).numpy(), labels.reshape(-1).numpy(), rows, 1.2)
    np.testing.assert_allclose(got.reshape(-1).numpy(), want, rtol=1e-10, atol=1e-13)
    # the same flags given per row, or per sequence with flat logits
    flat = objective.per_token(z.reshape(15, 8), zt.reshape(15, 8), labels.reshape(-1), student_generated=seq_flags)
    torch.testing.assert_close(flat, got.reshape(-1))
    with pytest.raises(ValueError, match=r"student_generated has 4 flags; give one per row \(15\) or one per sequence"):
        objective.per_token(z, zt, labels, student_generated=torch.ones(4))


def test_each_kind_is_the_matching_skew_divergence():
    """Teacher rows are (2 - beta) * DistiLLM's skew KL; student rows have the skew reverse KL's value (their
    gradients differ: DistiLLM-2 detaches the student's share of the mixture)."""
    z, zt, labels = make_inputs((12, 9), seed=7)
    objective = _objective(1.25, alpha_skl=0.3, alpha_srkl=0.2)
    teacher_rows = objective.per_token(z, zt, labels)
    torch.testing.assert_close(teacher_rows, 0.75 * SkewKL(0.3).per_token(z, zt, labels))
    student_rows = objective.per_token(z, zt, labels, student_generated=torch.ones(12, dtype=torch.bool))
    torch.testing.assert_close(student_rows, 1.25 * SkewReverseKL(0.2).per_token(z, zt, labels))
    leaf = z.clone().requires_grad_(True)
    (detached,) = torch.autograd.grad(objective.per_token(leaf, zt, labels, student_generated=torch.ones(12)).sum(), leaf)
    (through,) = torch.autograd.grad(1.25 * SkewReverseKL(0.2).per_token(leaf, zt, labels).sum(), leaf)
    assert (detached - through).abs().max() > 1e-3


def test_teacher_rows_gradcheck():
    z, zt, labels = make_inputs((4, 5), seed=8)
    objective = _objective(0.7, alpha_skl=0.25)
    assert torch.autograd.gradcheck(lambda x: objective.per_token(x, zt, labels), (z.clone().requires_grad_(True),))


def test_beta_curriculum_and_state_round_trip():
    objective = DistiLLM2()
    assert objective.beta == 1.0
    seen = []
    for step in range(1, 11):
        objective.on_step_end(1.0, step, 10)
        seen.append(objective.beta)
    # 1 -> 1.5 linearly over the first half of training, then constant
    np.testing.assert_allclose(seen, [1.1, 1.2, 1.3, 1.4, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5])
    off = DistiLLM2(beta_end=1.0)
    off.on_step_end(1.0, 3, 10)
    assert off.beta == 1.0
    # resuming from the saved state continues identically
    a, b = DistiLLM2(beta_start=0.5, beta_end=2.0, beta_warmup=1.0), DistiLLM2(beta_start=0.5, beta_end=2.0, beta_warmup=1.0)
    for step in range(1, 4):
        a.on_step_end(1.0, step, 8)
    b.load_state_dict(a.state_dict())
    z, zt, labels = make_inputs((6, 5), seed=9)
    torch.testing.assert_close(b.per_token(z, zt, labels), a.per_token(z, zt, labels))
    for step in range(4, 9):
        a.on_step_end(1.0, step, 8)
        b.on_step_end(1.0, step, 8)
    assert a.state_dict() == b.state_dict() and a.beta == 2.0
    with pytest.raises(ValueError, match="distillm2 state must have keys"):
        b.load_state_dict({"beta": 1.0})


def test_adaptive_skew_coefficient_follows_the_sentence_gap():
    z, zt, _ = make_inputs((4, 6, 7), seed=10)
    flags = torch.tensor([0, 0, 1, 0])
    # responses as generated: the teacher's likeliest tokens, and the student's for its own sequence
    labels = torch.where(flags.bool()[:, None], z.argmax(-1), zt.argmax(-1))
    labels.reshape(-1)[::5] = -100
    objective = DistiLLM2(adaptive_alpha=True, alpha_skl=0.2, alpha_srkl=0.15)
    # before the first step: the base coefficients, and the first step's gaps become the anchors
    first = objective.per_token(z, zt, labels, student_generated=flags)
    flat_z, flat_zt, flat_labels = z.reshape(24, 7).numpy(), zt.reshape(24, 7).numpy(), labels.reshape(-1).numpy()
    rows = flags.bool().repeat_interleave(6).numpy()
    want, _ = ref.distillm2(flat_z, flat_zt, flat_labels, rows, 1.0, 0.2, 0.15)
    np.testing.assert_allclose(first.detach().reshape(-1).numpy(), want, rtol=1e-10, atol=1e-13)
    objective.on_step_end(float(first.sum()), 1, 100)
    _, gaps = ref.distillm2_alphas(flat_z, flat_zt, flat_labels, 6, 0.2, 0.0)
    state = objective.state_dict()
    assert state["anchor_teacher"] == pytest.approx(gaps[[0, 1, 3]].mean(), rel=1e-12)
    assert state["anchor_student"] == pytest.approx(-gaps[2], rel=1e-12)
    # a trained student: its gaps shrink below the anchors, so its sequences get less skew
    trained = 0.5 * z + 0.5 * zt
    got = objective.per_token(trained, zt, labels, student_generated=flags)
    t_z = trained.reshape(24, 7).numpy()
    alpha_t, _ = ref.distillm2_alphas(t_z, flat_zt, flat_labels, 6, 0.2, state["anchor_teacher"])
    alpha_s, gap_s = ref.distillm2_alphas(t_z, flat_zt, flat_labels, 6, 0.15, 0.0)
    alpha_s = np.array([min(0.15, max(0.01, 1 - 0.85 * state["anchor_student"] / (-g + 1e-5))) for g in gap_s])
    a1, a2 = np.repeat(alpha_t, 6), np.repeat(alpha_s, 6)
    want, _ = ref.distillm2(t_z, flat_zt, flat_labels, rows, objective.beta, a1, a2)
    np.testing.assert_allclose(got.detach().reshape(-1).numpy(), want, rtol=1e-10, atol=1e-13)
    assert (alpha_t[[0, 1, 3]] < 0.2).all() and alpha_s[2] < 0.15
    # evaluation (no gradients) measures nothing: a fresh objective keeps no anchors
    fresh = DistiLLM2(adaptive_alpha=True)
    with torch.no_grad():
        fresh.per_token(z, zt, labels, student_generated=flags)
    fresh.on_step_end(1.0, 1, 100)
    assert fresh.state_dict()["anchor_teacher"] is None
    with pytest.raises(ValueError, match="adaptive_alpha needs whole sequences"):
        DistiLLM2(adaptive_alpha=True).per_token(z.reshape(24, 7), zt.reshape(24, 7), labels.reshape(-1))


logit_rows = st.integers(1, 5).flatmap(
    lambda n: st.integers(2, 8).flatmap(
        lambda v: st.tuples(*[arrays(np.float64, (n, v), elements=st.floats(-20, 20))] * 2,
                            st.lists(st.booleans(), min_size=n, max_size=n))
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logit_rows, st.floats(0.0, 2.0))
def test_invariants(rows, beta):
    z, zt = (torch.from_numpy(a) for a in rows[:2])
    flags = torch.tensor(rows[2])
    objective = _objective(beta)
    values = objective.per_token(z, zt, None, student_generated=flags)
    assert values.min().item() >= -1e-12
    assert objective.per_token(zt, zt, None, student_generated=flags).abs().max().item() <= 1e-12
    perm = torch.arange(z.shape[0]).flip(0)
    torch.testing.assert_close(objective.per_token(z[perm], zt[perm], None, student_generated=flags[perm]), values[perm])
    labels = torch.zeros(z.shape[0], dtype=torch.long)
    labels[-1] = -100
    masked = objective.per_token(z, zt, labels, student_generated=flags)
    assert masked[-1].item() == 0.0
    torch.testing.assert_close(masked[:-1], values[:-1])


def _batch(flags):
    return {"input_ids": torch.zeros(len(flags), 6, dtype=torch.long), "on_policy": torch.tensor(flags, dtype=torch.float32)}


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("teacher_kind,chunk", [("logits", 5), ("hidden", 13), ("sparse", 24)])
def test_bound_to_a_batch_chunked_equals_plain(adaptive, teacher_kind, chunk):
    objective = DistiLLM2(adaptive_alpha=adaptive, temperature=1.0)
    if adaptive:  # give it anchors so the coefficients vary per sequence
        objective.load_state_dict({"beta": 1.2, "anchor_teacher": 0.01, "anchor_student": 0.02})
    bound = objective.for_batch(_batch([0, 1, 1, 0]))
    assert isinstance(bound, RowBound) and bound.name == "distillm2"
    assert bound.row_group_size == (6 if adaptive else None)
    ref.chunked_matches_plain(bound, n=24, chunk=chunk, teacher_kind=teacher_kind, seed=3)


def test_bound_objective_is_the_flagged_per_token_and_shares_state():
    objective = DistiLLM2()
    bound = objective.for_batch(_batch([1, 0]))
    z, zt, labels = make_inputs((12, 9), seed=11, ignore_every=5)
    flags = torch.tensor([1, 0]).bool().repeat_interleave(6)
    torch.testing.assert_close(bound.per_token(z, zt, labels), objective.per_token(z, zt, labels, student_generated=flags))
    torch.testing.assert_close(bound(z, zt, labels), reduce_tokens(objective.per_token(z, zt, labels, student_generated=flags), labels))
    bound.on_step_end(1.0, 5, 10)
    assert objective.beta == 1.5 and bound.state_dict() == objective.state_dict()
    # no flags in the batch: every row is teacher-generated
    plain = objective.for_batch({"input_ids": torch.zeros(2, 6, dtype=torch.long)})
    torch.testing.assert_close(plain.per_token(z, zt, labels), objective.per_token(z, zt, labels))
    with pytest.raises(ValueError, match=r"batch field 'on_policy' covers 12 rows but the logits have 10"):
        bound.per_token(z[:10], zt[:10], labels[:10])
    with pytest.raises(ValueError, match=r"'on_policy' must have one flag per sequence \(\[2\]\)"):
        objective.for_batch({"input_ids": torch.zeros(2, 6, dtype=torch.long), "on_policy": torch.ones(3)})


@pytest.mark.parametrize("spec,pattern", [
    ({"alpha_skl": 1.0}, r"alpha_skl must be a number in \[0.0, 1.0\)"),
    ({"beta_end": 2.5}, r"beta_end must be a number in \[0.0, 2.0\]"),
    ({"beta_warmup": -0.1}, r"beta_warmup must be a number in \[0.0, 1.0\]"),
    ({"adaptive_alpha": 1}, r"adaptive_alpha must be true or false"),
    ({"temperature": 0}, r"temperature must be a number > 0"),
])
def test_bad_parameters_are_refused(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        DistiLLM2(**spec)
