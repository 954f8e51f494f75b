"""The console entry point: help, clear errors without tracebacks, pretrain + eval end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import save_tiny_model


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmdistill.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}, timeout=600)


def test_help_lists_commands():
    out = _cli("--help")
    assert out.returncode == 0
    for command in ("pretrain", "distill", "eval", "demo", "presets", "sft", "generate", "serve", "cache-teacher",
                    "select", "embed-distill", "embed-eval", "compare", "report", "distill-mixture", "active-distill",
                    "hacking-report"):
        assert command in out.stdout


def test_config_error_is_one_clear_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("teacher: {path: /nonexistent/teacher}\ntrain: {stepz: 3}\n")
    out = _cli("distill", str(cfg))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "teacher.path" in out.stderr and "train.stepz" in out.stderr and "did you mean 'steps'" in out.stderr


def test_pretrain_then_eval(tmp_path, kjv_small_txt, cache_dir, small_tokenizer):
    init = save_tiny_model(tmp_path / "init", small_tokenizer, layers=1, hidden=32)
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": str(kjv_small_txt), "block_size": 32, "cache_dir": str(cache_dir)},
        "student": {"path": str(init)},
        "tokenizer": {"path": str(init)},
        "train": {"steps": 20, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2},
        "eval": {"every": 10, "max_batches": 2},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = _cli("pretrain", str(tmp_path / "c.yaml"))
    assert out.returncode == 0, out.stderr[-2000:]
    reported = json.loads(out.stdout[out.stdout.index("{"):])
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    env_cache = {"LMDISTILL_CACHE_DIR": str(cache_dir)}
    os.environ.update(env_cache)
    try:
        ev = _cli("eval", str(final), "--corpus", str(kjv_small_txt), "--block-size", "32", "--max-batches", "2")
    finally:
        os.environ.pop("LMDISTILL_CACHE_DIR")
    assert ev.returncode == 0, ev.stderr[-2000:]
    metrics = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert metrics["perplexity"] == pytest.approx(reported["perplexity"], rel=1e-4)
    assert metrics["bits_per_byte"] > 0
