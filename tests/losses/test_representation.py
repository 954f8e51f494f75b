"""Representation losses against float64 references written from their papers' formulas, their invariants,
gradients, exact resume of the learned projection, and their use on real models and across tokenizers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lmdistill.data.tokenizer import train_bpe_tokenizer
from lmdistill.errors import ConfigError
from lmdistill.losses import ForwardKL, reduce_tokens
from lmdistill.losses.alignment import CrossTokenizerBatcher, align_spans
from lmdistill.losses.representation import (
    ClassMeans,
    HiddenProjection,
    HiddenStateKD,
    attention_relation_kd,
    attention_relations,
    hidden_cosine,
    hidden_mse,
    knn_bandwidth,
    knn_gaussian_graph,
    nd_loss,
    qkv_capture,
    relation_heads,
    resolve_layer_map,
    span_features,
    span_sequences,
    trg_global_loss,
    trg_inner_loss,
    trg_local_loss,
)


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------------ layer maps
def test_layer_maps():
    assert resolve_layer_map("uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert resolve_layer_map("uniform", 2, 2) == [(1, 1), (2, 2)]
    assert resolve_layer_map("last", 2, 12) == [(2, 12)]
    assert resolve_layer_map([[0, 0], [2, 5]], 2, 6) == [(0, 0), (2, 5)]
    assert resolve_layer_map([3, 6], 2, 6) == [(1, 3), (2, 6)]
    with pytest.raises(ConfigError, match=r"pair \[2, 7\] is out of range \(student 0..2, teacher 0..6\)"):
        resolve_layer_map([[2, 7]], 2, 6)
    with pytest.raises(ConfigError, match="one per student block"):
        resolve_layer_map([1, 2, 3], 2, 6)
    with pytest.raises(ConfigError, match="'uniform', 'last'"):
        resolve_layer_map("every", 2, 6)


# ------------------------------------------------------------------------------------------ hidden states
def test_hidden_losses_match_numpy():
    s, t = _randn(2, 5, 7, seed=1), _randn(2, 5, 7, seed=2)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 1, 1]], dtype=torch.bool)
    sn, tn = s.numpy(), t.numpy()
    mse = ((sn - tn) ** 2).mean(-1) * mask.numpy()
    cos = (1 - (sn * tn).sum(-1) / (np.linalg.norm(sn, axis=-1) * np.linalg.norm(tn, axis=-1))) * mask.numpy()
    np.testing.assert_allclose(hidden_mse(s, t, mask).numpy(), mse, rtol=1e-12)
    np.testing.assert_allclose(hidden_cosine(s, t, mask).numpy(), cos, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="project first"):
        hidden_mse(s, t[..., :3])


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.01, 100.0), st.floats(0.01, 100.0))
def test_cosine_ignores_scale_and_stays_in_range(seed, a, b):
    s, t = _randn(4, 6, seed=seed), _randn(4, 6, seed=seed + 1)
    base = hidden_cosine(s, t)
    torch.testing.assert_close(hidden_cosine(a * s, b * t), base, rtol=1e-9, atol=1e-12)
    assert bool((base >= -1e-12).all() and (base <= 2 + 1e-12).all())
    assert float(hidden_cosine(s, a * s).abs().max()) < 1e-12 and float(hidden_mse(s, s).abs().max()) == 0.0


def test_hidden_state_kd_gradients():
    kd = HiddenStateKD(2, 4, 3, 5, layers="uniform", loss="mse").double()
    student = [_randn(2, 3, 3, seed=k).requires_grad_(True) for k in range(3)]
    teacher = [_randn(2, 3, 5, seed=10 + k) for k in range(5)]
    torch.autograd.gradcheck(lambda a, b, c: kd([a, b, c], teacher), tuple(student))
    out = kd(student, teacher)
    expected = sum(hidden_mse(kd.projection(student[s], k), teacher[t]) for k, (s, t) in enumerate(kd.pairs)) / 2
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in kd.parameters())


def test_projection_resumes_exactly(tmp_path):
    """Training the projection, saving it (safetensors) with its optimizer state, loading both into fresh objects
    and continuing gives bit-for-bit the weights of an uninterrupted run."""
    student, teacher = _randn(6, 4, seed=3).float(), _randn(6, 8, seed=4).float()

    def steps(module, optimizer, n):
        for _ in range(n):
            loss = hidden_mse(module(student), teacher).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    straight = HiddenProjection(4, 8, seed=7)
    opt = torch.optim.AdamW(straight.parameters(), lr=0.05)
    steps(straight, opt, 6)

    first = HiddenProjection(4, 8, seed=7)
    opt = torch.optim.AdamW(first.parameters(), lr=0.05)
    steps(first, opt, 3)
    first.save(tmp_path / "projection.safetensors")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    resumed = HiddenProjection(4, 8, seed=99)  # other initial weights: everything must come from the files
    resumed.load(tmp_path / "projection.safetensors")
    opt = torch.optim.AdamW(resumed.parameters(), lr=0.05)
    opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    steps(resumed, opt, 3)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="do not fit this projection"):
        HiddenProjection(4, 8, num_maps=2).load(tmp_path / "projection.safetensors")


# ------------------------------------------------------------------------------------------ ND
def test_nd_loss_matches_the_authors_formula():
    s, t = _randn(6, 5, seed=5), _randn(6, 5, seed=6, scale=2.0)
    centres = _randn(4, 5, seed=7)
    centres[3] = 0.0  # a class never seen: no loss
    labels = torch.tensor([0, 2, 3, -100, 1, 2])
    got = nd_loss(s, t, centres, labels)
    expected = []
    for si, ti, y in zip(s.numpy(), t.numpy(), labels.tolist()):
        if y < 0 or not centres[y].any():
            expected.append(0.0)
            continue
        e = centres[y].numpy() / np.linalg.norm(centres[y].numpy())
        expected.append(1 - si @ e / max(np.linalg.norm(si), np.linalg.norm(ti)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 5.0))
def test_nd_loss_rewards_the_direction_and_a_norm_up_to_the_teachers(seed, alpha):
    """A student along the class mean with alpha times the teacher's norm loses exactly 1 - min(alpha, 1)."""
    t = _randn(3, 6, seed=seed)
    centres = _randn(3, 6, seed=seed + 1)
    labels = torch.tensor([2, 0, 1])
    direction = centres[labels] / centres[labels].norm(dim=-1, keepdim=True)
    s = alpha * t.norm(dim=-1, keepdim=True) * direction
    torch.testing.assert_close(nd_loss(s, t, centres, labels), torch.full((3,), 1 - min(alpha, 1.0), dtype=torch.float64))


