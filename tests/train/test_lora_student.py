"""A LoRA student through the trainer (`student: {path, lora: {...}}`): only the adapters train, checkpoints hold
them and resume exactly, the final directory has the adapter and the merged model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmdistill.config import ModelConfig
from lmdistill.models.loading import load_causal_lm
from lmdistill.models.lora import lora_state
from lmdistill.train.run import build_trainer
from tests.conftest import save_tiny_model
from tests.train.helpers import interrupt_then_resume, run_config


@pytest.fixture()
def student_dir(tmp_path, small_tokenizer):
    return save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=2)


def _cfg(where, corpus, cache_dir, student, teacher, **train):
    cfg = run_config(where, corpus, cache_dir, student, teacher, objective="forward_kl",
                     train={"steps": 4, "lr": 1e-2, "warmup_steps": 0, **train}, checkpoint={"every": 2, "keep": 3})
    cfg.student = ModelConfig(path=str(student), lora={"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"]})
    return cfg


def test_only_the_adapters_train_and_resume_is_exact(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher,
                                                     monkeypatch):
    straight, _ = build_trainer(_cfg(tmp_path / "a", kjv_small_txt, cache_dir, student_dir, tiny_teacher), show_progress=False)
    model = straight.accelerator.unwrap_model(straight.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    straight.train()
    final = straight.save_final()
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    expected = lora_state(model)
    assert (final / "adapter" / "adapter_model.safetensors").exists() and (final / "model.safetensors").exists()
    merged = load_causal_lm(final)
    assert not any("lora" in k for k in merged.state_dict())

    resumed = interrupt_then_resume(_cfg(tmp_path / "b", kjv_small_txt, cache_dir, student_dir, tiny_teacher),
                                    monkeypatch, dies_in_step=3)
    saved = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "step-0000002" / "model" / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # a checkpoint holds the adapters only
    got = lora_state(resumed.accelerator.unwrap_model(resumed.model))
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_step(tmp_path, kjv_small_txt, cache_dir, student_dir, tiny_teacher):
    plain, _ = build_trainer(_cfg(tmp_path / "a", kjv_small_txt, cache_dir, student_dir, tiny_teacher, steps=1),
                             show_progress=False)
    plain.train()
    ckpt, _ = build_trainer(_cfg(tmp_path / "b", kjv_small_txt, cache_dir, student_dir, tiny_teacher, steps=1,
                                 gradient_checkpointing=True), show_progress=False)
    ckpt.train()
    a = lora_state(plain.accelerator.unwrap_model(plain.model))
    b = lora_state(ckpt.accelerator.unwrap_model(ckpt.model))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
