"""Task runs through the one trainer: on-policy distillation resumes bit-identically; `sft`, `generate`
and `distill` (with a regime) as commands."""

from __future__ import annotations

import json
import math

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from lmdistill.config import validate_config
from lmdistill.generation.run import build_task_run
from lmdistill.generation.run_config import TaskRunConfig
from tests.train.helpers import interrupt_then_resume


def task_cfg(tmp_path, student_dir, teacher_dir=None, **overrides) -> TaskRunConfig:
    raw = {
        "output_dir": str(tmp_path / "run"),
        "cache_dir": str(tmp_path / "cache"),
        "student": {"path": str(student_dir)},
        "objective": "cross_entropy",
        "regime": {"kind": "fixed", "max_length": 48,
                   "task": {"name": "kjv_continue", "prompt_words": 4, "response_words": 6,
                            "max_examples": {"train": 400, "validation": 40, "test": 40}}},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "log_every": 1},
        "eval": {"every": 1000, "max_batches": 1, "batch_size": 4},
        "checkpoint": {"every": 2, "keep": 2},
        "generation": {"max_examples": 8, "batch_size": 8, "sampling": {"greedy": True, "max_new_tokens": 10}},
    }
    if teacher_dir is not None:
        raw["teacher"] = {"path": str(teacher_dir)}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return validate_config(raw, "test", TaskRunConfig)


def weights(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_on_policy_distillation_resumes_bit_identically(tmp_path, student_dir, saved_teacher, continue_task, monkeypatch):
    regime = {"kind": "on_policy", "lmbda": 1.0, "max_length": 48,
              "sampling": {"greedy": False, "temperature": 1.0, "max_new_tokens": 10},
              "task": {"name": "kjv_continue", "prompt_words": 4, "response_words": 6}}
    full_cfg = task_cfg(tmp_path / "a", student_dir, saved_teacher, objective={"name": "jsd", "beta": 0.5}, regime=regime)
    full = build_task_run(full_cfg, splits=continue_task, show_progress=False).trainer
    full.train()
    expected = weights(full)
    assert full.source.stats["student_steps"] == 4

    cfg = task_cfg(tmp_path / "b", student_dir, saved_teacher, objective={"name": "jsd", "beta": 0.5}, regime=regime)
    resumed = interrupt_then_resume(cfg, monkeypatch, dies_in_step=4, build=lambda c: build_task_run(
        c, splits=continue_task, show_progress=False).trainer)
    got = weights(resumed)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_kid_and_scrg_runs_train_the_student(tmp_path, student_dir, saved_teacher, continue_task):
    for kind, extra in (("kid", {"kid_mask_ratio": 0.3}), ("scrg", {"lmbda": 1.0, "scrg_threshold": 0.5})):
        regime = {"kind": kind, "max_length": 48, "task": {"name": "kjv_continue", "prompt_words": 4, "response_words": 6},
                  **extra}
        if kind == "scrg":
            regime["sampling"] = {"max_new_tokens": 10}
        cfg = task_cfg(tmp_path / kind, student_dir, saved_teacher, objective="forward_kl", regime=regime,
                       train={"steps": 3})
        run = build_task_run(cfg, splits=continue_task, show_progress=False)
        before = weights(run.trainer)
        result = run.trainer.train()
        after = weights(run.trainer)
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history if r["kind"] == "train")


def app_with_commands() -> typer.Typer:
    from lmdistill.cli import app

    return app