def test_class_means_are_exact_and_checkpointable():
    feats, labels = _randn(9, 3, seed=8), torch.tensor([0, 1, 0, 2, -100, 1, 0, 2, 2])
    means = ClassMeans(4, 3)
    means.update(feats[:5], labels[:5])
    means.update(feats[5:], labels[5:])
    for c in range(3):
        np.testing.assert_allclose(means.means()[c].numpy(), feats[labels == c].numpy().mean(0), rtol=1e-12)
    assert means.means()[3].abs().sum() == 0
    again = ClassMeans(4, 3)
    again.load_state_dict(means.state_dict())
    assert torch.equal(again.means(), means.means())


# ------------------------------------------------------------------------------------------ TRG
def test_trg_losses_match_numpy():
    xs, xt = _randn(7, 4, seed=9), _randn(7, 6, seed=10)
    k, sigma = 3, 2.0
    a_s, a_t = knn_gaussian_graph(xs, k, sigma), knn_gaussian_graph(xt, k, sigma)
    for x, a in ((xs.numpy(), a_s.numpy()), (xt.numpy(), a_t.numpy())):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        ref = np.zeros_like(d)
        for j in range(len(x)):
            others = [i for i in np.argsort(d[:, j], kind="stable") if i != j][:k]
            for i in others:
                ref[i, j] = math.exp(-d[i, j] / (2 * sigma))
        np.testing.assert_allclose(a, ref, rtol=1e-12)
    local = trg_local_loss(a_s, a_t).numpy()
    ps = np.exp(a_s.numpy()) / np.exp(a_s.numpy()).sum(-1, keepdims=True)
    pt = np.exp(a_t.numpy()) / np.exp(a_t.numpy()).sum(-1, keepdims=True)
    np.testing.assert_allclose(local, (ps * np.log(ps / pt)).sum(-1), rtol=1e-10)
    assert float(trg_local_loss(a_t, a_t).abs().max()) < 1e-12
    proj = _randn(7, 6, seed=11)
    glob = trg_global_loss(proj, xt, 0.5).numpy()
    sn = proj.numpy() / np.linalg.norm(proj.numpy(), axis=-1, keepdims=True)
    tn = xt.numpy() / np.linalg.norm(xt.numpy(), axis=-1, keepdims=True)
    logits = sn @ tn.T / 0.5
    np.testing.assert_allclose(glob, -(np.diag(logits) - np.log(np.exp(logits).sum(-1))), rtol=1e-10)


