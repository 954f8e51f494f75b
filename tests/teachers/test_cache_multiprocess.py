"""Two processes (torchrun, gloo on CPU, through Accelerate) build the same cache as one process."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmdistill.teachers.cache import TeacherCache
from tests.teachers.conftest import BLOCK

WORKER = Path(__file__).with_name("torchrun_cache.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_build_the_same_cache_as_one(tmp_path, trained_teacher, few_chapters, cache_dir, few_data):
    def config(name: str) -> Path:
        raw = {
            "output": str(tmp_path / name),
            "data": {"corpus": str(few_chapters), "block_size": BLOCK, "cache_dir": str(cache_dir)},
            "teacher": {"path": str(trained_teacher)},
            "cache": {"k": 8, "blocks_per_shard": 45},  # 478 blocks: 11 shards, the ranks get 6 and 5
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    one = subprocess.run([sys.executable, str(WORKER), str(config("one"))], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         str(WORKER), str(config("two"))],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    summary_one, summary_two = json.loads(one.stdout), json.loads(two.stdout)  # rank 0 prints the summary
    assert summary_one["world_size"] == 1 and summary_two["world_size"] == 2
    n_blocks = len(few_data.blocks("train"))
    n_shards = TeacherCache(tmp_path / "one").manifest["n_shards"]
    assert n_shards == math.ceil(n_blocks / 45) and n_shards % 2 == 1 and TeacherCache(tmp_path / "two").n_blocks == n_blocks
    # rank 0 took the even shards, rank 1 the odd ones
    assert summary_two["shards_written_here"] == (n_shards + 1) // 2
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m1["shards"] == m2["shards"]  # same files, byte for byte (SHA-256)
    for name in ("plan.json",) + tuple(f"shard-{s:05d}.bin" for s in range(n_shards)):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
