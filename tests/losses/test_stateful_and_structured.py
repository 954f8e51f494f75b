"""TAID's schedule, ATKD's split and weights, SinKD against POT and the reference algorithm."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.losses import ATKD, TAID, SinKD, reduce_tokens, sinkhorn_log_plan
from tests.losses import reference as ref
from tests.losses.helpers import make_inputs, to_np

# --- TAID ----------------------------------------------------------------------------------------------------

def reference_taid_schedule(losses, total, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """The update rule of arXiv 2501.16937 / SakanaAI/TAID, written out step by step."""
    t, prev, m, ts = t_start, None, 0.0, []
    for step, loss in enumerate(losses, start=1):
        if prev is not None:
            rel = (prev - loss) / (prev + 1e-15)
            m = beta * m + (1 - beta) * rel
            delta = alpha * (1 / (1 + math.exp(-m))) * (1 - t)
            t = min(t_end, max(t_start + (t_end - t_start) * step / total, t + delta))
        prev = loss
        ts.append(t)
    return ts


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.01, 10.0), min_size=1, max_size=60), st.integers(1, 200), st.floats(0.0, 0.9), st.floats(0.0, 0.05))
def test_taid_schedule_follows_the_update_rule(losses, total, t_start, alpha):
    objective = TAID(t_start=t_start, alpha=alpha)
    got = []
    for step, loss in enumerate(losses, start=1):
        objective.on_step_end(loss, step, total)
        got.append(objective.t)
    want = reference_taid_schedule(losses, total, t_start=t_start, alpha=alpha)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert all(b >= a for a, b in zip(got, got[1:])) and got[-1] <= 1.0


def test_taid_adaptive_step_outpaces_the_linear_floor_when_loss_falls():
    fast = TAID(alpha=0.05)
    for step in range(1, 51):
        fast.on_step_end(10.0 * 0.9**step, step, 1000)
    assert fast.t > 0.4 + 0.6 * 50 / 1000 + 0.01  # clearly above the linear schedule
    linear = TAID(adaptive=False)
    for step in range(1, 51):
        linear.on_step_end(10.0 * 0.9**step, step, 1000)
    assert linear.t == pytest.approx(0.4 + 0.6 * 50 / 1000)


def test_taid_state_round_trip_continues_identically():
    a = TAID(alpha=0.01)
    losses = [5.0, 4.0, 3.5, 3.6, 3.0, 2.9, 2.5]
    for step, loss in enumerate(losses[:4], start=1):
        a.on_step_end(loss, step, 20)
    b = TAID(alpha=0.01)
    b.load_state_dict(a.state_dict())
    for step, loss in enumerate(losses[4:], start=5):
        a.on_step_end(loss, step, 20)
        b.on_step_end(loss, step, 20)
        assert a.state_dict() == b.state_dict()
    z, zt, labels = make_inputs((4, 7))
    torch.testing.assert_close(a.per_token(z, zt, labels), b.per_token(z, zt, labels))
    with pytest.raises(ValueError, match="TAID state must have keys"):
        b.load_state_dict({"t": 0.5})


def test_taid_target_moves_from_student_to_teacher():
    z, zt, labels = make_inputs((6, 9), seed=1)
    objective = TAID()
    objective.t = 0.0
    assert objective.per_token(z, zt, labels).abs().max() < 1e-12  # target = the student itself
    objective.t = 1.0
    torch.testing.assert_close(objective.per_token(z, zt, labels), torch.from_numpy(ref.forward_kl(to_np(z), to_np(zt))))


# --- ATKD ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hard_fraction,lam,T", [(0.5, 0.2, 1.0), (0.3, 0.5, 2.0), (1.0, 0.2, 1.0), (0.0, 0.7, 1.0)])
@pytest.mark.parametrize("shape,ignore", [((20, 11), 0), ((33, 7), 4), ((3, 5, 8), 3)])
def test_atkd_matches_the_paper_formula(hard_fraction, lam, T, shape, ignore):
    z, zt, labels = make_inputs(shape, seed=13, ignore_every=ignore)
    objective = ATKD(hard_fraction=hard_fraction, easy_weight=lam, temperature=T)
    per_token = objective.per_token(z, zt, labels)
    loss = reduce_tokens(per_token, labels)
    want, tkd, dkd, hard = ref.atkd(to_np(z), to_np(zt), labels.reshape(-1).numpy(), hard_fraction, lam, T)
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    # the per-token contributions are the group terms scaled by n_valid / group size
    flat = per_token.reshape(-1).numpy()
    valid = labels.reshape(-1).numpy() != -100
    n_valid, n_hard = valid.sum(), hard.sum()
    for i in np.flatnonzero(valid):
        expected = (1 - lam) * n_valid / n_hard * (tkd[i] + dkd[i]) if hard[i] else lam * n_valid / (n_valid - n_hard) * dkd[i]
        assert flat[i] == pytest.approx(expected, rel=1e-10, abs=1e-13)


def test_atkd_hard_tokens_are_the_most_uncertain():
    z, zt, labels = make_inputs((40, 9), seed=2)
    split = ATKD().batch_context(lambda: [(0, 40, zt)], labels, 9)
    p_gold = torch.softmax(zt, -1).gather(-1, labels[:, None]).squeeze(-1)
    uncertainty = 1 - p_gold
    assert split.n_hard == 20
    assert uncertainty[split.hard].min() >= uncertainty[~split.hard].max()


# --- SinKD ---------------------------------------------------------------------------------------------------

def test_sinkhorn_plan_converges_to_pot():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(7, 7, generator=g, dtype=torch.float64) * 2
    a = torch.full((7,), 1 / 7, dtype=torch.float64)
    plan = sinkhorn_log_plan(cost[None], a.log()[None], a.log()[None], 0.1, 3000)[0].exp()
    pot_plan = ot.sinkhorn(a.numpy(), a.numpy(), cost.numpy(), reg=0.1, numItermax=100000, stopThr=1e-14)
    np.testing.assert_allclose(plan.numpy(), pot_plan, atol=1e-10)
    assert float((plan * cost).sum()) == pytest.approx(float(ot.sinkhorn2(a.numpy(), a.numpy(), cost.numpy(), reg=0.1, numItermax=100000, stopThr=1e-14)), rel=1e-9)


@pytest.mark.parametrize("T,eps,iters", [(2.0, 0.1, 20), (1.0, 0.05, 10), (4.0, 0.5, 5)])
def test_sinkd_equals_the_reference_algorithm_rescaled(T, eps, iters):
    """Our plan has marginals 1/B; the reference code's has marginals 1: value_ref = B * ours."""
    z, zt, labels = make_inputs((12, 30), seed=5)
    loss = reduce_tokens(SinKD(T, eps, iters, group_size=None).per_token(z, zt, labels), labels)
    reference = ref.sinkhorn_reference_loop(ref.softmax(to_np(z), T), ref.softmax(to_np(zt), T), eps, iters)
    assert 12 * loss.item() == pytest.approx(reference, rel=1e-10)


