"""Representation KD through the one trainer: hidden states with a learned projection (another width and depth),
ND, TRG (contextual, local and global terms) and MiniLMv2's attention relations beside a logit objective in a mix,
against float64 references; plain == chunked; the projections train, are checkpointed and resume exactly; a teacher
without hidden states (a cache) is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.config import VocabConfig
from lmdistill.constants import IGNORE_INDEX
from lmdistill.errors import ConfigError
from lmdistill.losses import build_objective
from lmdistill.losses.pairing import ModelPair
from lmdistill.losses.representation import trg_inner_loss
from lmdistill.teachers.aligned import AlignedLiveTeacher
from lmdistill.teachers.live import load_live_teacher
from lmdistill.train.run import build_trainer
from tests.conftest import save_tiny_model
from tests.train.helpers import (
    distill_through_cli,
    relation_kl_reference,
    run_config,
    straight_and_resumed,
)

MIX = {"mix": [{"name": "forward_kl"}, {"name": "hidden_states", "weight": 0.5},
               {"name": "nd", "weight": 0.1}, {"name": "trg", "weight": 0.1}]}
TRG_ALL = {"name": "trg", "terms": {"contextual": 1.0, "local": 0.5, "global": 0.2}, "nodes": 24, "k": 4}
RELATIONS = {"mix": [{"name": "forward_kl"}, {"name": "attention_relations", "weight": 0.5, "heads": 4},
                     {**TRG_ALL, "weight": 0.1}]}


def _pair(student_layers=1, student_width=32, teacher_layers=2, teacher_width=48, vocab=50) -> ModelPair:
    class Tok:  # only its length is read (the class count of ND)
        def __len__(self):
            return vocab

    return ModelPair(Tok(), Tok(), vocab, vocab, teacher_layers, teacher_width, student_layers, student_width, seed=3)


def _states(layers, b, length, width, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, length, width, generator=g, dtype=torch.float64) for _ in range(layers + 1))


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_hidden_states_objective_is_its_formula_in_float64(loss):
    objective = build_objective({"name": "hidden_states", "layers": [[1, 2], [0, 0]], "loss": loss})
    objective.bind_models(_pair())
    objective.module.double()
    s, t = _states(1, 2, 5, 32, 0), _states(2, 2, 5, 48, 1)
    labels = torch.arange(10) % 7
    labels[3] = IGNORE_INDEX
    got = objective.state_per_token(s, t, labels)
    w = [m.weight.detach().double() for m in objective.module.projection.maps]
    expected = torch.zeros(10, dtype=torch.float64)
    for k, (si, ti) in enumerate([(1, 2), (0, 0)]):
        x = (s[si] @ w[k].T).reshape(10, 48)
        y = t[ti].reshape(10, 48)
        if loss == "mse":
            expected += ((x - y) ** 2).mean(-1)
        else:
            expected += 1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    expected /= 2
    expected[3] = 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), length=st.integers(2, 6))
def test_trg_and_nd_vanish_when_the_student_is_the_teacher(seed, length):
    """Same widths (no projection): a student whose states are the teacher's has zero TRG contextual loss, and zero
    ND loss on rows whose class mean is its own feature (each class seen once)."""
    pair = _pair(student_layers=2, student_width=8, teacher_layers=2, teacher_width=8, vocab=64)
    states = _states(2, 1, length, 8, seed)
    labels = torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:length]
    trg, nd = build_objective("trg"), build_objective("nd")
    trg.bind_models(pair)
    nd.bind_models(pair)
    assert torch.allclose(trg.state_per_token(states, states, labels), torch.zeros(length, dtype=torch.float64),
                          atol=1e-12)
    assert torch.allclose(nd.state_per_token(states, states, labels).double(), torch.zeros(length, dtype=torch.float64),
                          atol=1e-6)
    other = _states(2, 1, length, 8, seed + 1)
    assert float(trg.state_per_token(other, states, labels).sum()) > 0


def _np(x):
    return x.detach().double().numpy()


def test_attention_relations_objective_is_its_formula_in_float64():
    objective = build_objective({"name": "attention_relations", "layers": [[1, 2], [1, 1]], "heads": 4})
    objective.bind_models(_pair())
    assert objective.relation_heads == 4
    s, t = _states(1, 2, 5, 32, 0), _states(2, 2, 5, 48, 1)
    labels = torch.arange(10) % 7
    labels[3] = IGNORE_INDEX
    got = objective.state_per_token(s, t, labels)
    mask = (labels != IGNORE_INDEX).reshape(2, 5).numpy()
    expected = (relation_kl_reference(_np(s[1]), _np(t[2]), 4, mask)
                + relation_kl_reference(_np(s[1]), _np(t[1]), 4, mask)) / 2
    np.testing.assert_allclose(got.numpy(), expected.reshape(-1), rtol=1e-10, atol=1e-13)
    assert got[3] == 0 and bool((got.reshape(2, 5)[:, 1:][torch.from_numpy(mask)[:, 1:]] > 0).all())


def test_attention_relation_heads_default_and_refusals():
    auto = build_objective("attention_relations")
    auto.bind_models(_pair(student_width=32, teacher_width=48))
    assert auto.relation_heads == 16 and auto.pairs == [(1, 2)]  # the largest count <= 64 dividing 32 and 48
    wide = build_objective("minilmv2")
    wide.bind_models(_pair(student_width=256, teacher_width=768))
    assert wide.relation_heads == 64
    with pytest.raises(ConfigError, match="5 relation heads do not split the widths 32, 48"):
        build_objective({"name": "attention_relations", "heads": 5}).bind_models(_pair())
    with pytest.raises(ConfigError, match="heads must be a positive integer or 'auto'"):
        build_objective({"name": "attention_relations", "heads": 0})


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), length=st.integers(2, 6), heads=st.sampled_from([1, 2, 4]))
def test_attention_relations_see_only_each_heads_geometry(seed, length, heads):
    """Zero for a student equal to the teacher; unchanged when an orthogonal map turns each relation head of the
    student (its dot products stay); positive for another student."""
    pair = _pair(student_layers=1, student_width=8, teacher_layers=1, teacher_width=8)
    objective = build_objective({"name": "attention_relations", "heads": heads})
    objective.bind_models(pair)
    teacher = _states(1, 2, length, 8, seed)
    other = _states(1, 2, length, 8, seed + 1)
    labels = torch.zeros(2 * length, dtype=torch.long)
    assert float(objective.state_per_token(teacher, teacher, labels).abs().max()) < 1e-12
    base = objective.state_per_token(other, teacher, labels)
    g = torch.Generator().manual_seed(seed)
    dh = 8 // heads
    rotation = torch.block_diag(*[torch.linalg.qr(torch.randn(dh, dh, generator=g, dtype=torch.float64))[0]
                                  for _ in range(heads)])
    turned = tuple(x @ rotation for x in other)
    torch.testing.assert_close(objective.state_per_token(turned, teacher, labels), base, rtol=1e-9, atol=1e-12)
    assert float(base.sum()) > 0


def _trg_graph_reference(objective, s, t, labels, pairs, weights, temperature):
    """TRG's local and global terms written out from the formulas on the nodes the objective's generator draws."""
    flat_mask = (labels != IGNORE_INDEX).numpy()
    real = np.nonzero(flat_mask)[0]
    draw = torch.randperm(len(real), generator=torch.Generator().manual_seed(3))[: objective.nodes].numpy()
    picked = real[draw]
    m, k = len(picked), objective.k
    node = np.zeros(m)

    def graph(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        nearest = [[i for i in np.argsort(d[:, j], kind="stable") if i != j][:k] for j in range(m)]
        sigma = np.mean([d[i, j] for j in range(m) for i in nearest[j]])
        a = np.zeros_like(d)
        for j in range(m):
            for i in nearest[j]:
                a[i, j] = math.exp(-d[i, j] / (2 * sigma))
        return a

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    for index, (si, ti) in enumerate(pairs):
        xs = _np(s[si]).reshape(-1, s[si].shape[-1])[picked]
        xt = _np(t[ti]).reshape(-1, t[ti].shape[-1])[picked]
        ps, pt = softmax(graph(xs)), softmax(graph(xt))
        node += weights["local"] * (ps * np.log(ps / pt)).sum(-1)
        w = _np(objective.projection.maps[index].weight) if objective.projection.maps else np.eye(xs.shape[-1])
        ys = xs @ w.T
        ys = ys / np.linalg.norm(ys, axis=-1, keepdims=True)
        yt = xt / np.linalg.norm(xt, axis=-1, keepdims=True)
        logits = ys @ yt.T / temperature
        node += weights["global"] * -(np.diag(logits) - np.log(np.exp(logits).sum(-1)))
    out = np.zeros(len(flat_mask))
    out[picked] = node * len(real) / m / len(pairs)
    return out


def test_trg_graph_terms_are_their_formulas_in_float64():
    weights = {"contextual": 0.7, "local": 0.5, "global": 0.25}
    objective = build_objective({"name": "trg", "layers": [[1, 2], [0, 1]], "terms": weights, "nodes": 7, "k": 3,
                                 "temperature": [0.5, 0.1]})
    objective.bind_models(_pair())
    objective.projection.double()
    s, t = _states(1, 2, 5, 32, 4), _states(2, 2, 5, 48, 5)
    labels = torch.arange(10) % 7
    labels[3] = IGNORE_INDEX
    objective.on_step_end(0.0, 3, 4)  # three quarters through: tau = 0.5 + (0.1 - 0.5) * 0.75
    got = objective.state_per_token(s, t, labels)
    pairs = [(1, 2), (0, 1)]
    expected = _trg_graph_reference(objective, s, t, labels, pairs, weights, 0.2)
    mask = (labels != IGNORE_INDEX).reshape(2, 5)
    for si, ti in pairs:  # the contextual term, as the existing function computes it (tested against numpy)
        expected += weights["contextual"] / 2 * trg_inner_loss(s[si], t[ti], mask).reshape(-1).numpy()
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-9, atol=1e-12)
    assert got[3] == 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.05, 20.0))
def test_trg_graph_terms_ignore_the_teachers_scale(seed, scale):
    """With sigma: auto the k-NN graphs, and the cosine InfoNCE always, read the geometry of the features, not their
    scale: multiplying the teacher's states changes neither; a student equal to the teacher has zero local loss."""
    pair = _pair(student_layers=1, student_width=8, teacher_layers=1, teacher_width=8)

    def loss(student, teacher, terms):
        objective = build_objective({"name": "trg", "terms": terms, "nodes": 9, "k": 3})
        objective.bind_models(pair)
        return objective.state_per_token(student, teacher, torch.zeros(12, dtype=torch.long))

    s, t = _states(1, 2, 6, 8, seed), _states(1, 2, 6, 8, seed + 1)
    both = ["local", "global"]
    torch.testing.assert_close(loss(s, tuple(scale * x for x in t), both), loss(s, t, both), rtol=1e-8, atol=1e-10)
    assert float(loss(t, t, ["local"]).abs().max()) < 1e-12
    assert float(loss(s, t, ["local"]).sum()) > 0


