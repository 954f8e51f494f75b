"""DAC-KL in the real trainer: its bounds network learns through the outer step, and a checkpoint restores it."""

from __future__ import annotations

import torch

from lmdistill.train.run import build_trainer
from tests.conftest import save_tiny_model
from tests.train.helpers import run_config


def test_dackl_network_learns_in_the_trainer_and_resumes(tmp_path, kjv_small_txt, cache_dir, small_tokenizer, tiny_teacher):
    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=2)
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student, teacher=tiny_teacher,
                     objective={"name": "dac_kl", "n_inputs": 16, "hidden_size": 8},
                     train={"steps": 4, "lr": 1e-2, "warmup_steps": 0}, checkpoint={"every": 2, "keep": 2})
    trainer, _ = build_trainer(cfg, show_progress=False)
    net_before = [p.detach().clone() for p in trainer.objective.parameters()]
    model = trainer.accelerator.unwrap_model(trainer.model)
    student_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.train()
    net_after = [p.detach().clone() for p in trainer.objective.parameters()]
    assert all(torch.isfinite(p).all() for p in net_after)
    assert any(not torch.equal(a, b) for a, b in zip(net_after, net_before)), "bounds network never updated"
    assert any(not torch.equal(v, student_before[k]) for k, v in model.state_dict().items())
    trainer.close()
    # a new trainer resumed from the last checkpoint (step 4 of 4: nothing left to train) has the trained network
    again, _ = build_trainer(cfg, show_progress=False)
    again.train(resume=True)
    assert again.step == 4
    for a, b in zip(again.objective.parameters(), net_after):
        assert torch.equal(a.detach(), b)
