"""The trainer's loss paths: `chunked_loss: auto` picks the chunked path only where it equals the plain one."""

from __future__ import annotations

import pytest
import torch

from lmdistill.train.run import build_trainer
from tests.conftest import save_tiny_model
from tests.train.helpers import run_config


def _losses_and_grads(trainer, steps: int = 3):
    grads: list[dict[str, torch.Tensor]] = []
    model = trainer.accelerator.unwrap_model(trainer.model)
    step = trainer.optimizer.step

    def record_then_step(*args, **kwargs):
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = record_then_step
    return [trainer.train_step(s) for s in range(steps)], grads


@pytest.mark.parametrize("objective", ["forward_kl", {"name": "jsd", "beta": 0.5}, "cross_entropy"])
def test_auto_chunked_equals_plain(tmp_path, verse_pairs_jsonl, cache_dir, small_tokenizer, tiny_teacher, objective):
    student = save_tiny_model(tmp_path / "s", small_tokenizer, layers=1, hidden=32, seed=5)
    runs = {}
    for mode in ("auto", False):
        cfg = run_config(
            tmp_path / f"{mode}", verse_pairs_jsonl, cache_dir, student, teacher=tiny_teacher, objective=objective,
            train={"steps": 3, "batch_size": 4, "micro_batch_size": 2, "chunked_loss": mode, "chunk_size": 24},
        )
        trainer, _ = build_trainer(cfg, show_progress=False)
        runs[mode] = (_losses_and_grads(trainer), trainer.use_chunked)
    (auto_losses, auto_grads), auto_used = runs["auto"]
    (plain_losses, plain_grads), plain_used = runs[False]
    assert auto_used is True and plain_used is False
    assert auto_losses == pytest.approx(plain_losses, rel=1e-5)
    for a, p in zip(auto_grads, plain_grads):
        assert a.keys() == p.keys() and a
        for key in a:
            # float32 weight gradients summed over every token in a different order (chunks vs one matmul):
            # entries near zero differ by a few 1e-7 on some CPUs' SIMD kernels (seen with AVX-512)
            torch.testing.assert_close(a[key], p[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", [
    {"mix": [{"name": "cross_entropy"}, {"name": "projected_kd", "temperature": 2.0}]},
    {"mix": [{"name": "cross_entropy"}, {"name": "hidden_states", "weight": 0.5}]},
    {"mix": [{"name": "cross_entropy"}, {"name": "uld", "weight": 0.5}]},
], ids=["projected_kd+ce", "ce+hidden_states", "uld+ce"])
def test_auto_chunked_equals_plain_across_tokenizers(tmp_path, kjv_small_txt, cache_dir, student_dir, other_teacher,
                                                     objective):
    """A teacher with another tokenizer: projected_kd (and label-only logit parts) take the student's rows chunk by
    chunk with the plain path's losses and gradients; objectives coupling a sequence's rows (ULD) stay plain."""
    runs = {}
    for mode in ("auto", False):
        cfg = run_config(tmp_path / f"{mode}", kjv_small_txt, cache_dir, student_dir, other_teacher, objective=objective,
                         vocab={"rung": "different"}, train={"steps": 2, "warmup_steps": 0, "chunk_size": 24})
        trainer, _ = build_trainer(cfg, show_progress=False)
        try:
            runs[mode] = (_losses_and_grads(trainer, steps=2), trainer.use_chunked)
        finally:
            trainer.close()
    (auto_losses, auto_grads), auto_used = runs["auto"]
    (plain_losses, plain_grads), _ = runs[False]
    assert auto_used is (objective["mix"][1]["name"] != "uld")
    assert auto_losses == pytest.approx(plain_losses, rel=1e-5)
    for a, p in zip(auto_grads, plain_grads):
        assert a.keys() == p.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], p[key], rtol=1e-4, atol=1e-6)


def test_auto_keeps_plain_path_for_post_processed_logits(tmp_path, kjv_small_txt, cache_dir, small_tokenizer, tiny_teacher):
    """A model whose logits are not hidden @ W (here: scaled, like soft-capping models) must not be chunked."""
    student = save_tiny_model(tmp_path / "s", small_tokenizer, layers=1, hidden=32, seed=5)
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student, teacher=tiny_teacher, train={"steps": 1})
    trainer, _ = build_trainer(cfg, show_progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled
    trainer.train_step(0)
    assert trainer.use_chunked is False


def test_auto_keeps_plain_path_for_whole_batch_objectives(tmp_path, kjv_small_txt, cache_dir, small_tokenizer, tiny_teacher):
    student = save_tiny_model(tmp_path / "s", small_tokenizer, layers=1, hidden=32, seed=5)
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student, teacher=tiny_teacher, train={"steps": 1},
                     objective={"name": "sinkd", "group_size": None})
    trainer, _ = build_trainer(cfg, show_progress=False)
    trainer.train_step(0)
    assert trainer.use_chunked is False


def test_auto_keeps_plain_path_when_config_soft_caps_logits(tmp_path, kjv_small_txt, cache_dir, small_tokenizer, tiny_teacher):
    """Soft-capping barely changes small logits at initialisation, so the numeric probe alone could miss it:
    the config field decides."""
    student = save_tiny_model(tmp_path / "s", small_tokenizer, layers=1, hidden=32, seed=5)
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student, teacher=tiny_teacher, train={"steps": 1})
    trainer, _ = build_trainer(cfg, show_progress=False)
    trainer.accelerator.unwrap_model(trainer.model).config.final_logit_softcapping = 30.0
    trainer.train_step(0)
    assert trainer.use_chunked is False


def test_tgeo_inside_a_mix_is_refused(tmp_path, kjv_small_txt, cache_dir, small_tokenizer, tiny_teacher):
    from lmdistill.errors import ConfigError

    student = save_tiny_model(tmp_path / "s", small_tokenizer, layers=1, hidden=32, seed=5)
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student, teacher=tiny_teacher,
                     objective={"mix": [{"name": "tgeo", "weight": 0.5}, {"name": "forward_kl", "weight": 0.5}]})
    with pytest.raises(ConfigError, match="mix"):
        build_trainer(cfg, show_progress=False)
