"""The teacher-hacking monitor (arXiv 2502.02671): its flags on constructed curves, its sequence-level KL against a
float64 reference, and the monitor inside a real distillation run (logged, plotted, restored on resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdistill.eval.monitor import (
    MonitorConfig,
    MonitoredEvaluator,
    TeacherHackingMonitor,
    golden_u_shape,
    model_scorer,
    powerlaw_departure,
    sample_responses,
    sequence_kl,
)
from lmdistill.train.run import build_trainer
from tests.conftest import save_tiny_model
from tests.train.helpers import run_config

STEPS = [10, 20, 40, 60, 80, 100, 120, 140]


# ------------------------------------------------------------------------------------------ flags
def test_u_shaped_golden_curve_with_falling_proxy_is_hacking():
    proxy = [2.0, 1.5, 1.2, 1.0, 0.9, 0.8, 0.75, 0.7]
    golden = [3.0, 2.5, 2.2, 2.1, 2.15, 2.3, 2.45, 2.6]          # minimum at step 60, then up 24%
    assert golden_u_shape(proxy, golden)
    monotone = [3.0, 2.5, 2.2, 2.1, 2.05, 2.0, 1.98, 1.97]
    assert not golden_u_shape(proxy, monotone)
    # the golden metric rises but so does the proxy: the student gets worse at both, which is not teacher hacking
    assert not golden_u_shape([2.0, 1.5, 1.2, 1.0, 1.1, 1.2, 1.3, 1.4], golden)
    # a rise within the tolerance is noise
    assert not golden_u_shape(proxy, [3.0, 2.5, 2.2, 2.1, 2.11, 2.12, 2.12, 2.13], rise_tolerance=0.02)
    assert not golden_u_shape(proxy[:2], golden[:2])


def test_power_law_proxy_is_not_flagged_and_a_plateau_is():
    exact = [3.0 * s ** -0.5 for s in STEPS]
    assert abs(powerlaw_departure(STEPS, exact)) < 1e-12
    plateau = [max(3.0 * s ** -0.5, 0.4) for s in STEPS]         # stops improving after step ~56
    deviation = powerlaw_departure(STEPS, plateau)
    assert deviation > 0.3                                       # well above the extrapolated power law
    assert powerlaw_departure(STEPS[:3], exact[:3]) is None      # nothing left to test against the fit


@settings(max_examples=100, deadline=None)
@given(c=st.floats(0.01, 100.0), b=st.floats(-2.0, 0.0), noise=st.floats(0.0, 0.001))
def test_any_exact_power_law_fits(c, b, noise):
    values = [c * s ** b * (1 + noise * (-1) ** i) for i, s in enumerate(STEPS)]
    assert abs(powerlaw_departure(STEPS, values)) < 0.01


def _monitor_with(history_proxy, history_golden=None) -> TeacherHackingMonitor:
    cfg = MonitorConfig(prompts=1, mode="sequence")
    monitor = TeacherHackingMonitor(cfg, teacher=lambda i, m: None, oracle=(lambda i, m: None) if history_golden else None,
                                    prompts=[[1]], eos_id=0, pad_id=0, vocab_size=2)
    monitor.history = [{"step": float(s), "proxy_kl": p, **({"golden_kl": g} if history_golden else {})}
                       for s, p, g in zip(STEPS, history_proxy, history_golden or history_proxy)]
    return monitor


def test_monitor_flags_read_its_history():
    flags = _monitor_with([2.0, 1.5, 1.2, 1.0, 0.9, 0.8, 0.75, 0.7], [3.0, 2.5, 2.2, 2.1, 2.15, 2.3, 2.45, 2.6]).flags()
    assert flags["teacher_hacking"] == 1.0
    no_oracle = _monitor_with([max(3.0 * s ** -0.5, 0.4) for s in STEPS]).flags()
    assert "teacher_hacking" not in no_oracle and no_oracle["proxy_departs_powerlaw"] == 1.0
    assert _monitor_with([3.0 * s ** -0.5 for s in STEPS]).flags()["proxy_departs_powerlaw"] == 0.0


# ------------------------------------------------------------------------------------------ distances
@pytest.fixture(scope="module")
def models(small_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=len(small_tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=small_tokenizer.eos_token_id, eos_token_id=small_tokenizer.eos_token_id)
        out.append(GPT2LMHeadModel(cfg).eval())
    return out


def test_sequence_kl_matches_a_float64_reference(models, small_tokenizer):
    p_model, q_model = models
    eos = small_tokenizer.eos_token_id
    prompts = [[eos, 40, 41, 42], [eos, 50], [eos, 60, 61]]
    responses = [[70, 71, 72, eos], [80], [90, 91, 92, 93, 94, 95]]       # different lengths: padding in the batch
    got = sequence_kl(model_scorer(p_model), model_scorer(q_model), prompts, responses, pad_id=0, vocab_size=300,
                      batch_size=2)
    expected = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):  # one sequence at a time, no padding, float64
            ids = torch.tensor([p + r])
            lp = torch.log_softmax(p_model(input_ids=ids).logits[0, :, :300].double(), -1)
            lq = torch.log_softmax(q_model(input_ids=ids).logits[0, :, :300].double(), -1)
            total = 0.0
            for t in range(len(p) - 1, len(p) + len(r) - 1):
                total += sum(math.exp(a) * (a - b) for a, b in zip(lp[t].tolist(), lq[t].tolist()))
            expected.append(total)
    assert got == pytest.approx(float(np.mean(expected)), rel=1e-6)  # float32 logits differ ~1e-8 between padded batches and single rows
    assert sequence_kl(model_scorer(p_model), model_scorer(p_model), prompts, responses, pad_id=0, vocab_size=300) == \
        pytest.approx(0.0, abs=1e-6)


def test_sampled_responses_are_reproducible_and_equal_row_by_row_sampling(models, small_tokenizer):
    model = models[0]
    eos = small_tokenizer.eos_token_id
    prompts = [[eos, 40, 41], [eos, 50, 51], [eos, 7]]
    scorer = model_scorer(model)
    first = sample_responses(scorer, prompts, eos_id=eos, max_new_tokens=12, seed=3, vocab_size=300)
    assert first == sample_responses(scorer, prompts, eos_id=eos, max_new_tokens=12, seed=3, vocab_size=300)
    assert all(1 <= len(r) <= 12 for r in first)
    assert all(eos not in r[:-1] for r in first)                      # nothing follows an EOS
    # the batched rows give the tokens a one-row-at-a-time loop draws with the same generators
    from lmdistill.seeds import derived_seed

    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(derived_seed(3, i))
        seq, out = list(prompt), []
        for _ in range(12):
            with torch.no_grad():
                probs = torch.softmax(model(input_ids=torch.tensor([seq])).logits[0, -1, :300].float(), -1)
            token = int(torch.multinomial(probs, 1, generator=gen))
            seq.append(token)
            out.append(token)
            if token == eos:
                break
        assert first[i] == out


# ------------------------------------------------------------------------------------------ in a run
def test_monitor_in_a_distillation_run_logs_plots_and_resumes(tmp_path, kjv_small_txt, cache_dir, small_tokenizer,
                                                              tiny_teacher, monkeypatch):
    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=2)
    oracle = save_tiny_model(tmp_path / "oracle", small_tokenizer, layers=2, hidden=48, seed=9)
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student, tiny_teacher, eval={"every": 2, "max_batches": 1, "batch_size": 4})
    monitor_cfg = MonitorConfig(oracle=str(oracle), prompts=3, prompt_tokens=6, max_new_tokens=5)
    trainer, _ = build_trainer(cfg, show_progress=False)
    trainer.evaluator = MonitoredEvaluator(monitor_cfg)
    original = trainer.train_step

    def dies_in_step_5(step):
        if step == 4:
            raise KeyboardInterrupt
        return original(step)

    monkeypatch.setattr(trainer, "train_step", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    resumed, _ = build_trainer(cfg, show_progress=False)
    evaluator = MonitoredEvaluator(monitor_cfg)
    resumed.evaluator = evaluator
    result = resumed.train(resume=True)
    resumed.close()
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for record in evals:
        assert record["proxy_kl"] > 0 and record["golden_kl"] > 0 and "loss" in record
        assert record["teacher_hacking"] in (0.0, 1.0)
    # the resumed monitor took steps 2 and 4 back from metrics.jsonl
    assert [h["step"] for h in evaluator.monitor.history] == [2.0, 4.0, 6.0]
    assert result.final_metrics["proxy_kl"] == evals[-1]["proxy_kl"]
    assert (tmp_path / "run" / "monitor.png").exists()


def test_token_mode_proxy_equals_the_evaluations_kl_to_teacher(tmp_path, kjv_small_txt, cache_dir, small_tokenizer, tiny_teacher):
    """Two independent code paths: the monitor's token-level proxy over the first 8 validation blocks and
    evaluate_lm's mean KL(teacher || student) over the same 8 blocks."""
    student = save_tiny_model(tmp_path / "student", small_tokenizer, layers=1, hidden=32, seed=4)
    cfg = run_config(tmp_path, kjv_small_txt, cache_dir, student, tiny_teacher, eval={"every": 1000, "max_batches": 2, "batch_size": 4})
    trainer, _ = build_trainer(cfg, show_progress=False)
    trainer.evaluator = MonitoredEvaluator(MonitorConfig(mode="token", prompts=8, batch_size=3), plot=False)
    metrics = trainer.evaluate()
    trainer.close()
    assert metrics["proxy_kl"] == pytest.approx(metrics["kl_to_teacher"], rel=1e-5)
    assert "golden_kl" not in metrics
