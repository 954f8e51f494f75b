"""The trainer: exact resume, NaN stop, exact loss normalisation under accumulation, real distillation."""

from __future__ import annotations

import pytest
import torch

from lmdistill.errors import LmdistillError
from lmdistill.train.run import build_trainer, run_training
from lmdistill.train.trainer import TrainingDiverged
from tests.conftest import save_tiny_model
from tests.train.helpers import interrupt_then_resume, run_config


def _weights(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def student_dir(tmp_path, small_tokenizer):
    return save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=2)


def test_resume_is_bit_identical(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher, monkeypatch):
    objective = {"name": "forward_kl"}
    full_cfg = run_config(tmp_path / "a", kjv_small_txt, cache_dir, student_dir, tiny_teacher, objective=objective)
    full, _ = build_trainer(full_cfg, show_progress=False)
    full.train()
    expected = _weights(full)

    cfg = run_config(tmp_path / "b", kjv_small_txt, cache_dir, student_dir, tiny_teacher, objective=objective)
    killed, _ = build_trainer(cfg, show_progress=False)
    original = killed.train_step

    def dies_at_step_5(step):
        if step == 4:  # steps 1-4 done, checkpoint at 4 written; the process "dies" in step 5
            raise KeyboardInterrupt
        return original(step)

    monkeypatch.setattr(killed, "train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert killed.checkpoints.latest().step == 4

    resumed, _ = build_trainer(cfg, show_progress=False)
    resumed.train(resume=True)
    got = _weights(resumed)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_nan_loss_stops_with_step_and_keeps_the_last_good_checkpoint(tmp_path, kjv_small_txt, cache_dir, student_dir):
    """The loss of step 5 is computed from the weights of checkpoint 4: that checkpoint is not good and goes;
    checkpoint 2 (whose weights gave the finite loss of step 3) is kept and ``latest`` points at it."""
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir)
    trainer, _ = build_trainer(cfg, show_progress=False)
    micro_loss = trainer._micro_loss
    calls = {"n": 0}

    def poisoned(batch, normalizer):
        calls["n"] += 1
        out = micro_loss(batch, normalizer)
        return out * float("nan") if calls["n"] == 5 else out  # one micro-batch per step: step 5

    trainer._micro_loss = poisoned
    with pytest.raises(TrainingDiverged, match="step 5.*checkpoint of step 4 was removed.*step-0000002"):
        trainer.train()
    latest = trainer.checkpoints.latest()
    assert latest is not None and latest.step == 2
    assert [c.step for c in trainer.checkpoints.complete()] == [2]
    # the kept checkpoint is loadable by plain transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(latest.path / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accumulation_equals_one_big_batch(tmp_path, verse_pairs_jsonl, cache_dir, small_tokenizer):
    """Prompt/response blocks have different numbers of valid tokens, so a per-micro-batch mean would
    differ from the global mean; normalising by the global count must make them equal."""
    student = save_tiny_model(tmp_path / "s", small_tokenizer, layers=1, hidden=32, seed=3)
    results = []
    for micro in (None, 1):
        cfg = run_config(
            tmp_path / f"m{micro}", verse_pairs_jsonl, cache_dir, student,
            train={"steps": 3, "batch_size": 4, "micro_batch_size": micro, "grad_clip": None},
            tokenizer={"path": str(student)},
        )
        trainer, _ = build_trainer(cfg, show_progress=False)
        assert trainer.accum == (1 if micro is None else 4)
        valid_counts = {int((trainer.train_data[int(i)]["labels"] != -100).sum()) for i in trainer.source.schedule.global_indices(0)}
        assert len(valid_counts) > 1, "the test needs blocks with different valid-token counts"
        grads: list[dict[str, torch.Tensor]] = []

        def record_instead_of_stepping(*args, **kwargs):
            model = trainer.accelerator.unwrap_model(trainer.model)
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

        trainer.optimizer.step = record_instead_of_stepping
        losses = [trainer.train_step(s) for s in range(3)]
        results.append((losses, grads))
    (l1, g1), (l4, g4) = results
    assert l1 == pytest.approx(l4, rel=1e-6)
    for step_1, step_4 in zip(g1, g4):
        assert step_1.keys() == step_4.keys() and step_1
        for key in step_1:
            torch.testing.assert_close(step_4[key], step_1[key], rtol=1e-4, atol=1e-8)