def test_sinkd_groups_ignored_rows_and_pot_at_convergence():
    z, zt, labels = make_inputs((10, 15), seed=6, ignore_every=3)
    objective = SinKD(temperature=1.0, epsilon=0.2, iterations=4000, group_size=5)
    per_token = objective.per_token(z, zt, labels)
    assert torch.all(per_token[labels == -100] == 0)
    ps, pt = ref.softmax(to_np(z)), ref.softmax(to_np(zt))
    total, count = 0.0, 0
    for start in (0, 5):
        rows = [i for i in range(start, start + 5) if labels[i] != -100]
        cost = np.abs(ps[rows][:, None] - pt[rows][None]).sum(-1)
        a = np.full(len(rows), 1 / len(rows))
        group_loss = ot.sinkhorn2(a, a, cost, reg=0.2, numItermax=100000, stopThr=1e-14)
        assert per_token[rows].mean().item() == pytest.approx(float(group_loss), rel=1e-8)
        total += len(rows) * float(group_loss)
        count += len(rows)
    assert reduce_tokens(per_token, labels).item() == pytest.approx(total / count, rel=1e-8)


def test_sinkd_gradient_flows_through_the_plan():
    z, zt, labels = make_inputs((6, 5), seed=8)
    objective = SinKD(temperature=1.0, epsilon=0.3, iterations=15, group_size=3)
    z = z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: objective.per_token(x, zt, labels), (z,), eps=1e-6, atol=1e-7)
    # identical student and teacher: the entropic plan concentrates on the zero-cost diagonal as eps -> 0
    sharp = SinKD(temperature=1.0, epsilon=0.01, iterations=300, group_size=3)
    assert sharp.per_token(zt, zt, labels).max().item() < 1e-3
    assert objective.per_token(zt, zt, labels).mean() < objective.per_token(z.detach(), zt, labels).mean()


@settings(max_examples=25, deadline=None)
@given(st.permutations(range(8)), st.integers(0, 2**16))
def test_sinkd_cannot_tell_which_row_predicts_which_distribution(order, seed):
    """Why SinKD is never trained alone (the reference code always adds it to the task loss): with uniform
    marginals the transport cost of a block is the same whichever student row predicts which of the teacher's
    distributions, so a student that gives every position the teacher's distribution of another position in its
    block scores exactly as the student that copies the teacher, while forward KL tells them apart."""
    _, teacher_logits, labels = make_inputs((8, 40), seed=seed)
    shuffled = teacher_logits[list(order)]
    objective = SinKD(group_size=8)
    copied = reduce_tokens(objective.per_token(teacher_logits, teacher_logits, labels), labels).item()
    moved = reduce_tokens(objective.per_token(shuffled, teacher_logits, labels), labels).item()
    assert moved == pytest.approx(copied, rel=1e-9, abs=1e-12)
    if list(order) != sorted(order):
        forward_kl = ref.forward_kl(to_np(shuffled), to_np(teacher_logits)).mean()
        assert forward_kl > 1e-3


@pytest.mark.parametrize("variant", ["plain", "masked", "confident_teacher", "padded_vocab"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_atkd_chunk_kernel_matches_autograd(variant, T):
    from lmdistill.losses.core import Workspace

    z, zt, labels = make_inputs((16, 12), seed=31, ignore_every=3 if variant == "masked" else 0)
    if variant == "confident_teacher":  # gold probabilities close to 1: the masked log-sum-exp branch
        zt[torch.arange(16), labels.clamp(min=0)] += 25.0
        z[torch.arange(16), labels.clamp(min=0)] += 12.0
    if variant == "padded_vocab":
        z[:, -2:] = -math.inf
        zt[:, -2:] = -math.inf
        labels = labels.clamp(max=9)
    objective = ATKD(temperature=T)
    ws = Workspace(16, 12, torch.float64, torch.device("cpu"))
    ws.start_chunk(16)
    loss, grad = objective.chunk_value_and_grad(z.clone(), zt, labels, ws)
    leaf = z.clone().requires_grad_(True)
    want = objective.per_token(leaf, zt, labels)
    (want_grad,) = torch.autograd.grad(want.sum(), leaf)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-8, atol=1e-12)
