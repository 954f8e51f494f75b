"""Batch order and atomic checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdistill.train.checkpoint import CheckpointManager
from lmdistill.train.schedule import BatchSchedule, accumulation_steps


def test_ranks_and_microbatches_partition_the_global_batch():
    sched = BatchSchedule(n_items=37, global_batch=8, seed=3)
    for step in range(12):
        glob = sched.global_indices(step)
        parts = [np.concatenate(sched.micro_batches(step, r, 2, 2)) for r in range(2)]
        assert np.array_equal(np.concatenate(parts), glob)
    # consecutive steps walk through a permutation: every item once per epoch
    first_epoch = np.concatenate([sched.global_indices(s) for s in range(5)])[:37]
    assert sorted(first_epoch.tolist()) == list(range(37))
    assert np.array_equal(BatchSchedule(37, 8, 3).global_indices(9), sched.global_indices(9))
    assert not np.array_equal(BatchSchedule(37, 8, 4).global_indices(0), sched.global_indices(0))


def test_accumulation_steps_validation():
    assert accumulation_steps(16, 4, 2) == (4, 2)
    assert accumulation_steps(16, None, 1) == (16, 1)
    with pytest.raises(Exception, match="divisible"):
        accumulation_steps(15, None, 2)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3))

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        path.mkdir(parents=True)
        save_file({"w": self.w.detach()}, str(path / "model.safetensors"))


def test_kill_during_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    model = _Model()
    opt = torch.optim.AdamW(model.parameters())
    model.w.sum().backward()
    opt.step()
    mgr = CheckpointManager(tmp_path, keep=2)
    rng_at_save = torch.get_rng_state()
    mgr.save(1, model=model, tokenizer=None, optimizer=opt, state={"x": 1})

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # the process is killed while writing the optimizer state

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, model=model, tokenizer=None, optimizer=opt, state={"x": 2})
    monkeypatch.undo()
    latest = CheckpointManager(tmp_path).latest()
    assert latest.step == 1
    opt2 = torch.optim.AdamW(_Model().parameters())
    state = CheckpointManager.load_state(latest, opt2)
    assert state["x"] == 1 and state["step"] == 1
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.get_rng_state(), rng_at_save)  # RNG restored to its state at save time
    # a later complete save cleans the partial directory and moves 'latest'
    mgr.save(3, model=model, tokenizer=None, optimizer=opt, state={"x": 3})
    assert CheckpointManager(tmp_path).latest().step == 3
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_keep_prunes_old_checkpoints(tmp_path):
    model = _Model()
    opt = torch.optim.AdamW(model.parameters())
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        mgr.save(step, model=model, tokenizer=None, optimizer=opt, state={})
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000003"]
