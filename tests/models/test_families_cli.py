"""Every family users distil, by ``path:``: tiny random models saved in bfloat16, distilled between mixed pairs
through the ``lmdistill distill`` command."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.models.families import FAMILIES, family_config, save_family_model
from lmdistill.models.loading import load_causal_lm

# (teacher, student, teacher dtype, student tied?) : every family is a teacher once and a student once; tied and
# untied output layers on both sides; Gemma 2's soft-capped logits as teacher and as student
PAIRS = [
    ("llama", "qwen2", "float32", True),  # Qwen2-0.5B ties its embeddings
    ("qwen2", "gemma3", "bfloat16", None),
    ("qwen3", "phi3", "bfloat16", None),
    ("mistral", "gpt_neox", "float32", None),
    ("gemma2", "llama", "bfloat16", None),
    ("gemma3", "mistral", "float32", None),
    ("phi3", "gpt2", "float32", None),
    ("gpt_neox", "qwen3", "bfloat16", None),
    ("gpt2", "gemma2", "float32", None),
]


def test_pairs_cover_every_family():
    assert {t for t, *_ in PAIRS} == set(FAMILIES) == {s for _, s, *_ in PAIRS}


def test_family_defaults_are_the_real_choices(small_tokenizer):
    ids = dict(vocab_size=len(small_tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=1)
    assert family_config("gemma2", **ids).final_logit_softcapping == 30.0
    assert family_config("gemma2", **ids).tie_word_embeddings and family_config("gpt2", **ids).tie_word_embeddings
    assert not family_config("llama", **ids).tie_word_embeddings and not family_config("gpt_neox", **ids).tie_word_embeddings
    assert family_config("qwen2", tie_word_embeddings=True, **ids).tie_word_embeddings
    with pytest.raises(Exception, match="unknown model family 'llama3'; allowed: llama, qwen2"):
        family_config("llama3", **ids)
    with pytest.raises(Exception, match="'final_logit_softcap' is not a field of Gemma2Config"):
        family_config("gemma2", overrides={"final_logit_softcap": 2.0}, **ids)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, small_tokenizer):
    """Each family saved twice in bfloat16 safetensors: a wider 'teacher' and a narrower 'student'."""
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for i, (teacher, student, _, tied) in enumerate(PAIRS):
        dirs[("teacher", teacher)] = save_family_model(root / f"teacher-{teacher}", teacher, small_tokenizer,
                                                      dtype=torch.bfloat16, seed=10 + i, hidden=48, heads=4, layers=2)
        dirs[("student", student)] = save_family_model(root / f"student-{student}", student, small_tokenizer,
                                                      dtype=torch.bfloat16, seed=20 + i, hidden=32, heads=2, layers=1,
                                                      tie_word_embeddings=tied)
    return dirs


@pytest.mark.parametrize("teacher,student,teacher_dtype,tied", PAIRS, ids=[f"{t}-to-{s}" for t, s, *_ in PAIRS])
def test_distil_between_families_through_the_cli(teacher, student, teacher_dtype, tied, family_dirs, tmp_path,
                                                kjv_small_txt, cache_dir):
    teacher_dir, student_dir = family_dirs[("teacher", teacher)], family_dirs[("student", student)]
    stored = load_file(student_dir / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": str(kjv_small_txt), "block_size": 32, "cache_dir": str(cache_dir)},
        "teacher": {"path": str(teacher_dir), "dtype": teacher_dtype},
        "student": {"path": str(student_dir)},
        "objective": {"name": "jsd", "beta": 0.5},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0},
        "eval": {"every": 3, "max_batches": 1, "batch_size": 4},
        "checkpoint": {"every": 100},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["distill", str(tmp_path / "run.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    metrics = json.loads(result.stdout[result.stdout.index("{"):])
    assert 0 < metrics["bits_per_byte"] < 20 and metrics["perplexity"] > 1
    path_lines = [line for line in result.stderr.splitlines() if "loss on the" in line]  # the CLI's INFO log
    assert path_lines, "the trainer did not say which loss path it took"
    # every family, soft-capped Gemma-2 included (its cap is applied per chunk), takes the chunked path
    assert "chunked path" in path_lines[0], path_lines

    final = load_causal_lm(tmp_path / "run" / "final")
    original = load_causal_lm(student_dir)
    assert type(final) is type(original) and final.config.tie_word_embeddings == original.config.tie_word_embeddings
    moved = [n for n, p in final.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
    assert moved, "the student did not change"