def test_trg_options_are_checked():
    for spec, message in (({"terms": ["contextual", "lokal"]}, "unknown TRG term 'lokal'"),
                          ({"terms": {"local": 0.0}}, "at least one TRG term"),
                          ({"nodes": 4, "k": 4}, r"k must be an integer in \[1, nodes - 1\]"),
                          ({"temperature": [1.0, 0.0]}, "temperature must be a finite number > 0"),
                          ({"sigma": "median"}, "sigma")):
        with pytest.raises(ConfigError, match=message):
            build_objective({"name": "trg", **spec})
    plain = build_objective("trg")
    assert plain.config() == {"name": "trg", "layers": "last", "terms": {"contextual": 1.0}}
    again = build_objective(build_objective(TRG_ALL).config())
    assert again.config() == build_objective(TRG_ALL).config() and again.temperature == [1.0, 0.1]


def test_an_unsized_representation_objective_says_so():
    with pytest.raises(ValueError, match="bind the run's models first"):
        build_objective("hidden_states").state_per_token(_states(1, 1, 2, 4, 0), _states(1, 1, 2, 4, 0), torch.zeros(2))
    with pytest.raises(ConfigError, match="objective.layers: .*|layers"):
        build_objective({"name": "hidden_states", "layers": "every"})


@pytest.fixture()
def student_dir(tmp_path, small_tokenizer):
    return save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=2)


