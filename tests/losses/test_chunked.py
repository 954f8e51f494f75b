"""The chunked fused-linear path gives the plain path's loss and gradients, in O(chunk x V) memory."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmdistill.losses import (
    ATKD,
    SinKD,
    SparseTeacher,
    TrilateralFusion,
    build_objective,
    fused_linear_distill,
    reduce_tokens,
)
from tests.losses.helpers import CASES

N, H, V, HT = 45, 8, 23, 6


def setup(seed=0, dtype=torch.float64, ignore_every=4, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7).to(dtype).requires_grad_(True)
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True) if bias else None
    t_hidden = torch.randn(N, HT, generator=g, dtype=torch.float64).to(dtype)
    t_weight = torch.randn(V, HT, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, (t_hidden, t_weight), labels


def plain(objective, hidden, weight, b, teacher_logits, labels, normalizer=None):
    logits = hidden @ weight.T
    if b is not None:
        logits = logits + b
    return reduce_tokens(objective.per_token(logits, teacher_logits, labels), labels, normalizer)


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


OBJECTIVES = [(c.id, c.build) for c in CASES] + [
    ("atkd", lambda T: ATKD(temperature=T)),
    ("sinkd", lambda T: SinKD(temperature=T, group_size=4)),
    ("tgeo", lambda T: TrilateralFusion(kd=build_objective({"name": "jsd", "beta": 0.3, "temperature": T}))),
    ("mix_kernels", lambda T: build_objective({"mix": [{"name": "forward_kl", "weight": 0.7, "temperature": T},
                                                      {"name": "skew_reverse_kl", "weight": 0.2}, {"name": "ce", "weight": 0.1}]})),
    ("mix_autograd", lambda T: build_objective({"mix": [{"name": "atkd", "weight": 0.5, "temperature": T},
                                                       {"mix": [{"name": "tvd", "weight": 1.0}, {"name": "sinkd", "weight": 1.0, "group_size": 2}]}]})),
]
OBJECTIVE_IDS = [name for name, _ in OBJECTIVES]


@pytest.mark.parametrize("name,build", OBJECTIVES, ids=OBJECTIVE_IDS)
@pytest.mark.parametrize(
    "teacher_kind,chunk", [("logits", 1), ("logits", 8), ("hidden_weight", 8), ("sparse", 8), ("hidden_weight", 64)]
)
def test_chunked_equals_plain_float64(name, build, teacher_kind, chunk):
    hidden, weight, b, (t_hidden, t_weight), labels = setup(seed=len(name))
    objective = build(1.5)
    teacher_logits = t_hidden @ t_weight.T
    if teacher_kind == "logits":
        teacher = teacher_logits
    elif teacher_kind == "hidden_weight":
        teacher = (t_hidden, t_weight)
    else:
        teacher = SparseTeacher.from_logits(teacher_logits, k=7, temperature=1.5)
        teacher_logits = teacher
    if isinstance(teacher, SparseTeacher) and _temperature_of(objective) not in (None, 1.5):
        pytest.skip("sparse teacher stored at another temperature")
    want = plain(objective, hidden, weight, b, teacher_logits, labels)
    want_grads = grads(want, [hidden, weight, b])
    got = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=chunk, student_bias=b)
    got_grads = grads(got, [hidden, weight, b])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, w in zip(got_grads, want_grads):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)


def _temperature_of(objective):
    temps = set()
    parts = getattr(objective, "parts", None)
    for o in ([p for p, _ in parts] if parts else [objective]):
        inner = getattr(o, "parts", None)
        if inner:
            temps |= {_temperature_of(o)}
        elif hasattr(o, "kd"):
            temps.add(o.kd.temperature)
        elif hasattr(o, "temperature"):
            temps.add(o.temperature)
    temps.discard(None)
    return temps.pop() if len(temps) == 1 else (None if not temps else -1)


def test_custom_normalizer_and_gradient_accumulation_are_exact():
    """Two half micro-batches with the global normaliser add up to the full batch."""
    hidden, weight, b, (t_hidden, t_weight), labels = setup(seed=3)
    objective = build_objective({"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "ce", "weight": 0.5}]})
    teacher = t_hidden @ t_weight.T
    full = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=8, student_bias=b)
    full_grads = grads(full, [hidden, weight, b])
    global_valid = int((labels != -100).sum())
    halves = [
        fused_linear_distill(hidden[s], weight, teacher[s], labels[s], objective, chunk_size=8, student_bias=b, normalizer=global_valid)
        for s in (slice(0, 20), slice(20, N))
    ]
    total = halves[0] + halves[1]
    torch.testing.assert_close(total, full)
    for a, w in zip(grads(total, [hidden, weight, b]), full_grads):
        torch.testing.assert_close(a, w)


def test_upstream_gradient_scale_and_partial_requires_grad():
    hidden, weight, b, (t_hidden, t_weight), labels = setup(seed=4, bias=False)
    objective = build_objective("reverse_kl")
    teacher = t_hidden @ t_weight.T
    want = plain(objective, hidden, weight, None, teacher, labels)
    (3.0 * want).backward()
    want_h, want_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (3.0 * fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=5)).backward()
    torch.testing.assert_close(hidden.grad, want_h)
    torch.testing.assert_close(weight.grad, want_w)
    # frozen output layer: only the hidden states get a gradient
    frozen = weight.detach()
    h = hidden.detach().requires_grad_(True)
    fused_linear_distill(h, frozen, teacher, labels, objective, chunk_size=5).backward()
    torch.testing.assert_close(h.grad, want_h / 3)
    with torch.no_grad():
        value = fused_linear_distill(hidden, weight, teacher, labels, objective)
    torch.testing.assert_close(value, want.detach())


def test_float32_and_bf16_agree_with_the_plain_path():
    hidden, weight, b, (t_hidden, t_weight), labels = setup(seed=5, dtype=torch.float32)
    objective = build_objective({"name": "jsd", "beta": 0.5, "temperature": 2.0})
    teacher = (t_hidden @ t_weight.T).bfloat16()  # a bf16 teacher with an fp32 student
    want = plain(objective, hidden, weight, b, teacher, labels)
    got = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=16, student_bias=b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, w in zip(grads(got, [hidden, weight, b]), grads(want, [hidden, weight, b])):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-6)
    # a bf16 student (output layer in bf16, loss in fp32), plain and chunked alike
    hb, wb = hidden.detach().bfloat16().requires_grad_(True), weight.detach().bfloat16().requires_grad_(True)
    want = reduce_tokens(objective.per_token(hb @ wb.T, teacher, labels), labels)
    got = fused_linear_distill(hb, wb, teacher, labels, objective, chunk_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, w in zip(grads(got, [hb, wb]), grads(want, [hb, wb])):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), w.float(), rtol=2e-2, atol=2e-3)


def test_under_bf16_autocast_matches_plain_autocast():
    hidden, weight, b, (t_hidden, t_weight), labels = setup(seed=6, dtype=torch.float32, bias=False)
    objective = build_objective("forward_kl")
    teacher = t_hidden @ t_weight.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reduce_tokens(objective.per_token(torch.nn.functional.linear(hidden, weight), teacher, labels), labels)
        got = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, w in zip(grads(got, [hidden, weight]), grads(want, [hidden, weight])):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, w, rtol=2e-2, atol=2e-3)


def test_taid_state_is_used_and_updates_between_steps():
    hidden, weight, b, (t_hidden, t_weight), labels = setup(seed=7)
    teacher = t_hidden @ t_weight.T
    objective = build_objective({"name": "taid", "alpha": 0.2})
    for step in range(1, 4):
        got = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=6, student_bias=b)
        want = plain(objective, hidden, weight, b, teacher, labels)
        torch.testing.assert_close(got, want)
        objective.on_step_end(got.item() * (1.0 - 0.1 * step), step, 10)
    assert objective.t > 0.4


def test_batch_coupled_objectives():
    hidden, weight, b, teacher_pair, labels = setup(seed=8)
    with pytest.raises(ValueError, match="couples all rows of the batch and cannot be computed in chunks"):
        fused_linear_distill(hidden, weight, teacher_pair, labels, SinKD(group_size=None))
    # a chunk size that is not a multiple of the group is rounded down to whole groups
    objective = SinKD(group_size=4)
    teacher = teacher_pair[0] @ teacher_pair[1].T
    got = fused_linear_distill(hidden, weight, teacher_pair, labels, objective, chunk_size=7, student_bias=b)
    torch.testing.assert_close(got, plain(objective, hidden, weight, b, teacher, labels))


def test_atkd_split_is_over_all_rows_not_per_chunk():
    hidden, weight, b, (t_hidden, t_weight), labels = setup(seed=9)
    teacher = t_hidden @ t_weight.T
    objective = ATKD()
    _, per_token = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=4, return_per_token=True)
    want = objective.per_token(hidden @ weight.T, teacher, labels)
    torch.testing.assert_close(per_token, want.detach())


def test_input_errors():
    hidden, weight, b, teacher_pair, labels = setup()
    objective = build_objective("forward_kl")
    with pytest.raises(ValueError, match="needs a teacher"):
        fused_linear_distill(hidden, weight, None, labels, objective)
    with pytest.raises(ValueError, match=r"teacher logits \(45, 22\) must be \[N=45, V=23\]"):
        fused_linear_distill(hidden, weight, torch.zeros(N, V - 1), labels, objective)
    with pytest.raises(ValueError, match="labels have 44 positions"):
        fused_linear_distill(hidden, weight, teacher_pair, labels[:-1], objective)
    with pytest.raises(ValueError, match=r"teacher weight \(23, 5\) must be \[V=23, H_t=6\]"):
        fused_linear_distill(hidden, weight, (teacher_pair[0], teacher_pair[1][:, :5]), labels, objective)
    with pytest.raises(TypeError, match="build_objective"):
        fused_linear_distill(hidden, weight, teacher_pair, labels, "forward_kl")
    # cross-entropy needs no teacher
    ce = build_objective("ce")
    torch.testing.assert_close(fused_linear_distill(hidden, weight, None, labels, ce), plain(ce, hidden, weight, None, None, labels))


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("spec", ["forward_kl", {"name": "jsd", "beta": 0.5}, "atkd", "taid", {"name": "sinkd", "group_size": 8}])
def test_never_materialises_the_full_logits(spec):
    """No tensor produced during forward and backward is larger than a chunk's logits or a weight."""
    g = torch.Generator().manual_seed(0)
    n, h, v, chunk = 640, 16, 400, 32
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    teacher = (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g))
    labels = torch.randint(0, v, (n,), generator=g)
    objective = build_objective(spec)
    with _LargestTensor() as mode:
        loss = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=chunk)
        loss.backward()
    assert mode.largest <= max(chunk * v, v * h, n * h) < n * v
    with _LargestTensor() as plain_mode:
        plain(objective, hidden, weight, None, teacher[0] @ teacher[1].T, labels).backward()
    assert plain_mode.largest >= n * v  # the measurement does see full logits when they exist


