"""Two processes with gloo on CPU (through torchrun + Accelerate) equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import save_tiny_model

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("objective", [
    {"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]},
    # a learned projection outside the DDP-wrapped student: its gradients must be averaged over ranks too
    {"mix": [{"name": "forward_kl", "weight": 0.5}, {"name": "hidden_states", "weight": 0.5}]},
], ids=["logits", "hidden-states"])
def test_two_processes_equal_one(objective, tmp_path, verse_pairs_jsonl, cache_dir, small_tokenizer, tiny_teacher):
    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=7)
    config = {
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": str(verse_pairs_jsonl), "block_size": 32, "cache_dir": str(cache_dir)},
        "student": {"path": str(student)},
        "teacher": {"path": str(tiny_teacher)},
        "objective": objective,
        "train": {"steps": 3, "batch_size": 8, "micro_batch_size": 2, "lr": 1e-2, "warmup_steps": 1},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    single = subprocess.run([sys.executable, str(WORKER), str(cfg_path), str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         str(WORKER), str(cfg_path), str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    w1, w2 = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    import torch

    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_cli_under_torchrun_finishes_with_exit_code_zero(tmp_path, verse_pairs_jsonl, cache_dir, small_tokenizer,
                                                             tiny_teacher):
    """`torchrun ... lmdistill distill` as users run it: both ranks finish, leave the process group, and exit 0."""
    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=7)
    config = {
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": str(verse_pairs_jsonl), "block_size": 32, "cache_dir": str(cache_dir)},
        "student": {"path": str(student)},
        "teacher": {"path": str(tiny_teacher)},
        "objective": "forward_kl",
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0},
        "eval": {"every": 2, "max_batches": 1, "batch_size": 4},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "lmdistill.cli", "distill", str(cfg_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert json.loads(done.stdout[done.stdout.index("{"):])["output_dir"] == str(tmp_path / "run")