def _cfg(where, corpus, cache_dir, student, teacher, objective=MIX, **train):
    return run_config(where, corpus, cache_dir, student, teacher, objective=objective,
                      train={"steps": 4, "warmup_steps": 0, **train}, checkpoint={"every": 2, "keep": 3})


def test_plain_and_chunked_paths_agree_and_the_projection_learns(tmp_path, kjv_small_txt, cache_dir, student_dir,
                                                                tiny_teacher):
    losses, grads = {}, {}
    for chunked in (False, True):
        trainer, _ = build_trainer(_cfg(tmp_path / str(chunked), kjv_small_txt, cache_dir, student_dir, tiny_teacher,
                                        chunked_loss=chunked), show_progress=False)
        try:
            projection = trainer.objective.parts[1][0].module.projection.maps[0].weight  # 32 -> 48 (tiny teacher)
            assert projection.shape == (48, 32)
            before = projection.detach().clone()
            losses[chunked] = [trainer.train_step(0), trainer.train_step(1)]
            grads[chunked] = not torch.equal(before, projection.detach())
        finally:
            trainer.close()
    assert losses[False] == pytest.approx(losses[True], rel=1e-5)
    assert grads[False] and grads[True]
    assert all(math.isfinite(x) for x in losses[True])


def test_relations_plain_and_chunked_paths_agree_and_trg_projection_learns(tmp_path, kjv_small_txt, cache_dir,
                                                                          student_dir, tiny_teacher):
    losses = {}
    for chunked in (False, True):
        trainer, _ = build_trainer(_cfg(tmp_path / str(chunked), kjv_small_txt, cache_dir, student_dir, tiny_teacher,
                                        objective=RELATIONS, chunked_loss=chunked), show_progress=False)
        try:
            relations, trg = trainer.objective.parts[1][0], trainer.objective.parts[2][0]
            assert relations.relation_heads == 4 and trg.pairs == [(1, 2)]
            projection = trg.projection.maps[0].weight  # the global term's 32 -> 48 map
            before = projection.detach().clone()
            losses[chunked] = [trainer.train_step(0), trainer.train_step(1)]
            assert not torch.equal(before, projection.detach())
            assert trg.progress == 0.5  # two of the run's four steps: the global term's temperature anneals
        finally:
            trainer.close()
    assert losses[False] == pytest.approx(losses[True], rel=1e-5)
    assert all(math.isfinite(x) for x in losses[True])


