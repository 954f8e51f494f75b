"""Soft-capped and scaled logits on the chunked path: the same loss and gradients as the plain path.

The chunked path rebuilds ``cap * tanh(scale * (h W^T + b) / cap)`` per chunk for the student
(``fused_linear_distill(student_softcap=, student_scale=)``) and for the teacher (``HiddenStates.softcap/scale``);
these tests compare it with the plain path (the transform applied to the full logits, autograd through it) in
float64, with an independent forward-KL reference from the formula, and on real tiny Gemma 2 models.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.losses import HiddenStates, build_objective, fused_linear_distill, reduce_tokens
from lmdistill.models.families import build_family_model
from lmdistill.models.heads import LogitTransform, linear_head_mismatch, logit_transform
from tests.losses.helpers import CASES

N, H, V, HT = 29, 6, 19, 5


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(True)
    t_hidden = torch.randn(N, HT, generator=g, dtype=torch.float64) * 2
    t_weight = torch.randn(V, HT, generator=g, dtype=torch.float64)
    t_bias = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    return hidden, weight, bias, (t_hidden, t_weight, t_bias), labels


def _capped(z: torch.Tensor, cap: float | None, scale: float) -> torch.Tensor:
    z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("s_cap,s_scale,t_cap,t_scale", [(2.0, 1.0, None, 1.0), (None, 0.3, 1.5, 1.0),
                                                         (1.2, 2.5, 0.8, 0.5)])
def test_chunked_equals_plain_with_transforms_float64(case, s_cap, s_scale, t_cap, t_scale):
    hidden, weight, bias, (th, tw, tb), labels = _inputs(seed=len(case.id))
    objective = case.build(1.3)
    teacher_logits = _capped(th @ tw.T + tb, t_cap, t_scale)
    want = reduce_tokens(objective.per_token(_capped(hidden @ weight.T + bias, s_cap, s_scale), teacher_logits, labels), labels)
    want_grads = _grads(want, [hidden, weight, bias])
    got = fused_linear_distill(hidden, weight, HiddenStates(th, tw, tb, softcap=t_cap, scale=t_scale), labels, objective,
                               chunk_size=7, student_bias=bias, student_softcap=s_cap, student_scale=s_scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, w in zip(_grads(got, [hidden, weight, bias]), want_grads):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)


def test_forward_kl_against_the_formula():
    """KL(p || q) with both distributions softmaxes of soft-capped logits, written out in float64, and its
    gradient by central finite differences on the student's output weight."""
    hidden, weight, bias, (th, tw, tb), labels = _inputs(seed=3)
    labels = torch.zeros_like(labels)  # every position counts
    cap_s, cap_t, temperature = 1.7, 0.9, 2.0

    hd, bd = hidden.detach(), bias.detach()

    def reference(w: torch.Tensor) -> float:
        total = 0.0
        for i in range(N):
            zs = [cap_s * math.tanh(float(hd[i] @ w[v] + bd[v]) / cap_s) / temperature for v in range(V)]
            zt = [cap_t * math.tanh(float(th[i] @ tw[v] + tb[v]) / cap_t) / temperature for v in range(V)]
            ls, lt = math.log(sum(math.exp(x) for x in zs)), math.log(sum(math.exp(x) for x in zt))
            total += sum(math.exp(zt[v] - lt) * ((zt[v] - lt) - (zs[v] - ls)) for v in range(V))
        return total / N  # no T^2 factor: ForwardKL.scale_by_t2 is off by default

    objective = build_objective({"name": "forward_kl", "temperature": temperature})
    got = fused_linear_distill(hidden, weight, HiddenStates(th, tw, tb, softcap=cap_t), labels, objective,
                               chunk_size=4, student_bias=bias, student_softcap=cap_s)
    w0 = weight.detach()
    assert float(got.detach()) == pytest.approx(reference(w0), rel=1e-10)
    (grad_w,) = _grads(got, [weight])
    eps = 1e-6
    for v, j in [(0, 0), (7, 3), (18, 5)]:
        bumped_up, bumped_down = w0.clone(), w0.clone()
        bumped_up[v, j] += eps
        bumped_down[v, j] -= eps
        numeric = (reference(bumped_up) - reference(bumped_down)) / (2 * eps)
        assert float(grad_w[v, j]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(cap=st.one_of(st.none(), st.floats(0.2, 20.0)), scale=st.floats(0.1, 4.0), chunk=st.integers(1, N + 3),
       seed=st.integers(0, 1000))
def test_chunk_size_never_changes_a_transformed_loss(cap, scale, chunk, seed):
    hidden, weight, bias, (th, tw, tb), labels = _inputs(seed)
    objective = build_objective({"name": "jsd", "beta": 0.4})
    teacher = HiddenStates(th, tw, tb, softcap=cap, scale=scale)

    def run(size):
        loss = fused_linear_distill(hidden, weight, teacher, labels, objective, chunk_size=size, student_bias=bias,
                                    student_softcap=cap, student_scale=scale)
        return loss, _grads(loss, [hidden, weight, bias])

    (a, ga), (b, gb) = run(chunk), run(N)
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)


