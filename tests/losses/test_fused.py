"""The compiled dense-teacher kernels (lmdistill.losses.fused) against the float64 plain path, and their
fallbacks. Each kernel is compiled once per shape, so the cases share one shape and one temperature."""

from __future__ import annotations

import logging

import pytest
import torch

from lmdistill.losses import build_objective, fused_linear_distill, reduce_tokens
from lmdistill.losses import atkd, core, fused, sinkd, taid
from lmdistill.losses.core import Workspace
from tests.losses.helpers import variant_inputs

ROWS, VOCAB, T = 24, 96, 2.0

SPECS = {
    "forward_kl": {"name": "forward_kl"},
    "reverse_kl": {"name": "reverse_kl"},
    "jsd": {"name": "jsd", "beta": 0.3},
    "tvd": {"name": "tvd"},
    "skew_kl": {"name": "skew_kl", "alpha": 0.1},
    "skew_reverse_kl": {"name": "skew_reverse_kl", "alpha": 0.2},
}


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv(fused.ENV_VAR, "1")
    monkeypatch.setattr(fused, "_failed", set())


def assert_as_close_as_eager(got, eager, exact):
    """float32 rounding of large log-ratios is the floor: the compiled (loss, grad) may be off the float64
    values by at most 4x the eager float32 kernel's error on the same rows (+ 1e-6 relative)."""
    for got_t, eager_t, exact_t in zip(got, eager, exact):
        err = float((got_t.double() - exact_t).abs().max())
        eager_err = float((eager_t.double() - exact_t).abs().max())
        assert err <= 4 * eager_err + 1e-6 * max(1.0, float(exact_t.abs().max())), (err, eager_err)


def spy_on(mp, module, names, calls):
    """Replace ``module.<name>`` for each name by a wrapper recording ``(name, ran)``, ``ran`` = not None."""
    for name in names:
        def wrapper(*args, _name=name, _fn=getattr(module, name)):
            result = _fn(*args)
            calls.append((_name, result is not None))
            return result
        mp.setattr(module, name, wrapper)


def reference(objective, z, zt, labels):
    """per_token in float64 on the same (float32-representable) values, and its autograd gradient."""
    leaf = z.double().requires_grad_(True)
    want = objective.per_token(leaf, zt.double(), labels)
    (grad,) = torch.autograd.grad(want.sum(), leaf)
    return want.detach(), grad


@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("variant", ["plain", "padded_vocab", "peaked", "equal"])
def test_compiled_kernel_matches_float64(compiled, kind, variant):
    """Loss and gradient of every compiled kernel equal the float64 plain path: random logits, -inf vocabulary
    padding (0 log 0 = 0), peaked rows (x10 logits) and student == teacher (exactly 0 loss)."""
    z, zt, labels = variant_inputs((ROWS, VOCAB), "plain" if variant == "equal" else variant, seed=5, ignore_every=3, pad=7)
    if variant == "equal":
        zt = z.clone()
    labels[::4] = -100
    z, zt = z.float(), zt.float()
    objective = build_objective({**SPECS[kind], "temperature": T, "scale_by_t2": True})
    spec = objective.fused_spec()
    assert spec[0] == kind
    raw = fused.fused_dense_chunk(spec[0], z, zt, T, torch.empty_like(z), *spec[1])
    assert raw is not None, "the compiled kernel did not run"
    ws = Workspace(ROWS, VOCAB, torch.float32, torch.device("cpu"))
    ws.start_chunk(ROWS)
    loss, grad = (x.clone() for x in objective.chunk_value_and_grad(z.clone(), zt, labels, ws))  # ws buffers
    want, want_grad = reference(objective, z, zt, labels)
    ws.start_chunk(ROWS)
    eager = objective.eager_chunk(z.clone(), zt, labels, ws)
    assert_as_close_as_eager((loss, grad), eager, (want, want_grad))
    assert torch.isfinite(grad).all() and torch.isfinite(loss).all()
    if variant == "equal":
        assert float(loss.abs().max()) <= 1e-6


@pytest.mark.parametrize("t", [0.4, 1.0])
def test_taid_uses_the_forward_kl_kernel_on_the_interpolated_logits(compiled, t):
    """TAID (form kl) at t in (0, 1]: the compiled forward KL to (1 - t) z + t z_T equals the float64 plain
    path, whose target is the log-softmax interpolation (row constants cancel)."""
    z, zt, labels = variant_inputs((ROWS, VOCAB), "plain", seed=13, ignore_every=3, pad=0)
    z, zt = z.float(), zt.float()
    objective = build_objective({"name": "taid", "temperature": T})
    objective.t = t
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        spy_on(mp, taid, ["fused_dense_chunk"], calls)
        ws = Workspace(ROWS, VOCAB, torch.float32, torch.device("cpu"))
        ws.start_chunk(ROWS)
        loss, grad = objective.chunk_value_and_grad(z.clone(), zt, labels, ws)
    assert calls == [("fused_dense_chunk", True)]
    want, want_grad = reference(objective, z, zt, labels)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_bf16_teacher_is_upcast_before_the_temperature(compiled):
    """A bf16 teacher goes through the compiled kernel as its exact float32 values: same result as float32."""
    z, zt, labels = variant_inputs((ROWS, VOCAB), "plain", seed=9, ignore_every=0, pad=0)
    z, zt16 = z.float(), zt.to(torch.bfloat16)
    got_loss, got_grad = fused.fused_dense_chunk("forward_kl", z, zt16, T, torch.empty_like(z))
    want_loss, want_grad = fused.fused_dense_chunk("forward_kl", z, zt16.float(), T, torch.empty_like(z))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-8)
    assert float(got_loss.min()) >= -1e-6