def test_teacher_hidden_in_bf16_with_fp32_output_layer():
    """An autocast teacher forward gives bf16 hidden states; its fp32 output layer still applies."""
    hidden, weight, b, (t_hidden, t_weight), labels = setup(seed=10, dtype=torch.float32)
    objective = build_objective("forward_kl")
    t_hidden = t_hidden.bfloat16()
    want = plain(objective, hidden, weight, b, t_hidden.float() @ t_weight.T, labels)
    got = fused_linear_distill(hidden, weight, (t_hidden, t_weight), labels, objective, chunk_size=8, student_bias=b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", ["0", "1"])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "cross_entropy"])
def test_a_non_finite_student_gives_a_non_finite_loss(name, compiled, monkeypatch):
    """Kernels treat non-finite logits as zero-probability rows; the chunked path must still report the loss as
    non-finite, so a diverged student cannot look like a loss of 0."""
    monkeypatch.setenv("LMDISTILL_COMPILE", compiled)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 8, generator=gen)
    weight = torch.randn(40, 8, generator=gen)
    teacher = torch.randn(12, 40, generator=gen)
    labels = torch.randint(0, 40, (12,), generator=gen)
    objective = build_objective(name)
    assert torch.isfinite(fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=5))
    broken = weight.clone()
    broken[3, 2] = float("nan")
    assert not torch.isfinite(fused_linear_distill(hidden, broken, teacher, labels, objective, chunk_size=5))
    hidden[4, 1] = float("inf")
    assert not torch.isfinite(fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=5))