def test_a_run_with_trg_graph_terms_resumes_exactly(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher,
                                                    monkeypatch):
    straight, resumed = straight_and_resumed(
        _cfg(tmp_path / "a", kjv_small_txt, cache_dir, student_dir, tiny_teacher, objective=RELATIONS),
        _cfg(tmp_path / "b", kjv_small_txt, cache_dir, student_dir, tiny_teacher, objective=RELATIONS), monkeypatch)
    a, b = straight.objective.state_dict()["parts"][2]["state"], resumed.objective.state_dict()["parts"][2]["state"]
    assert a["progress"] == b["progress"] == 1.0
    assert torch.equal(a["generator"], b["generator"])
    assert all(torch.equal(a["projection"][k], b["projection"][k]) for k in a["projection"])
    straight.close()
    resumed.close()


def test_hidden_state_kd_alone_trains_the_student(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher):
    trainer, _ = build_trainer(_cfg(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher,
                                    objective={"name": "hidden_states", "loss": "cosine"}, steps=2), show_progress=False)
    try:
        weight = trainer.model.transformer.h[0].mlp.c_fc.weight
        before = weight.detach().clone()
        loss = trainer.train_step(0)
        assert math.isfinite(loss) and 0 < loss < 2  # 1 - cos is in [0, 2]
        assert not torch.equal(before, weight.detach())
    finally:
        trainer.close()