def test_chunked_path_with_compiled_kernels_equals_float64_plain(compiled):
    """fused_linear_distill over several chunks (a partial last one: a second, dynamic-rows compile) with a
    (hidden, weight, bias) teacher, as low-rank caches give it, equals the float64 plain loss and gradients."""
    g = torch.Generator().manual_seed(3)
    n, h, ht = 70, 16, 8
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(VOCAB, h, generator=g) * 0.5
    teacher = (torch.randn(n, ht, generator=g), torch.randn(VOCAB, ht, generator=g), torch.randn(VOCAB, generator=g))
    labels = torch.randint(0, VOCAB, (n,), generator=g)
    labels[::5] = -100
    objective = build_objective({"name": "forward_kl", "temperature": T})
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        spy_on(mp, core, ["fused_dense_chunk"], calls)
        h32 = hidden.clone().requires_grad_(True)
        w32 = weight.clone().requires_grad_(True)
        loss = fused_linear_distill(h32, w32, teacher, labels, objective, chunk_size=32)
        loss.backward()
    assert calls == [("fused_dense_chunk", True)] * 3
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    t_logits = teacher[0].double() @ teacher[1].double().T + teacher[2].double()
    want = reduce_tokens(objective.per_token(h64 @ w64.T, t_logits, labels), labels)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w32.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_not_used_when_switched_off_or_not_applicable(monkeypatch):
    z, zt, _ = variant_inputs((4, 8), "plain", seed=1, ignore_every=0, pad=0)
    monkeypatch.setenv(fused.ENV_VAR, "0")
    assert fused.fused_dense_chunk("forward_kl", z.float(), zt.float(), 1.0, torch.empty_like(z.float())) is None
    monkeypatch.setenv(fused.ENV_VAR, "1")
    assert fused.fused_dense_chunk("forward_kl", z, zt, 1.0, torch.empty_like(z)) is None  # float64 work: the eager kernels


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    """Without a working compiler the eager kernel runs (same values) and one warning names the switch."""
    monkeypatch.setenv(fused.ENV_VAR, "1")
    monkeypatch.setattr(fused, "_failed", set())
    monkeypatch.setattr(fused, "_compiled", {})

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    z, zt, labels = variant_inputs((ROWS, VOCAB), "plain", seed=2, ignore_every=3, pad=0)
    z, zt = z.float(), zt.float()
    objective = build_objective({"name": "reverse_kl", "temperature": T})
    ws = Workspace(ROWS, VOCAB, torch.float32, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="lmdistill.losses.fused"):
        for _ in range(2):
            ws.start_chunk(ROWS)
            loss, grad = objective.chunk_value_and_grad(z.clone(), zt, labels, ws)
    warnings = [r for r in caplog.records if "LMDISTILL_COMPILE" in r.getMessage()]
    assert len(warnings) == 1 and "reverse_kl" in warnings[0].getMessage()
    want, want_grad = reference(objective, z, zt, labels)
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rows", [24, 20])
def test_sinkd_compiled_costs_match_float64(compiled, rows):
    """SinKD's chunk with the compiled L1 cost and its gradient (whole blocks, and a padded last block)
    equals the float64 plain path through cdist."""
    z, zt, labels = variant_inputs((rows, VOCAB), "plain", seed=17, ignore_every=5, pad=0)
    z, zt = z.float(), zt.float()
    objective = build_objective({"name": "sinkd", "temperature": T, "group_size": 8, "iterations": 10})
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        spy_on(mp, sinkd, ["fused_l1_cost", "fused_l1_cost_grad"], calls)
        ws = Workspace(rows, VOCAB, torch.float32, torch.device("cpu"))
        ws.start_chunk(rows)
        loss, grad = objective.chunk_value_and_grad(z.clone(), zt, labels, ws)
    assert calls == [("fused_l1_cost", True), ("fused_l1_cost_grad", True)]
    want, want_grad = reference(objective, z, zt, labels)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("variant", ["plain", "padded_vocab", "gold_near_one", "gold_certain"])
def test_atkd_compiled_kernels_match_float64(compiled, variant):
    """ATKD's chunk with the compiled passes equals the float64 plain path, including rows whose gold
    probability is within 1e-4 of 1 and rows whose non-gold probabilities underflow float32."""
    z, zt, labels = variant_inputs((ROWS, VOCAB), "padded_vocab" if variant == "padded_vocab" else "plain", seed=23,
                                   ignore_every=5, pad=6)
    rows = torch.arange(0, ROWS, 3)
    if variant == "gold_near_one":
        z[rows, labels[rows]] += 8.0 * T
        zt[rows, labels[rows]] += 14.0 * T
    if variant == "gold_certain":
        z[rows, labels[rows]] += 400.0 * T
        zt[rows, labels[rows]] += 800.0 * T
    z, zt = z.float(), zt.float()
    objective = build_objective({"name": "atkd", "temperature": T})
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        spy_on(mp, atkd, ["fused_gold_log_prob", "fused_atkd_rows", "fused_atkd_grad"], calls)
        ws = Workspace(ROWS, VOCAB, torch.float32, torch.device("cpu"))
        ws.start_chunk(ROWS)
        loss, grad = (x.clone() for x in objective.chunk_value_and_grad(z.clone(), zt, labels, ws))
    # the split, then the chunk, all compiled
    assert calls == [("fused_gold_log_prob", True), ("fused_atkd_rows", True), ("fused_atkd_grad", True)]
    want, want_grad = reference(objective, z, zt, labels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(fused.ENV_VAR, "0")
        ws.start_chunk(ROWS)
        eager = objective.chunk_value_and_grad(z.clone(), zt, labels, ws)
    assert_as_close_as_eager((loss, grad), eager, (want, want_grad))
    assert torch.isfinite(grad).all()