def test_transform_of_the_teacher_is_not_ignored():
    """A soft-capped teacher signal gives a different loss from the same signal without its cap (the fields are
    read), and equals the plain path on the capped logits."""
    hidden, weight, bias, (th, tw, tb), labels = _inputs(seed=11)
    objective = build_objective("forward_kl")
    capped = fused_linear_distill(hidden, weight, HiddenStates(th, tw, tb, softcap=0.5), labels, objective, student_bias=bias)
    plain = fused_linear_distill(hidden, weight, HiddenStates(th, tw, tb), labels, objective, student_bias=bias)
    dense = fused_linear_distill(hidden, weight, 0.5 * torch.tanh((th @ tw.T + tb) / 0.5), labels, objective,
                                 student_bias=bias)
    assert abs(float(capped.detach()) - float(plain.detach())) > 1e-3
    torch.testing.assert_close(capped, dense, rtol=1e-12, atol=1e-12)


def test_bad_transform_arguments_are_refused():
    hidden, weight, bias, (th, tw, tb), labels = _inputs(seed=0)
    objective = build_objective("forward_kl")
    with pytest.raises(ValueError, match="student_softcap must be a positive"):
        fused_linear_distill(hidden, weight, (th, tw), labels, objective, student_softcap=0.0)
    with pytest.raises(ValueError, match="student_scale must be a finite nonzero"):
        fused_linear_distill(hidden, weight, (th, tw), labels, objective, student_scale=float("nan"))
    with pytest.raises(ValueError, match="softcap must be a positive"):
        LogitTransform(softcap=-1.0)


# ------------------------------------------------------------------------------------ real tiny Gemma 2 models
@pytest.fixture(scope="module")
def gemma_pair(small_tokenizer):
    """A float64 Gemma 2 student and teacher with caps small enough that tanh bends their logits."""
    student = build_family_model("gemma2", small_tokenizer, seed=1, dtype=torch.float64, hidden=32, heads=2,
                                 overrides={"final_logit_softcapping": 0.08})
    teacher = build_family_model("gemma2", small_tokenizer, seed=2, dtype=torch.float64, hidden=48, heads=4,
                                 overrides={"final_logit_softcapping": 0.05}).eval()
    return student, teacher