def test_knn_bandwidth_is_the_mean_squared_neighbour_distance():
    x = _randn(8, 5, seed=30)
    d = ((x.numpy()[:, None] - x.numpy()[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    expected = np.sort(d, axis=0)[:3].mean()
    assert float(knn_bandwidth(x, 3)) == pytest.approx(expected, rel=1e-12)
    assert float(knn_bandwidth(4.0 * x, 3)) == pytest.approx(16 * expected, rel=1e-12)


def test_trg_inner_loss_matches_numpy_and_ignores_masked_tokens():
    s, t = _randn(2, 5, 3, seed=12), _randn(2, 5, 8, seed=13)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = trg_inner_loss(s, t, mask)
    for b in range(2):
        n = int(mask[b].sum())
        def cs(x):
            z = x[:n] @ x[:n].T / math.sqrt(x.shape[-1])
            e = np.exp(z - z.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        ref = ((cs(t[b].numpy()) - cs(s[b].numpy())) ** 2).mean(-1)
        np.testing.assert_allclose(got[b, :n].numpy(), ref, rtol=1e-10)
        assert (got[b, n:] == 0).all()
    moved = s.clone()
    moved[0, 3:] = 100.0  # masked tokens take no part
    torch.testing.assert_close(trg_inner_loss(moved, t, mask), got)


# ------------------------------------------------------------------------------------------ MiniLMv2
def test_attention_relations_match_numpy():
    x = _randn(2, 4, 6, seed=14)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    got = attention_relations(x, 3, mask, causal=True)
    for b in range(2):
        for h in range(3):
            a = x[b, :, 2 * h : 2 * h + 2].numpy()
            for i in range(4):
                keys = [j for j in range(i + 1) if mask[b, j]]
                z = np.array([a[i] @ a[j] / math.sqrt(2) for j in keys])
                ref = z - np.log(np.exp(z).sum())
                np.testing.assert_allclose(got[b, h, i, keys].numpy(), ref, rtol=1e-12, atol=1e-15)
                assert torch.isneginf(got[b, h, i, [j for j in range(4) if j not in keys]]).all()


def test_attention_relation_kd_values_and_widths():
    q, k, v = (_randn(2, 5, 8, seed=s) for s in (15, 16, 17))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert float(attention_relation_kd([q, k, v], [q, k, v], 2, mask).abs().max()) < 1e-12
    small = [t[..., :4].clone().requires_grad_(True) for t in (q, k, v)]  # narrower student, same relation heads
    loss = attention_relation_kd(small, [q, k, v], 2, mask)
    rel_s = [attention_relations(t, 2, mask) for t in small]
    rel_t = [attention_relations(t, 2, mask) for t in (q, k, v)]
    expected = sum(((rt.exp() * (rt - rs)).nan_to_num(0.0)).sum(-1).mean(1) for rs, rt in zip(rel_s, rel_t)) * mask
    torch.testing.assert_close(loss, expected)
    later = mask.clone()
    later[:, 0] = False  # a decoder's first token attends to itself alone: nothing to match there
    assert bool((loss[later] > 0).all()) and bool((loss[~later] == 0).all())
    loss.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in small)


def test_relation_heads():
    assert relation_heads("auto", 32, 48) == 16 and relation_heads("auto", 768, 1024) == 64
    assert relation_heads("auto", 1536, 2048) == 64 and relation_heads("auto", 1200) == 60
    assert relation_heads(8, 32, 48) == 8
    with pytest.raises(ConfigError, match="do not split the widths 32, 48"):
        relation_heads(32, 32, 48)
    with pytest.raises(ConfigError, match="positive integer"):
        relation_heads(0, 32)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_qkv_capture_on_real_models(arch):
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    ids = torch.randint(0, 50, (2, 7))
    with qkv_capture(model, 1) as captured:
        model(input_ids=ids)
    assert len(captured.values) == 3 and all(t.shape == (2, 7, 16) for t in captured.values)
    with qkv_capture(model, 0) as teacher_side:
        with torch.no_grad():
            model(input_ids=ids)
    loss = attention_relation_kd(captured.values, teacher_side.values, heads=4)
    loss.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ------------------------------------------------------------------------------------------ with logits, across tokenizers
def test_combines_with_a_logit_objective_per_token():
    z, zt = _randn(2, 5, 11, seed=18).requires_grad_(True), _randn(2, 5, 11, seed=19)
    labels = torch.tensor([[1, 2, 3, -100, 4], [5, 6, -100, -100, 7]])
    hs, ht = _randn(2, 5, 4, seed=20).requires_grad_(True), _randn(2, 5, 4, seed=21)
    kd, rep = ForwardKL().per_token(z, zt, labels), hidden_cosine(hs, ht, labels != -100)
    total = reduce_tokens(kd + 0.1 * rep, labels)
    torch.testing.assert_close(total, reduce_tokens(kd, labels) + 0.1 * reduce_tokens(rep, labels))
    total.backward()
    assert hs.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_span_features_pair_states_after_the_same_text(kjv_verses):
    texts = [t for _, t in kjv_verses[:2000]]
    student_tok = train_bpe_tokenizer(texts, vocab_size=400)
    teacher_tok = train_bpe_tokenizer(texts[1000:], vocab_size=700)
    batcher = CrossTokenizerBatcher(student_tok, teacher_tok)
    ids = student_tok(" ".join(texts[:6]), add_special_tokens=False).input_ids[:41]
    inputs = batcher(torch.tensor([ids]))
    hs = _randn(1, 40, 3, seed=22)
    ht = _randn(1, inputs.teacher_input_ids.shape[1], 5, seed=23)
    s_feat, t_feat = span_features(hs, ht, inputs.alignment)
    s, t = batcher.spans_from_ids(ids)
    expected = [(ra[-1], rb[-1]) for ra, rb in align_spans(s, t)
                if ra.start > 0 and rb.start > 0 and ra[-1] < 40 and rb[-1] < len(t) - 1]
    assert len(expected) == s_feat.shape[0] > 10
    torch.testing.assert_close(s_feat, hs[0, [e[0] for e in expected]])
    torch.testing.assert_close(t_feat, ht[0, [e[1] for e in expected]])
    proj = HiddenProjection(3, 5).double()
    assert torch.isfinite(hidden_mse(proj(s_feat), t_feat)).all()


def test_span_sequences_pool_each_sequence_in_text_order(kjv_verses):
    """The padded per-sequence index holds exactly span_features' pairs, each sequence's spans in text order,
    each span's student and teacher positions in that sequence."""
    texts = [t for _, t in kjv_verses[:2000]]
    student_tok = train_bpe_tokenizer(texts, vocab_size=400)
    teacher_tok = train_bpe_tokenizer(texts[1000:], vocab_size=700)
    batcher = CrossTokenizerBatcher(student_tok, teacher_tok)
    rows = [student_tok(" ".join(texts[k:k + 6]), add_special_tokens=False).input_ids[:33] for k in (0, 40, 90)]
    inputs = batcher(torch.tensor(rows))
    a = inputs.alignment
    s_index, t_index, mask = span_sequences(a, "cpu")
    assert s_index.shape == mask.shape == (3, int(mask.sum(1).max()))
    hs = _randn(3, 32, 3, seed=31)
    ht = _randn(3, a.teacher_len, 4, seed=32)
    s_feat, t_feat = span_features(hs, ht, a)
    torch.testing.assert_close(hs.reshape(-1, 3)[s_index[mask]], s_feat)
    torch.testing.assert_close(ht.reshape(-1, 4)[t_index[mask]], t_feat)
    for b in range(3):
        s_pos, t_pos = s_index[b][mask[b]], t_index[b][mask[b]]
        assert len(s_pos) > 5 and bool((s_pos // 32 == b).all()) and bool((t_pos // a.teacher_len == b).all())
        assert bool((s_pos.diff() > 0).all()) and bool((t_pos.diff() > 0).all())
        assert not mask[b][int(mask[b].sum()):].any()  # real spans first, padding after
