"""DAC-KL and the span correlation loss (arXiv 2407.10068, structure as documented in lmdistill.losses.dackl):
float64 references, invariants, gradients, the chunked path, and DAC-KL's network learning in its outer step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lmdistill.losses import ForwardKL, OuterStep, SparseTeacher, reduce_tokens
from lmdistill.losses.dackl import DACKL, SpanCorrelation
from lmdistill.losses.registry import Mixture
from tests.losses import logit_refs as ref
from tests.losses.helpers import make_inputs

logit_rows = st.integers(1, 5).flatmap(
    lambda n: st.integers(2, 9).flatmap(
        lambda v: st.tuples(*[arrays(np.float64, (n, v), elements=st.floats(-20, 20))] * 2)
    )
)


# --- DAC-KL --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,sharpness", [(1.0, 0.05), (2.0, 0.01), (0.5, 0.2)])
def test_clipped_kl_matches_the_reference(T, sharpness):
    z, zt, _ = make_inputs((14, 10), seed=1)
    g = torch.Generator().manual_seed(2)
    lower = torch.rand(14, generator=g, dtype=torch.float64) * 0.4
    upper = lower + 0.2 + torch.rand(14, generator=g, dtype=torch.float64) * (0.8 - lower)
    objective = DACKL(temperature=T, sharpness=sharpness)
    s_logp, t_logp = torch.log_softmax(z / T, -1), torch.log_softmax(zt / T, -1)
    got = objective.clipped_kl(s_logp, t_logp, lower, upper)
    want = ref.dackl_clipped_kl(z.numpy(), zt.numpy(), lower.numpy(), upper.numpy(), sharpness, T)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-13)


def _numpy_bounds(objective: DACKL, zt: np.ndarray, T: float) -> tuple[np.ndarray, np.ndarray]:
    """The documented bounds network in NumPy: top-k sorted teacher probabilities -> tanh layer -> 2 outputs."""
    state = {k: v.double().numpy() for k, v in objective.net.state_dict().items()}
    p = np.sort(ref.softmax(zt, T), axis=-1)[:, ::-1][:, : objective.n_inputs]
    x = np.pad(p, ((0, 0), (0, objective.n_inputs - p.shape[1])))
    raw = np.tanh(x @ state["0.weight"].T + state["0.bias"]) @ state["2.weight"].T + state["2.bias"]
    w = objective.min_window
    lower = (1 - w) / (1 + np.exp(-raw[:, 0]))
    upper = lower + w + (1 - lower - w) / (1 + np.exp(-raw[:, 1]))
    return lower, upper


@pytest.mark.parametrize("vocab,n_inputs", [(10, 16), (40, 8)])
def test_per_token_uses_the_networks_bounds(vocab, n_inputs):
    z, zt, labels = make_inputs((12, vocab), seed=3, ignore_every=4)
    objective = DACKL(n_inputs=n_inputs, hidden_size=5, temperature=1.5, seed=4)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a network that does something: bounds vary with the teacher
        for p in objective.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2 if p.dim() == 2 else torch.zeros(p.shape))
    lower, upper = _numpy_bounds(objective, zt.numpy(), 1.5)
    assert np.ptp(lower) > 1e-3 and np.ptp(upper) > 1e-3
    got = objective.per_token(z, zt, labels)
    want = ref.dackl_clipped_kl(z.numpy(), zt.numpy(), lower, upper, objective.sharpness, 1.5)
    want[labels.numpy() == -100] = 0.0
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_a_window_over_everything_is_forward_kl_and_bounds_respect_the_minimum_width():
    z, zt, labels = make_inputs((10, 8), seed=5, scale=1.0)
    objective = DACKL(sharpness=1e-6)
    s_logp, t_logp = torch.log_softmax(z, -1), torch.log_softmax(zt, -1)
    everything = objective.clipped_kl(s_logp, t_logp, torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64))
    torch.testing.assert_close(everything, ForwardKL().per_token(z, zt, None), rtol=1e-6, atol=1e-9)
    g = torch.Generator().manual_seed(6)
    for scale in (0.0, 3.0, 30.0):
        wild = DACKL(min_window=0.3)
        with torch.no_grad():
            for p in wild.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        lower, upper = wild.bounds(t_logp)
        assert torch.all(lower >= 0) and torch.all(upper <= 1) and torch.all(upper - lower >= 0.3 - 1e-12)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logit_rows)
def test_dackl_invariants(pair):
    z, zt = (torch.from_numpy(a) for a in pair)
    objective = DACKL(n_inputs=4, hidden_size=3)
    values = objective.per_token(z, zt, None)
    assert values.min().item() >= -1e-12
    assert objective.per_token(zt, zt, None).abs().max().item() <= 1e-12
    torch.testing.assert_close(objective.per_token(z.flip(0), zt.flip(0), None), values.flip(0))
    labels = torch.zeros(z.shape[0], dtype=torch.long)
    labels[0] = -100
    masked = objective.per_token(z, zt, labels)
    assert masked[0].item() == 0.0
    torch.testing.assert_close(masked[1:], values[1:])


def test_dackl_gradcheck_and_no_gradient_to_the_network_from_the_students_loss():
    z, zt, labels = make_inputs((4, 6), seed=7)
    objective = DACKL(n_inputs=6, hidden_size=4, sharpness=0.1)
    assert torch.autograd.gradcheck(lambda x: objective.per_token(x, zt, labels), (z.clone().requires_grad_(True),))
    leaf = z.clone().requires_grad_(True)
    objective.per_token(leaf, zt, labels).sum().backward()
    assert all(p.grad is None for p in objective.parameters())


@pytest.mark.parametrize("teacher_kind,chunk", [("logits", 1), ("logits", 7), ("hidden", 5), ("sparse", 8)])
def test_dackl_chunked_path_equals_plain(teacher_kind, chunk):
    ref.chunked_matches_plain(DACKL(n_inputs=8, hidden_size=4, temperature=1.0), teacher_kind=teacher_kind, chunk=chunk)


def _outer_step(hidden, weight, bias, teacher, labels, input_ids) -> OuterStep:
    batch = {"input_ids": input_ids, "labels": labels}
    return OuterStep(
        step=0, lr=0.1, batch=batch, student_hidden=lambda ids, mask: hidden, output_layer=(weight, bias),
        teacher_signal=lambda b: teacher.reshape(-1, teacher.shape[-1]), held_out=lambda b: None, backward=lambda loss: loss.backward(),
        mean_over_ranks=lambda t: t,
    )


def test_outer_step_gives_the_networks_gradient_and_the_network_learns():
    g = torch.Generator().manual_seed(8)
    b, length, h, v = 3, 10, 6, 16
    hidden = torch.randn(b, length, h, generator=g)
    weight, bias = torch.randn(v, h, generator=g), torch.randn(v, generator=g)
    teacher = torch.randn(b, length, v, generator=g) * 2
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[:, :2] = -100
    objective = DACKL(n_inputs=8, hidden_size=6)
    objective.outer_step(_outer_step(hidden, weight, bias, teacher, labels, torch.zeros(b, length, dtype=torch.long)),
                         chunk_rows=7)
    grads = [p.grad.clone() for p in objective.parameters()]
    for p in objective.parameters():
        p.grad = None
    logits = (hidden @ weight.T + bias).reshape(-1, v)
    objective.network_loss(logits, teacher.reshape(-1, v), labels.reshape(-1)).backward()
    for got, want in zip(grads, [p.grad for p in objective.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # a few optimizer steps on the network lower its loss (the student is fixed here)
    optimizer = torch.optim.Adam(objective.parameters(), lr=0.05)
    start = objective.network_loss(logits, teacher.reshape(-1, v), labels.reshape(-1)).item()
    for _ in range(10):
        optimizer.zero_grad()
        objective.outer_step(_outer_step(hidden, weight, bias, teacher, labels, torch.zeros(b, length, dtype=torch.long)))
        optimizer.step()
    assert objective.network_loss(logits, teacher.reshape(-1, v), labels.reshape(-1)).item() < start


def test_fixed_network_mixes_and_state_round_trips():
    z, zt, labels = make_inputs((9, 12), seed=9)
    learned = DACKL(seed=3)
    assert learned.has_outer_step and learned.parameters()
    with pytest.raises(ValueError, match="learns through its own outer step"):
        Mixture([(learned, 1.0), (ForwardKL(), 1.0)])
    fixed = DACKL(seed=3, learn_bounds=False)
    assert not fixed.has_outer_step and fixed.parameters() == []
    mix = Mixture([(fixed, 0.5), (ForwardKL(), 0.5)])
    torch.testing.assert_close(mix.per_token(z, zt, labels),
                               0.5 * fixed.per_token(z, zt, labels) + 0.5 * ForwardKL().per_token(z, zt, labels))
    other = DACKL(seed=4)
    assert not torch.allclose(other.per_token(z, zt, labels), learned.per_token(z, zt, labels))
    saved = json.loads(json.dumps(learned.state_dict()))  # the trainer keeps objective state in JSON
    other.load_state_dict(saved)
    for a, b in zip(other.net.parameters(), learned.net.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(other.per_token(z, zt, labels), learned.per_token(z, zt, labels))
    with pytest.raises(ValueError, match="dac_kl state must have the key 'net'"):
        other.load_state_dict({})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(32, 64\), this network needs \(8, 64\)"):
        DACKL(hidden_size=8).load_state_dict(saved)


def test_dackl_sparse_teacher_with_k_equal_v_is_the_dense_teacher():
    z, zt, labels = make_inputs((8, 9), seed=10)
    objective = DACKL(n_inputs=9)
    torch.testing.assert_close(objective.per_token(z, SparseTeacher.from_logits(zt, k=9), labels),
                               objective.per_token(z, zt, labels))


# --- span correlation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 2.0])
def test_span_loss_matches_the_reference(T):
    z, zt, labels = make_inputs((16, 9), seed=11, ignore_every=6)
    ids = torch.tensor([0, 0, 0, -1, 1, 1, 2, 2, 2, 2, -1, -1, 3, 3, 4, 4])
    got = SpanCorrelation(temperature=T).per_token(z, zt, labels, span_ids=ids)
    want = ref.span_correlation(z.numpy(), zt.numpy(), labels.numpy(), ids.numpy(), T)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-15)
    assert (want > 0).sum() >= 5


def test_span_default_windows_flat_and_per_sequence():
    z, zt, labels = make_inputs((2, 7, 6), seed=12)
    objective = SpanCorrelation(span_size=3)
    per_seq = objective.per_token(z, zt, labels)
    ids = np.concatenate([np.arange(7) // 3, 10 + np.arange(7) // 3])  # windows restart in each sequence
    want = ref.span_correlation(z.reshape(14, 6).numpy(), zt.reshape(14, 6).numpy(), labels.reshape(-1).numpy(), ids)
    np.testing.assert_allclose(per_seq.reshape(-1).numpy(), want, rtol=1e-10, atol=1e-15)
    flat = objective.per_token(z.reshape(14, 6), zt.reshape(14, 6), labels.reshape(-1))
    want_flat = ref.span_correlation(z.reshape(14, 6).numpy(), zt.reshape(14, 6).numpy(), labels.reshape(-1).numpy(),
                                     np.arange(14) // 3)
    np.testing.assert_allclose(flat.numpy(), want_flat, rtol=1e-10, atol=1e-15)


def test_span_gradcheck():
    z, zt, labels = make_inputs((5, 4), seed=13)
    objective = SpanCorrelation(span_size=3)
    assert torch.autograd.gradcheck(lambda x: objective.per_token(x, zt, labels), (z.clone().requires_grad_(True),))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 4).flatmap(lambda spans: st.integers(2, 6).flatmap(
    lambda v: st.tuples(*[arrays(np.float64, (3 * spans, v), elements=st.floats(-20, 20))] * 2))))
def test_span_invariants(pair):
    z, zt = (torch.from_numpy(a) for a in pair)
    objective = SpanCorrelation(span_size=3)
    values = objective.per_token(z, zt, None)
    assert values.min().item() >= 0.0
    assert objective.per_token(zt, zt, None).abs().max().item() == 0.0
    # whole spans in another order: the same per-span losses
    blocks = torch.arange(z.shape[0]).reshape(-1, 3).flip(0).reshape(-1)
    torch.testing.assert_close(objective.per_token(z[blocks], zt[blocks], None), values[blocks])
    # an ignored position breaks its pairs and nothing else
    labels = torch.zeros(z.shape[0], dtype=torch.long)
    labels[1] = -100
    masked = objective.per_token(z, zt, labels)
    assert masked[0].item() == 0.0 and masked[1].item() == 0.0
    torch.testing.assert_close(masked[3:], values[3:])


@pytest.mark.parametrize("teacher_kind,chunk", [("logits", 7), ("hidden", 1), ("sparse", 24)])
def test_span_chunked_path_equals_plain(teacher_kind, chunk):
    objective = SpanCorrelation(span_size=3, temperature=1.5)
    assert objective.batch_coupled and objective.row_group_size == 3
    ref.chunked_matches_plain(objective, teacher_kind=teacher_kind, chunk=chunk, seed=4)


def test_span_bound_to_a_batch():
    spans = torch.tensor([[0, 0, 0, -1, 1, 1], [0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 2, 2], [-1] * 6])
    batch = {"input_ids": torch.zeros(4, 6, dtype=torch.long), "spans": spans}
    objective = SpanCorrelation()
    bound = objective.for_batch(batch)
    assert bound.row_group_size == 6 and bound.batch_coupled
    z, zt, labels = make_inputs((24, 8), seed=14, ignore_every=7)
    # ids made distinct per sequence: the last span of sequence 0 and the first of sequence 1 do not pair
    ids = torch.where(spans >= 0, spans + 3 * torch.arange(4)[:, None], -1).reshape(-1)
    want = ref.span_correlation(z.numpy(), zt.numpy(), labels.numpy(), ids.numpy())
    np.testing.assert_allclose(bound.per_token(z, zt, labels).numpy(), want, rtol=1e-10, atol=1e-15)
    ref.chunked_matches_plain(bound, n=24, chunk=10, seed=5)
    windows = objective.for_batch({"input_ids": torch.zeros(4, 6, dtype=torch.long)})
    torch.testing.assert_close(windows.per_token(z, zt, labels), objective.per_token(z.reshape(4, 6, 8), zt.reshape(4, 6, 8),
                                                                                     labels.reshape(4, 6)).reshape(-1))
    with pytest.raises(ValueError, match=r"batch field 'spans' must be \[B, L\] = \[4, 6\] span ids"):
        objective.for_batch({"input_ids": torch.zeros(4, 6, dtype=torch.long), "spans": spans[:3]})
    with pytest.raises(ValueError, match=r"batch field 'spans' covers 24 rows but the logits have 12"):
        bound.per_token(z[:12], zt[:12], labels[:12])


@pytest.mark.parametrize("spec,pattern", [
    (lambda: SpanCorrelation(span_size=1), r"span_size must be an integer >= 2"),
    (lambda: DACKL(min_window=0.0), r"min_window must be a number in \(0, 1\]"),
    (lambda: DACKL(n_inputs=0), r"n_inputs must be an integer >= 1"),
    (lambda: DACKL(learn_bounds="yes"), r"learn_bounds must be true or false"),
])
def test_bad_parameters_are_refused(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        spec()


def test_reduced_losses_are_finite_with_a_padded_vocabulary():
    z, zt, labels = make_inputs((12, 10), seed=15)
    z[:, -2:] = -math.inf
    zt[:, -2:] = -math.inf
    labels = labels.clamp(max=7)
    for objective in (DACKL(n_inputs=10), SpanCorrelation()):
        leaf = z.clone().requires_grad_(True)
        loss = reduce_tokens(objective.per_token(leaf, zt, labels), labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
        np.testing.assert_allclose(
            objective.per_token(z, zt, labels).numpy(),
            objective.per_token(z[:, :-2], zt[:, :-2], labels).numpy(), rtol=1e-10, atol=1e-14)
