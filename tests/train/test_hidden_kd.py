"""Representation KD through the one trainer: hidden states with a learned projection (another width and depth),
ND and TRG beside a logit objective in a mix, against float64 references; plain == chunked; the projection trains,
is checkpointed and resumes exactly; teachers without hidden states are refused."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.config import VocabConfig
from lmdistill.constants import IGNORE_INDEX
from lmdistill.errors import ConfigError
from lmdistill.losses import build_objective
from lmdistill.losses.pairing import ModelPair
from lmdistill.teachers.live import load_live_teacher
from lmdistill.train.run import build_trainer
from tests.conftest import save_tiny_model
from tests.train.helpers import interrupt_then_resume, run_config

MIX = {"mix": [{"name": "forward_kl"}, {"name": "hidden_states", "weight": 0.5},
               {"name": "nd", "weight": 0.1}, {"name": "trg", "weight": 0.1}]}


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
    straight, _ = build_trainer(_cfg(tmp_path / "a", kjv_small_txt, cache_dir, student_dir, tiny_teacher),
                                show_progress=False)
    straight.train()
    resumed = interrupt_then_resume(_cfg(tmp_path / "b", kjv_small_txt, cache_dir, student_dir, tiny_teacher),
                                    monkeypatch, dies_in_step=3)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    a, b = straight.objective.state_dict(), resumed.objective.state_dict()
    hidden_a, hidden_b = a["parts"][1]["state"]["projection"], b["parts"][1]["state"]["projection"]
    assert hidden_a.keys() == hidden_b.keys() and all(torch.equal(hidden_a[k], hidden_b[k]) for k in hidden_a)
    nd_a, nd_b = a["parts"][2]["state"], b["parts"][2]["state"]
    assert torch.equal(nd_a["means"]["sums"], nd_b["means"]["sums"]) and int(nd_a["means"]["counts"].sum()) > 0
    straight.close()
    resumed.close()


def test_a_teacher_without_hidden_states_is_refused(tiny_teacher, small_tokenizer):
    teacher = load_live_teacher(tiny_teacher, tokenizer=small_tokenizer, student_tokenizer=small_tokenizer,
                                student_rows=len(small_tokenizer), vocab=VocabConfig(rung="different"),
                                objective=build_objective("uld"))
    with pytest.raises(ConfigError, match="hidden_states read the teacher's hidden states"):
        teacher.check_objective(build_objective({"mix": [{"name": "uld"}, {"name": "hidden_states"}]}))


def test_representation_kd_through_the_cli(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher):
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": str(kjv_small_txt), "block_size": 32, "cache_dir": str(cache_dir)},
        "teacher": {"path": str(tiny_teacher)},
        "student": {"path": str(student_dir)},
        "objective": MIX,
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0},
        "eval": {"every": 2, "max_batches": 1, "batch_size": 4},
        "checkpoint": {"every": 100},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["distill", str(tmp_path / "run.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
