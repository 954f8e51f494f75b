"""A rank that stops answering ends a multi-process run with an error naming it, after the collective
timeout that reaches Accelerate's process group."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from lmdistill.errors import ConfigError
from lmdistill.train.guard import collective_timeout_seconds, make_accelerator
from tests.conftest import save_tiny_model

WORKER = Path(__file__).with_name("hang_worker.py")


def test_the_timeout_reaches_accelerate(monkeypatch):
    monkeypatch.setenv("LMDISTILL_COLLECTIVE_TIMEOUT", "7")
    acc = make_accelerator()
    assert acc.init_handler is not None and acc.init_handler.timeout == timedelta(seconds=7)
    monkeypatch.setenv("LMDISTILL_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="LMDISTILL_COLLECTIVE_TIMEOUT must be a number of seconds"):
        collective_timeout_seconds()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_stopped_rank_is_named_by_the_others(tmp_path, kjv_small_txt, cache_dir, small_tokenizer):
    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=7)
    config = {
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": str(kjv_small_txt), "block_size": 32, "cache_dir": str(cache_dir)},
        "student": {"path": str(student)}, "tokenizer": {"path": str(student)},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1},
        "eval": {"every": 1000, "max_batches": 2}, "checkpoint": {"every": 2},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]) + os.pathsep + str(Path(__file__).parents[2] / "src"),
               "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "LMDISTILL_COLLECTIVE_TIMEOUT": "8", "HANG_RANK": "1", "HANG_STEP": "3"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(cfg_path)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        _, err = procs[0].communicate(timeout=300)
    finally:
        procs[1].kill()  # stopped: only SIGKILL ends it
        procs[1].communicate()
        procs[0].kill()
    assert procs[0].returncode == 2, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert "rank 0: waiting for the other ranks failed at step 3" in errors[0]
    assert f"stopped answering: rank 1 (pid {procs[1].pid} " in errors[0] and "rank 0 (" not in errors[0]
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir()  # the last checkpoint before the hang