def test_short_real_distillation_improves_student(tmp_path, kjv_small_txt, cache_dir, small_tokenizer):
    # a teacher that knows something: pretrained briefly on the same real text
    teacher_init = save_tiny_model(tmp_path / "t0", small_tokenizer, layers=2, hidden=64, seed=5)
    t_cfg = run_config(tmp_path / "t", kjv_small_txt, cache_dir, teacher_init,
                       train={"steps": 80, "batch_size": 8, "lr": 1e-2, "warmup_steps": 5}, checkpoint={"every": 1000})
    run_training(t_cfg, show_progress=False)
    teacher = tmp_path / "t" / "run" / "final"

    student = save_tiny_model(tmp_path / "s", small_tokenizer, layers=1, hidden=32, seed=6)
    cfg = run_config(tmp_path / "d", kjv_small_txt, cache_dir, student, teacher,
                     train={"steps": 40, "batch_size": 8, "lr": 1e-2, "warmup_steps": 4}, checkpoint={"every": 1000})
    trainer, _ = build_trainer(cfg, show_progress=False)
    before = trainer.evaluate()
    result = trainer.train()
    after = result.final_metrics
    assert after["loss"] < before["loss"] - 0.5
    assert after["kl_to_teacher"] < before["kl_to_teacher"]
    assert after["top1_agreement"] > before["top1_agreement"]
    assert (tmp_path / "d" / "run" / "metrics.jsonl").exists()


def test_objective_needing_teacher_without_teacher_is_refused(tmp_path, kjv_small_txt, cache_dir, student_dir):
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir, objective="reverse_kl")
    with pytest.raises(LmdistillError, match="teacher"):
        build_trainer(cfg, show_progress=False)


def test_tiny_pretraining_lowers_validation_loss(tmp_path, kjv_small_txt, cache_dir, small_tokenizer):
    init = save_tiny_model(tmp_path / "init", small_tokenizer, layers=1, hidden=32, seed=8)
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, init,
                     train={"steps": 30, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3}, checkpoint={"every": 1000})
    trainer, _ = build_trainer(cfg, show_progress=False)
    before = trainer.evaluate()
    after = trainer.train().final_metrics
    assert after["loss"] < before["loss"] - 0.5
    assert after["bits_per_byte"] < before["bits_per_byte"]


def test_tgeo_fusion_network_learns_in_the_trainer(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher):
    """TGeo-KD's fusion network gets its (outer-problem) gradient from the trainer, so it moves; the
    student still trains on the fused loss."""
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir, teacher=tiny_teacher,
                     objective={"name": "tgeo"}, train={"steps": 3, "lr": 1e-2, "warmup_steps": 0})
    trainer, _ = build_trainer(cfg, show_progress=False)
    before = [p.detach().clone() for p in trainer.objective.parameters()]
    student_before = _weights(trainer)
    for step in range(3):
        trainer.train_step(step)
    after = list(trainer.objective.parameters())
    assert all(p.grad is None for p in after)  # zeroed after the step: the optimizer did use them
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "fusion network never updated"
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(v, student_before[k]) for k, v in _weights(trainer).items())


def test_an_objective_state_with_tensors_checkpoints_and_resumes_exactly(tmp_path, kjv_small_txt, cache_dir, student_dir,
                                                                        tiny_teacher, monkeypatch):
    """TGeo-KD's state holds tensors (its network, the class means): they go into the checkpoint (safetensors beside
    state.json) and come back on resume, so a resumed run ends where an uninterrupted one does."""
    from lmdistill.train.checkpoint import STATE_TENSORS

    def cfg(where):
        return run_config(where, kjv_small_txt, cache_dir, student_dir, teacher=tiny_teacher, objective={"name": "tgeo"},
                          train={"steps": 4, "lr": 1e-2, "warmup_steps": 0}, checkpoint={"every": 2, "keep": 3})

    straight, _ = build_trainer(cfg(tmp_path / "a"), show_progress=False)
    straight.train()
    resumed = interrupt_then_resume(cfg(tmp_path / "b"), monkeypatch, dies_in_step=3)
    assert list((tmp_path / "b" / "run" / "checkpoints").glob(f"step-*/{STATE_TENSORS}"))
    a, b = straight.objective.state_dict(), resumed.objective.state_dict()
    for key, value in a["net"].items():
        torch.testing.assert_close(b["net"][key], value, rtol=0, atol=0)
    torch.testing.assert_close(b["class_mean"], a["class_mean"], rtol=0, atol=0)


def test_monitor_key_logs_proxy_and_golden_metrics(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher):
    """`monitor: {oracle: DIR}` on an ordinary distillation run: every evaluation logs the proxy (student vs
    teacher) and golden (student vs oracle) metrics; with the teacher as its own oracle they coincide."""
    import json

    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student_dir, teacher=tiny_teacher,
                     train={"steps": 4, "warmup_steps": 0}, eval={"every": 2, "max_batches": 1, "batch_size": 4},
                     monitor={"oracle": str(tiny_teacher), "mode": "token", "prompts": 2})
    run_training(cfg, show_progress=False)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "eval"]
    assert len(evals) == 2 and all("proxy_kl" in e and "golden_kl" in e for e in evals)
    assert all(abs(e["proxy_kl"] - e["golden_kl"]) < 1e-5 for e in evals)
    assert (tmp_path / "run" / "monitor.png").exists()