def test_sft_generate_and_sequence_kd_commands(tmp_path, student_dir, saved_teacher):
    runner = CliRunner()
    app = app_with_commands()
    task = {"name": "kjv_continue", "prompt_words": 4, "response_words": 6,
            "max_examples": {"train": 24, "validation": 40, "test": 40}}
    # 1. sft: label-only fine-tuning on the task, then generation metrics
    sft_cfg = task_cfg(tmp_path / "sft", student_dir).model_dump(mode="json")
    sft_cfg["regime"]["task"] = task
    sft_path = tmp_path / "sft.yaml"
    sft_path.write_text(yaml.safe_dump(sft_cfg))
    result = runner.invoke(app, ["sft", str(sft_path), "--set", "train.steps=2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "sft" / "run" / "generation_metrics.json").read_text())
    assert 0.0 <= metrics["generation"]["rouge_l"] <= 1.0 and metrics["generation"]["n"] == 8
    assert (tmp_path / "sft" / "run" / "final" / "model.safetensors").exists()

    # 2. generate: the teacher answers the training prompts into a store
    store = tmp_path / "teacher.jsonl"
    gen_path = tmp_path / "gen.yaml"
    gen_path.write_text(yaml.safe_dump({"task": task, "store": str(store), "teacher": {"path": str(saved_teacher)},
                                        "sampling": {"greedy": True, "max_new_tokens": 10}}))
    result = runner.invoke(app, ["generate", str(gen_path)])
    assert result.exit_code == 0, result.output
    assert len(store.read_text().splitlines()) == 24
    result = runner.invoke(app, ["generate", str(gen_path)])
    assert json.loads(result.output[result.output.index("{"):])["requested"] == 0

    # 3. sequence-level KD on the stored answers
    kd_cfg = task_cfg(tmp_path / "kd", student_dir).model_dump(mode="json")
    kd_cfg["regime"] = {"kind": "sequence_kd", "store": str(store), "max_length": 48, "task": task}
    kd_path = tmp_path / "kd.yaml"
    kd_path.write_text(yaml.safe_dump(kd_cfg))
    result = runner.invoke(app, ["distill", str(kd_path), "--set", "train.steps=2"])
    assert result.exit_code == 0, result.output
    # sft refuses other regimes
    result = runner.invoke(app, ["sft", str(kd_path)])
    assert result.exit_code != 0 and "regime.kind must be 'fixed'" in str(result.exception)


def test_generate_with_a_blackbox_teacher(tmp_path, trained_tiny, verse_tokenizer):
    from lmdistill.generation.run import run_generate
    from lmdistill.generation.run_config import GenerateConfig
    from lmdistill.generation.server import ModelServer

    task = {"name": "kjv_continue", "prompt_words": 4, "response_words": 6, "max_examples": {"train": 12}}
    with ModelServer(trained_tiny, verse_tokenizer, api_key="sk-local-test") as server:
        cfg = validate_config({"task": task, "store": str(tmp_path / "bb.jsonl"),
                               "blackbox": {"base_url": server.base_url, "model": "tiny", "api_key_env": "BB_KEY",
                                            "concurrency": 4},
                               "sampling": {"greedy": True, "max_new_tokens": 8}}, "test", GenerateConfig)
        report = run_generate(cfg, environ={"BB_KEY": "sk-local-test"})
        assert report.requested == 12 and len(server.requests) == 12
        assert run_generate(cfg, environ={"BB_KEY": "sk-local-test"}).already_stored == 12
        assert len(server.requests) == 12


def test_task_run_validates_on_response_tokens_only(tmp_path, student_dir, saved_teacher, continue_task):
    """The logged eval entries of a task run are the response-only NLL (and teacher agreement/KL) of the
    first eval.max_batches * eval.batch_size validation examples, each scored on its own, unpadded."""
    cfg = task_cfg(tmp_path, student_dir, saved_teacher, objective="forward_kl",
                   train={"steps": 3}, eval={"every": 2, "max_batches": 1, "batch_size": 2})
    run = build_task_run(cfg, splits=continue_task, show_progress=False)
    result = run.trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 3]
    final = evals[-1]
    assert final == {k: v for k, v in result.final_metrics.items()} | {"kind": "eval"}

    # independent float64 reference: each example alone, no padding, response tokens + EOS only
    student = run.trainer.accelerator.unwrap_model(run.trainer.model).eval()
    teacher = run.teacher_model.eval()
    tok = run.tokenizer
    bos, eos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id, tok.eos_token_id
    V = run.trainer.vocab_size
    nll = kl = agree = 0.0
    n = n_bytes = 0
    with torch.no_grad():
        for doc in continue_task["validation"][:2]:
            prompt = tok(doc.prompt, add_special_tokens=False)["input_ids"]
            response = tok(doc.response, add_special_tokens=False)["input_ids"] + [eos]
            seq = torch.tensor([[bos] + prompt + response])
            first = len(prompt)  # logits at position bos+prompt-1 predict the first response token
            s = torch.log_softmax(student(input_ids=seq).logits[0, first:].double()[..., :V], -1)
            t = torch.log_softmax(teacher(input_ids=seq).logits[0, first:].double()[..., :V], -1)
            s, t = s[: len(response)], t[: len(response)]
            targets = torch.tensor(response)
            nll -= s[torch.arange(len(response)), targets].sum().item()
            kl += (t.exp() * (t - s)).sum().item()
            agree += (t.argmax(-1) == s.argmax(-1)).sum().item()
            n += len(response)
            n_bytes += len(doc.response.encode("utf-8"))
    assert final["tokens"] == n
    assert final["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert final["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert final["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert final["kl_to_teacher"] == pytest.approx(kl / n, rel=1e-4, abs=1e-7)
    assert final["top1_agreement"] == pytest.approx(agree / n)
    # the intermediate eval scores the same response targets
    assert evals[0]["tokens"] == n and evals[0]["loss"] != final["loss"]


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_distillm2_sees_which_rows_the_student_generated(tmp_path, student_dir, saved_teacher, lmbda, monkeypatch):
    """The trainer binds each batch's `on_policy` flags to the objective (Objective.for_batch): DistiLLM-2 applies
    skew reverse KL exactly to the student-generated rows and skew KL to the others."""
    from lmdistill.losses.distillm2 import DistiLLM2

    seen = []
    original = DistiLLM2.per_token

    def recording(self, logits, teacher, labels, *, context=None, student_generated=None, **kwargs):
        seen.append(None if student_generated is None else student_generated.clone())
        return original(self, logits, teacher, labels, context=context, student_generated=student_generated, **kwargs)

    monkeypatch.setattr(DistiLLM2, "per_token", recording)
    regime = {"kind": "on_policy", "lmbda": lmbda, "max_length": 48, "sampling": {"max_new_tokens": 6},
              "task": {"name": "kjv_continue", "prompt_words": 4, "response_words": 6,
                       "max_examples": {"train": 40, "validation": 8, "test": 8}}}
    cfg = task_cfg(tmp_path, student_dir, saved_teacher, objective="distillm2", regime=regime,
                   train={"steps": 1, "chunked_loss": False})
    run = build_task_run(cfg, show_progress=False)
    run.trainer.train_step(0)
    flags = [f for f in seen if f is not None]
    assert flags and all(bool((f == bool(lmbda)).all()) for f in flags)