def test_gemma2_chunked_equals_plain_from_hidden_states(gemma_pair, small_tokenizer, kjv_verses):
    student, teacher = gemma_pair
    text = " ".join(v for _, v in kjv_verses[:4])
    ids = torch.tensor([small_tokenizer.encode(text)[:40]])
    labels = torch.cat([ids[0, 1:], torch.tensor([-100])])
    objective = build_objective({"name": "jsd", "beta": 0.5, "temperature": 1.0})
    s_t, t_t = logit_transform(student.config), logit_transform(teacher.config)
    assert s_t == LogitTransform(softcap=0.08) and t_t == LogitTransform(softcap=0.05)

    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits[0]
        teacher_hidden = teacher.base_model(input_ids=ids).last_hidden_state[0]
    raw = teacher_hidden @ teacher.get_output_embeddings().weight.T
    assert (raw - teacher_logits).abs().max() > 1e-3  # the cap really changes the logits here

    params = [p for p in student.parameters() if p.requires_grad]
    want = reduce_tokens(objective.per_token(student(input_ids=ids).logits[0], teacher_logits, labels), labels)
    want_grads = _grads(want, params)
    out = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    head = student.get_output_embeddings()
    signal = HiddenStates(teacher_hidden, teacher.get_output_embeddings().weight, None, softcap=t_t.softcap, scale=t_t.scale)
    got = fused_linear_distill(out.hidden_states[-1][0], head.weight, signal, labels, objective, chunk_size=16,
                               student_softcap=s_t.softcap, student_scale=s_t.scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, w in zip(_grads(got, params), want_grads):
        torch.testing.assert_close(a, w, rtol=1e-8, atol=1e-12)

    # without the student's transform the chunked path computes something else: the probe must be needed
    bare = fused_linear_distill(out.hidden_states[-1][0].detach(), head.weight.detach(), signal, labels, objective)
    assert abs(float(bare) - float(want.detach())) > 1e-4


def test_probe_accepts_known_transforms_and_refuses_others(gemma_pair, small_tokenizer):
    student, _ = gemma_pair
    ids = torch.tensor([small_tokenizer.encode("In the beginning God created the heaven")])

    def hidden_of(m):
        return m(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]

    assert "final_logit_softcapping" in linear_head_mismatch(student, ids, hidden_of)  # default: refused, as before
    assert linear_head_mismatch(student, ids, hidden_of, allow_transform=True) is None
    # a post-processing no config field announces is caught by the probe
    handle = student.get_output_embeddings().register_forward_hook(lambda mod, args, out: out + 0.01)
    try:
        why = linear_head_mismatch(student, ids, hidden_of, allow_transform=True)
    finally:
        handle.remove()
    assert why is not None and "soft-capped at 0.08" in why


@pytest.mark.parametrize("model_type,fields,scale", [
    ("granite", {"logits_scaling": 4.0}, 0.25),  # GraniteForCausalLM divides
    ("cohere", {"logit_scale": 0.0625}, 0.0625),  # CohereForCausalLM multiplies
])
def test_scaled_families_match_their_models(model_type, fields, scale, small_tokenizer):
    """The scale's direction is checked against the real transformers model of each family."""
    import transformers

    config_class = transformers.AutoConfig.for_model(model_type).__class__
    cfg = config_class(vocab_size=len(small_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=small_tokenizer.pad_token_id,
                       bos_token_id=small_tokenizer.eos_token_id, eos_token_id=small_tokenizer.eos_token_id, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).double()
    assert logit_transform(model.config) == LogitTransform(scale=scale)
    ids = torch.tensor([small_tokenizer.encode("And God said, Let there be light")])
    assert linear_head_mismatch(
        model, ids, lambda m: m(input_ids=ids, output_hidden_states=True).hidden_states[-1], allow_transform=True
    ) is None


def test_unknown_post_processing_keeps_the_plain_path(small_tokenizer):
    student = build_family_model("llama", small_tokenizer, overrides={"mlp_bias": False})
    student.config.mup_width_multiplier = 2.0
    assert logit_transform(student.config) is None
    ids = torch.tensor([[1, 2, 3]])
    why = linear_head_mismatch(student, ids, lambda m: m.base_model(input_ids=ids).last_hidden_state, allow_transform=True)
    assert "mup_width_multiplier" in why and "does not rebuild" in why
