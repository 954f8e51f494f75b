"""The minillm regime (MiniLLM, arXiv 2306.08543): teacher-mixed sampling, its batch source and config, a task
run through the one trainer (and the `distill` command), and exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmdistill.config import validate_config
from lmdistill.errors import ConfigError
from lmdistill.generation.batching import encode_prompts
from lmdistill.generation.config import RegimeConfig, SamplingConfig
from lmdistill.generation.run import build_task_run
from lmdistill.generation.run_config import TaskRunConfig
from lmdistill.generation.sampling import SamplingParams, generate, generate_mixed, mixed_probs
from lmdistill.generation.sources import MiniLLMSource, build_batch_source
from lmdistill.seeds import derived_seed
from tests.generation.conftest import tiny_gpt2
from tests.train.helpers import interrupt_then_resume

TASK = {"name": "kjv_continue", "prompt_words": 4, "response_words": 6,
        "max_examples": {"train": 400, "validation": 40, "test": 40}}


def peaked_gpt2(seed: int, *, vocab: int = 6, scale: float = 8.0):
    """A one-layer GPT-2 over 6 tokens whose output is sharpened (final layer norm x scale), so two seeds give
    clearly different next-token distributions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=vocab - 1, bos_token_id=vocab - 1, pad_token_id=vocab - 1)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def pair():
    return peaked_gpt2(3), peaked_gpt2(5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_first_token_frequencies_follow_the_mixture(pair, alpha):
    student, teacher = pair
    prompt = [1, 2]
    with torch.no_grad():
        q = torch.softmax(student(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
        p = torch.softmax(teacher(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
    assert 0.5 * (q - p).abs().sum() > 0.5  # the endpoints are far apart: the test tells them apart
    n = 6000
    out = generate_mixed(student, teacher, [prompt] * n, alpha=alpha, eos_token_id=5, pad_token_id=5, max_new_tokens=1,
                         generator=torch.Generator().manual_seed(0), vocab_size=6)
    counts = torch.bincount(torch.tensor([o[0] for o in out]), minlength=6).double()
    expected = alpha * p + (1 - alpha) * q
    tolerance = 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-3
    assert ((counts / n - expected).abs() <= tolerance).all(), (counts / n, expected)
    for other in (q, p):  # and it is not the other distribution (unless it is the same endpoint)
        if not torch.allclose(other, expected):
            assert ((counts / n - other).abs() > tolerance).any()


def test_endpoints_draw_exactly_what_the_student_or_teacher_would(pair):
    student, teacher = pair
    prompts = [[1, 2], [3], [0, 4, 2, 1]]
    params = SamplingParams(greedy=False, temperature=1.0, max_new_tokens=7)
    for alpha, model, other in ((0.0, student, teacher), (1.0, teacher, student), (0.0, student, None)):
        want = generate(model, prompts, eos_token_id=5, pad_token_id=5, params=params,
                        generator=torch.Generator().manual_seed(4), vocab_size=6)
        pair_ = (student, other) if alpha == 0.0 else (other, teacher)
        got = generate_mixed(*pair_, prompts, alpha=alpha, eos_token_id=5, pad_token_id=5, max_new_tokens=7,
                             generator=torch.Generator().manual_seed(4), vocab_size=6)
        assert got == want
    with pytest.raises(ValueError, match="needs the teacher"):
        generate_mixed(student, None, prompts, alpha=0.2, eos_token_id=5, max_new_tokens=3)


def test_mixed_sampling_with_and_without_the_cache_is_the_same(pair):
    student, teacher = pair
    prompts = [[1, 2], [3], [0, 4, 2, 1]]
    runs = [generate_mixed(student, teacher, prompts, alpha=0.4, eos_token_id=5, pad_token_id=5, max_new_tokens=8,
                           generator=torch.Generator().manual_seed(9), vocab_size=6, use_cache=cache)
            for cache in (True, False)]
    assert runs[0] == runs[1]
    torch.testing.assert_close(mixed_probs(torch.zeros(1, 4), torch.tensor([[0.0, 0.0, 0.0, -float("inf")]]), 0.5),
                               torch.tensor([[1 / 6 + 1 / 8, 1 / 6 + 1 / 8, 1 / 6 + 1 / 8, 1 / 8]]))


@pytest.fixture(scope="module")
def models(verse_tokenizer, trained_tiny):
    return tiny_gpt2(verse_tokenizer, layers=1, seed=21), trained_tiny


def minillm_source(tokenizer, docs, student, teacher, **regime) -> MiniLLMSource:
    regime.setdefault("sampling", SamplingConfig(max_new_tokens=10))
    src = build_batch_source(RegimeConfig(kind="minillm", max_length=64, **regime), tokenizer=tokenizer, global_batch=4,
                             seed=7, documents=docs)
    assert isinstance(src, MiniLLMSource)
    src.use_models(student, teacher, len(tokenizer))
    return src


def test_source_batches_hold_mixed_samples_with_their_alpha(verse_tokenizer, continue_task, models):
    student, teacher = models
    docs = continue_task["train"][:8]
    src = minillm_source(verse_tokenizer, docs, student, teacher, mix_alpha=0.3)
    (batch,) = src.micro_batches(2, 0, 1, 4)
    assert batch["mix_alpha"].tolist() == pytest.approx([0.3] * 4) and batch["on_policy"].tolist() == [1.0] * 4
    again = minillm_source(verse_tokenizer, docs, student, teacher, mix_alpha=0.3).micro_batches(2, 0, 1, 4)[0]
    assert torch.equal(batch["input_ids"], again["input_ids"])  # a pure function of (seed, step): resume reads the same
    # the labels are the mixed policy's sample for the step's generator, nothing else
    gen = torch.Generator().manual_seed(derived_seed(7, 2, 0, 0, "sample"))
    prompts = encode_prompts(verse_tokenizer, [docs[i].prompt for i in batch["example_index"].tolist()])
    want = generate_mixed(student, teacher, prompts, alpha=0.3, eos_token_id=verse_tokenizer.eos_token_id,
                          pad_token_id=verse_tokenizer.pad_token_id, max_new_tokens=10, generator=gen,
                          vocab_size=len(verse_tokenizer))
    for row, response in enumerate(want):
        assert [t for t in batch["labels"][row].tolist() if t != -100] == response
    assert src.stats["student_samples"] == 4


def test_regime_config_validation():
    assert RegimeConfig(kind="minillm").mix_alpha == 0.2
    with pytest.raises(ValueError, match="temperature 1"):
        RegimeConfig(kind="minillm", sampling=SamplingConfig(temperature=0.7))
    with pytest.raises(ValueError, match="temperature 1"):
        RegimeConfig(kind="minillm", sampling=SamplingConfig(top_k=5))
    with pytest.raises(ValueError, match="does not use mix_alpha"):
        RegimeConfig(kind="on_policy", mix_alpha=0.5)
    with pytest.raises(ValueError, match="does not use lmbda"):
        RegimeConfig(kind="minillm", lmbda=1.0)  # every step samples anyway: no coin
    with pytest.raises(ValueError):
        RegimeConfig(kind="minillm", mix_alpha=1.5)


def task_cfg(tmp_path, student_dir, teacher_dir, *, objective="minillm", **regime) -> TaskRunConfig:
    raw = {
        "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
        "student": {"path": str(student_dir)}, "teacher": {"path": str(teacher_dir)}, "objective": objective,
        "regime": {"kind": "minillm", "max_length": 48, "mix_alpha": 0.2, "sampling": {"max_new_tokens": 10},
                   "task": TASK, **regime},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "log_every": 1},
        "eval": {"every": 1000, "max_batches": 1, "batch_size": 4},
        "checkpoint": {"every": 2, "keep": 2},
        "generation": {"max_examples": 8, "batch_size": 8, "sampling": {"greedy": True, "max_new_tokens": 10}},
    }
    return validate_config(raw, "test", TaskRunConfig)


def weights(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_regime_and_objective_go_together(tmp_path, student_dir, saved_teacher, continue_task):
    with pytest.raises(ConfigError, match="regime.kind=minillm trains with objective: minillm"):
        build_task_run(task_cfg(tmp_path / "a", student_dir, saved_teacher, objective="forward_kl"),
                       splits=continue_task, show_progress=False)
    cfg = task_cfg(tmp_path / "b", student_dir, saved_teacher).model_dump(mode="json")
    cfg["regime"] = {"kind": "fixed", "max_length": 48, "task": TASK}
    with pytest.raises(ConfigError, match="use it with regime.kind: minillm"):
        build_task_run(validate_config(cfg, "test", TaskRunConfig), splits=continue_task, show_progress=False)


def test_minillm_task_run_trains_the_student(tmp_path, student_dir, saved_teacher, continue_task):
    run = build_task_run(task_cfg(tmp_path, student_dir, saved_teacher), splits=continue_task, show_progress=False)
    assert isinstance(run.trainer.source, MiniLLMSource) and run.trainer.source.teacher_lm is run.teacher_model
    before = weights(run.trainer)
    result = run.trainer.train()
    after = weights(run.trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    losses = [r["loss"] for r in result.history if r["kind"] == "train"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert run.trainer.source.stats["student_steps"] == 4 and run.trainer.source.stats["student_samples"] == 16


def test_minillm_resumes_bit_identically(tmp_path, student_dir, saved_teacher, continue_task, monkeypatch):
    full = build_task_run(task_cfg(tmp_path / "a", student_dir, saved_teacher), splits=continue_task,
                          show_progress=False).trainer
    full.train()
    expected = weights(full)

    cfg = task_cfg(tmp_path / "b", student_dir, saved_teacher)
    resumed = interrupt_then_resume(cfg, monkeypatch, dies_in_step=4, build=lambda c: build_task_run(
        c, splits=continue_task, show_progress=False).trainer)
    got = weights(resumed)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert resumed.source.stats == full.source.stats


def test_distill_command_with_the_example_config(tmp_path, student_dir, saved_teacher):
    from lmdistill.cli import app

    raw = yaml.safe_load(open("configs/generation/minillm.yaml"))
    raw.update(output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
               student={"path": str(student_dir)}, teacher={"path": str(saved_teacher)})
    raw["regime"]["max_length"] = 48
    raw["regime"]["task"] = {**raw["regime"]["task"], "max_examples": {"train": 40, "validation": 8, "test": 8}}
    raw.update(train={"steps": 2, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1},
               eval={"every": 1000, "max_batches": 1, "batch_size": 4},
               generation={"split": "test", "max_examples": 4, "batch_size": 4,
                           "sampling": {"greedy": True, "max_new_tokens": 8}})
    path = tmp_path / "minillm.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["distill", str(path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "generation_metrics.json").read_text())
    assert metrics["regime"] == "minillm" and metrics["source_stats"]["student_steps"] == 2
    assert 0.0 <= metrics["generation"]["rouge_l"] <= 1.0