def test_a_run_with_learned_projections_resumes_exactly(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher,
                                                        monkeypatch):
    straight, resumed = straight_and_resumed(_cfg(tmp_path / "a", kjv_small_txt, cache_dir, student_dir, tiny_teacher),
                                             _cfg(tmp_path / "b", kjv_small_txt, cache_dir, student_dir, tiny_teacher),
                                             monkeypatch)
    a, b = straight.objective.state_dict(), resumed.objective.state_dict()
    hidden_a, hidden_b = a["parts"][1]["state"]["projection"], b["parts"][1]["state"]["projection"]
    assert hidden_a.keys() == hidden_b.keys() and all(torch.equal(hidden_a[k], hidden_b[k]) for k in hidden_a)
    nd_a, nd_b = a["parts"][2]["state"], b["parts"][2]["state"]
    assert torch.equal(nd_a["means"]["sums"], nd_b["means"]["sums"]) and int(nd_a["means"]["counts"].sum()) > 0
    straight.close()
    resumed.close()


def test_a_cache_is_refused_and_an_aligned_teacher_serves_states(tmp_path, tiny_teacher, small_tokenizer,
                                                                  kjv_small_txt, cache_dir):
    from lmdistill.data.prepare import prepare_data
    from lmdistill.models.loading import load_causal_lm
    from lmdistill.teachers.cache import TeacherCache, write_teacher_cache

    data = prepare_data(str(kjv_small_txt), block_size=32, tokenizer=small_tokenizer, cache_dir=cache_dir)
    write_teacher_cache(tmp_path / "cache", model=load_causal_lm(str(tiny_teacher)).eval(), tokenizer=small_tokenizer,
                        stream=data.streams["train"], block_size=32, k=4, blocks_per_shard=4096, model_name="tiny")
    cache = TeacherCache(tmp_path / "cache")
    refused = "trg read the teacher's hidden states, which .*cache stores none.*any tokenizer"
    with pytest.raises(ConfigError, match=refused):
        cache.check_objective(build_objective({"mix": [{"name": "forward_kl"}, {"name": "attention_relations"},
                                                       {"name": "trg"}]}))
    aligned = load_live_teacher(tiny_teacher, tokenizer=small_tokenizer, student_tokenizer=small_tokenizer,
                                student_rows=len(small_tokenizer), vocab=VocabConfig(rung="different"),
                                objective=build_objective("hidden_states"))
    assert isinstance(aligned, AlignedLiveTeacher) and aligned.serves_states
    aligned.check_objective(build_objective({"mix": [{"name": "uld"}, {"name": "hidden_states"}]}))


@pytest.mark.parametrize("objective", [MIX, {"mix": [{"name": "cross_entropy"},
                                                     {"name": "attention_relations", "weight": 0.5}]}],
                         ids=["hidden+nd+trg", "attention_relations"])
def test_representation_kd_through_the_cli(objective, tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher):
    distill_through_cli(tmp_path, kjv_small_txt, cache_dir, student_dir, {"path": str(tiny_teacher)}, objective, steps=2)
